"""Transformers on raw text: several int64 inputs, tokens from Parquet/.jsonl through ``tokenizers``, pooling over
the real tokens only (issue 13, "Transformers and text")."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from models_support import sentences, tiny_bert, train_bert, write_text_parquet, write_tokenizer

from resque_airflow.cli import main
from resque_airflow.core.fingerprint import Fingerprint
from resque_airflow.runtime.embed import Embedder
from resque_airflow.runtime.pipeline import fingerprint_model, score_dist

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

LAYER = "bert.encoder.layer.1.output"  # (N, T, 32): the last encoder layer's token states


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A trained tiny BERT exported twice by the project's export path (2 and 3 inputs), its tokenizer, data."""
    import torch

    from resque_airflow.runtime.export import export_torch

    d = tmp_path_factory.mktemp("text")
    tok = write_tokenizer(d / "tokenizer.json")
    model = train_bert(tiny_bert(), tok)
    ids = torch.randint(4, 40, (2, 16))
    ones = torch.ones(2, 16, dtype=torch.long)
    export_torch(model, {"input_ids": ids, "attention_mask": ones}, d / "bert2.onnx", layer=LAYER)
    export_torch(
        model, {"input_ids": ids, "attention_mask": ones, "token_type_ids": ones * 0}, d / "bert3.onnx", layer=LAYER
    )
    export_torch(model, {"input_ids": ids, "attention_mask": ones}, d / "bert-auto.onnx")  # no layer recorded
    write_text_parquet(d / "ref.parquet", 400, seed=0)
    write_text_parquet(d / "new.parquet", 300, seed=1)
    texts, y = sentences(300, seed=2)
    lines = [json.dumps({"text": t, "label": int(v)}) for t, v in zip(texts, y, strict=True)]
    (d / "new.jsonl").write_text("\n".join(lines) + "\n")
    return d


def cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_two_input_transformer_published_with_its_tokenizer_and_gated_on_raw_text(text, tmp_path):
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, run_gate
    from resque_airflow.registry.publish import publish_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    pub = publish_model(
        tracking_uri=uri, name="bert2", model_path=text / "bert2.onnx", reference=str(text / "ref.parquet"),
        tokenizer=text / "tokenizer.json", text_options={"max_length": 16}, provider="cpu",
    )  # fmt: skip
    assert pub.reference_accuracy > 0.95
    client = make_client(uri)
    stored = client.download_artifacts(pub.run_id, "model/extra_files", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "extra_files" / "tokenizer.json").read_text() == (text / "tokenizer.json").read_text()
    fp = Fingerprint.load(stored)
    assert fp.pooling == "tokens-masked" and fp.layer == LAYER
    assert [t.name for t in fp.input_spec.tensors] == ["input_ids", "attention_mask"]
    assert {t.dtype for t in fp.input_spec.tensors} == {"int64"}
    spec = fp.input_spec.text
    assert (spec.max_length, spec.padding, spec.column, spec.mask_input) == (16, "max_length", "text", "attention_mask")
    outcome = run_gate(GateRequest("models:/bert2@champion", str(text / "new.parquet"), provider="cpu"), client=client)
    assert outcome.decision == "reuse", outcome.reason


