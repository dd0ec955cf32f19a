"""Builders shared by tests/test_models_*.py: a tiny BERT and its tokenizer, text and tabular data, small graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

# Two topics with their own words, plus words both use: a random-weight BERT still sees different token statistics.
TOPICS = (
    "rain cloud wind storm snow sun cold warm fog ice",
    "goal team ball match coach score league cup player field",
)
SHARED = "the a is was today very big small new old"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def write_tokenizer(path: Path) -> Path:
    """A WordLevel tokenizer.json over the test vocabulary, with BERT's [CLS] ... [SEP] template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = SPECIALS + sorted({w for t in (*TOPICS, SHARED) for w in t.split()})
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tok.save(str(path))
    return path


def sentences(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` sentences of 4 to 12 words, labels 0/1 by topic."""
    rng = np.random.default_rng(seed)
    topics = [t.split() for t in TOPICS]
    shared = SHARED.split()
    y = rng.integers(0, 2, n)
    texts = []
    for label in y:
        k = int(rng.integers(4, 13))
        words = [rng.choice(topics[label]) if rng.random() < 0.6 else rng.choice(shared) for _ in range(k)]
        texts.append(" ".join(words))
    return texts, y


def write_text_parquet(path: Path, n: int, seed: int) -> Path:
    texts, y = sentences(n, seed)
    pq.write_table(pa.table({"text": texts, "label": y}), path)
    return path


def tiny_bert(num_labels: int = 2, seed: int = 0):
    """A 2-layer BERT-style classifier from a ``transformers`` config, random weights (no download)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def onnx_model(nodes, inits, inputs, outputs, opset: int = 17, domains: tuple = ()) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9  # onnx 1.23 writes IR 14 by default, which ONNX Runtime refuses
    return model.SerializeToString()


def value(name: str, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


FLOAT = TensorProto.FLOAT


def train_bert(model, tokenizer_path: Path, n: int = 600, epochs: int = 4, max_length: int = 16, seed: int = 0):
    """A few epochs of AdamW on :func:`sentences`, so the classifier is a real one (accuracy ~1)."""
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=0, pad_token="[PAD]")
    texts, y = sentences(n, seed + 100)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    labels = torch.tensor(y)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(n).split(32):
            loss = model(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def digits_split(seed: int = 0):
    """scikit-learn's bundled digits (1,797 x 64 integer pixels 0..16): train / reference / new thirds."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.int64), y[order]
    a, b = 900, 1350
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def write_tabular_parquet(path: Path, x: np.ndarray, y: np.ndarray | None, label="label") -> Path:
    """One integer column per feature (``px0`` ...), and the labels."""
    cols = {f"px{i}": x[:, i] for i in range(x.shape[1])}
    if y is not None:
        cols[label] = y
    pq.write_table(pa.table(cols), path)
    return path


def skl_onnx(estimator, x: np.ndarray, path: Path, *, zipmap: bool) -> Path:
    """``estimator`` converted by skl2onnx for float32 input, probabilities as a tensor or as ZipMap."""
    from skl2onnx import to_onnx

    last = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    options = None if zipmap else {id(last): {"zipmap": False}}
    path.write_bytes(to_onnx(estimator, x[:1].astype(np.float32), options=options, target_opset=17).SerializeToString())
    return path