def test_three_input_transformer_from_jsonl_through_the_cli(text, tmp_path, capsys):
    fp_dir = tmp_path / "fp"
    code, _, err = cli(["fingerprint", "--model", str(text / "bert3.onnx"), "--data", str(text / "ref.parquet"),
                        "--out", str(fp_dir), "--tokenizer", str(text / "tokenizer.json"), "--max-length", "16",
                        "--provider", "cpu", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    fp = Fingerprint.load(fp_dir)
    assert [t.name for t in fp.input_spec.tensors] == ["input_ids", "attention_mask", "token_type_ids"]
    assert fp.input_spec.text.type_ids_input == "token_type_ids"
    code, out, err = cli(["score", "dist", "--model", str(text / "bert3.onnx"), "--fingerprint", str(fp_dir),
                          "--data", str(text / "new.jsonl"), "--provider", "cpu", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["n_samples"] == 300 and result["score"] < 0.05
    assert not result["calibration"]["detection"]["detected"]


def _token_npz(path, texts, y, tokenizer, length):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.enable_padding(length=length, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    np.savez(path, input_ids=np.array([e.ids for e in enc]), attention_mask=np.array([e.attention_mask for e in enc]),
             y=y)  # fmt: skip
    return path


def test_padding_changes_nothing_with_the_attention_mask(text, tmp_path):
    """The same sentences padded to 16 and to 48 tokens: identical features and identical scores."""
    tok = text / "tokenizer.json"
    ref_t, ref_y = sentences(300, seed=0)
    new_t, new_y = sentences(200, seed=1)
    ref = _token_npz(tmp_path / "ref.npz", ref_t, ref_y, tok, 16)
    short = _token_npz(tmp_path / "short.npz", new_t, new_y, tok, 16)
    long = _token_npz(tmp_path / "long.npz", new_t, new_y, tok, 48)
    model = str(text / "bert2.onnx")
    emb = Embedder((text / "bert2.onnx").read_bytes(), provider="cpu")
    assert emb.exposed.pooling == "tokens-masked"
    z16, z48 = np.load(short), np.load(long)
    f16, _ = emb.run({"input_ids": z16["input_ids"], "attention_mask": z16["attention_mask"]})
    f48, _ = emb.run({"input_ids": z48["input_ids"], "attention_mask": z48["attention_mask"]})
    np.testing.assert_allclose(f16, f48, atol=2e-5)
    fp = fingerprint_model(model, str(ref), provider="cpu")
    s16 = score_dist(model, fp, str(short), provider="cpu").score
    s48 = score_dist(model, fp, str(long), provider="cpu").score
    assert s16 == pytest.approx(s48, abs=1e-5)
    # Without the mask (plain mean over T) the padding moves the representation: what the issue measured.
    plain = Embedder((text / "bert2.onnx").read_bytes(), pooling="tokens", provider="cpu")
    g16, _ = plain.run({"input_ids": z16["input_ids"], "attention_mask": z16["attention_mask"]})
    g48, _ = plain.run({"input_ids": z48["input_ids"], "attention_mask": z48["attention_mask"]})
    assert np.abs(g16 - g48).max() > 0.1


def test_cls_pooling_takes_the_first_token(text):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(text / "tokenizer.json"))
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences(5, seed=3)[0])
    feed = {"input_ids": np.array([e.ids for e in enc]), "attention_mask": np.array([e.attention_mask for e in enc])}
    emb = Embedder((text / "bert2.onnx").read_bytes(), pooling="cls", provider="cpu")
    assert emb.exposed.pooling == "cls"
    feats, _ = emb.run(feed)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(text / "bert2.onnx"), providers=["CPUExecutionProvider"])
    tokens = sess.run([LAYER], feed)[0]  # (5, 16, 32)
    np.testing.assert_allclose(feats, tokens[:, 0], atol=1e-6)


def test_auto_layer_on_a_transformer_is_explained(text, caplog, capsys):
    caplog.set_level(logging.INFO, logger="resque_airflow.runtime.embed")
    emb = Embedder((text / "bert-auto.onnx").read_bytes(), provider="cpu")
    line = next(r.message for r in caplog.records if r.message.startswith("representation:"))
    # The classifier reads BERT's pooler (tanh of the [CLS] token's state): that is the auto choice, (N, 32).
    assert emb.exposed.pooling == "none" and "input of the final Gemm node" in line
    assert "class scores: 'logits' as logits" in line
    code, out, _ = cli(["layers", "--model", str(text / "bert-auto.onnx")], capsys)
    assert code == 0
    assert "input_ids" in out and "attention_mask" in out and "LayerNormalization" in out
    assert f"layer=auto: {emb.exposed.layer!r}" in out


def test_a_missing_input_is_one_line_naming_it(text, tmp_path, capsys):
    tok = text / "tokenizer.json"
    t, y = sentences(20, seed=4)
    ref = _token_npz(tmp_path / "ref.npz", t, y, tok, 16)
    z = dict(np.load(ref))
    np.savez(tmp_path / "ids-only.npz", input_ids=z["input_ids"], y=z["y"])
    np.savez(tmp_path / "float-ids.npz", input_ids=z["input_ids"].astype(np.float32),
             attention_mask=z["attention_mask"], y=z["y"])  # fmt: skip
    fp_dir = tmp_path / "fp"
    model = str(text / "bert2.onnx")
    assert cli(["fingerprint", "--model", model, "--data", str(ref), "--out", str(fp_dir), "--provider", "cpu"],
               capsys)[0] == 0  # fmt: skip
    for data, message in (
        ("ids-only.npz", "the model takes inputs ['input_ids', 'attention_mask'], but the file has no arrays "
                         "['attention_mask']"),
        ("float-ids.npz", "input_ids has dtype float32, but the model takes int64 for input 'input_ids'"),
    ):  # fmt: skip
        code, _, err = cli(["score", "dist", "--model", model, "--fingerprint", str(fp_dir), "--data",
                            str(tmp_path / data), "--provider", "cpu"], capsys)  # fmt: skip
        assert code == 2 and message in err and err.strip().count("\n") == 0, err
