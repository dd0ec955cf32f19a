"""Images as they come: NCHW and NHWC, 1-D convolutions, dynamic width, declared preprocessing, class folders by
name, a fixed batch size (issue 13, "Images as they come")."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import make_images
from models_support import FLOAT, onnx_model, value
from onnx import helper
from PIL import Image

from resque_airflow.cli import main
from resque_airflow.core.fingerprint import Fingerprint, ImageSpec, TensorSpec
from resque_airflow.runtime.embed import Embedder
from resque_airflow.runtime.pipeline import fingerprint_model, score_dist
from resque_airflow.runtime.readers import DataSource

RNG = np.random.default_rng(0)
WC = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) * 0.3
WF = RNG.normal(size=(8, 4)).astype(np.float32)


def conv_model(layout: str) -> bytes:
    """One model in two layouts: Conv(3->8) -> Relu -> mean over H, W -> Gemm -> logits (N, 4). The NHWC version
    transposes in and out, so its representation ``feat`` is (N, 16, 16, 8)."""
    nchw = layout == "NCHW"
    nodes = [] if nchw else [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2])]
    nodes += [
        helper.make_node("Conv", ["x" if nchw else "xt", "wc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    if nchw:
        nodes += [helper.make_node("Identity", ["r"], ["feat"])]
    else:
        nodes += [helper.make_node("Transpose", ["r"], ["feat"], perm=[0, 2, 3, 1])]
    axes = [2, 3] if nchw else [1, 2]
    nodes += [
        helper.make_node("ReduceMean", ["feat", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "wf"], ["logits"]),
    ]
    shape = ["N", 3, 16, 16] if nchw else ["N", 16, 16, 3]
    return onnx_model(
        nodes, [("wc", WC), ("wf", WF), ("axes", np.array(axes, np.int64))], [value("x", FLOAT, shape)],
        [value("logits", FLOAT, ["N", 4])], opset=18,
    )  # fmt: skip


def tensor(model: bytes, name: str, x: np.ndarray) -> np.ndarray:
    """The value of intermediate tensor ``name`` on ``x`` (exposed as an output of a copy of the model)."""
    import onnxruntime as ort

    proto = onnx.load_model_from_string(model)
    proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run([name], {"x": x})[0]


def write_folder(root, n: int, seed: int, classes=("0", "1", "2", "3"), size=(16, 16), mode="RGB"):
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = classes[i % len(classes)]
        (root / c).mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        pixels[..., : size[0] // 4 * (1 + classes.index(c))] //= 3  # a class-dependent dark band
        Image.fromarray(pixels, mode).save(root / c / f"{i}.png")
    return root


def test_nhwc_and_nchw_versions_of_one_model_give_the_same_score(tmp_path):
    (tmp_path / "nchw.onnx").write_bytes(conv_model("NCHW"))
    (tmp_path / "nhwc.onnx").write_bytes(conv_model("NHWC"))
    ref, new = write_folder(tmp_path / "ref", 80, 1), write_folder(tmp_path / "new", 60, 2)
    scores, dims = {}, {}
    for layout in ("nchw", "nhwc"):
        model = str(tmp_path / f"{layout}.onnx")
        fp = fingerprint_model(model, str(ref), layer="feat", provider="cpu")
        dims[layout] = (fp.pooling, fp.dim, fp.input_spec.image.layout or "from the model")
        scores[layout] = score_dist(model, fp, str(new), provider="cpu").score
    # The NHWC representation is pooled over H, W (D = 8 channels), never over its last two axes (the bug: D=16/1).
    assert dims == {"nchw": ("spatial", 8, "from the model"), "nhwc": ("spatial-last", 8, "from the model")}
    assert scores["nchw"] == pytest.approx(scores["nhwc"], abs=1e-6) and scores["nchw"] > 0
    emb = Embedder(conv_model("NHWC"), layer="feat", provider="cpu")
    x = RNG.normal(size=(3, 16, 16, 3)).astype(np.float32)
    feats, _ = emb.run(x)
    np.testing.assert_allclose(feats, tensor(conv_model("NHWC"), "feat", x).mean(axis=(1, 2)), atol=1e-5)


def test_one_d_convolution_is_pooled_over_its_length():
    w = RNG.normal(size=(6, 4, 3)).astype(np.float32)
    wf = RNG.normal(size=(6, 2)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]),
        helper.make_node("Relu", ["c"], ["act"]),  # (N, 6, 20): channels first, from a convolution
        helper.make_node("ReduceMean", ["act", "axes"], ["p"], keepdims=0),
        helper.make_node("Gemm", ["p", "wf"], ["logits"]),
    ]
    model = onnx_model(nodes, [("w", w), ("wf", wf), ("axes", np.array([2], np.int64))],
                       [value("x", FLOAT, ["N", 4, 20])], [value("logits", FLOAT, ["N", 2])], opset=18)  # fmt: skip
    emb = Embedder(model, layer="act", provider="cpu")
    assert emb.exposed.pooling == "spatial"
    x = RNG.normal(size=(5, 4, 20)).astype(np.float32)
    feats, _ = emb.run(x)
    act = tensor(model, "act", x)
    assert feats.shape == (5, 6)  # not (5, 20): the bug averaged over the channels
    np.testing.assert_allclose(feats, act.mean(axis=2), atol=1e-5)


def test_dynamic_width_model_resized_by_height_and_padded(tmp_path):
    import torch

    from resque_airflow.runtime.export import export_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )  # fmt: skip
    export_torch(net, torch.randn(2, 1, 16, 40), tmp_path / "line.onnx", layer="1", dynamic_axes={"input": [3]})
    proto = onnx.load(tmp_path / "line.onnx")
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][2] == 16  # fixed H, dynamic W
    rng = np.random.default_rng(3)
    for split, n in (("ref", 40), ("new", 30)):
        for i in range(n):
            c = str(i % 2)
            (tmp_path / split / c).mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(10, 120)), int(rng.integers(8, 40))
            Image.fromarray(rng.integers(0, 256, (h, w)).astype(np.uint8), "L").save(tmp_path / split / c / f"{i}.png")
    code = main(
        [
            "fingerprint",
            "--model",
            str(tmp_path / "line.onnx"),
            "--data",
            str(tmp_path / "ref"),
            "--out",
            str(tmp_path / "fp"),
            "--image-resize",
            "height",
            "--image-max-width",
            "64",
            "--provider",
            "cpu",
        ]
    )
    assert code == 0  # fmt: skip
    fp = Fingerprint.load(tmp_path / "fp")
    spec = fp.input_spec.image
    assert (spec.mode, spec.resize, spec.max_width) == ("L", "height", 64)  # L: read from the 1-channel input
    src = DataSource(str(tmp_path / "new"), batch_size=8, image_spec=spec,
                     inputs=[TensorSpec("input", "float32", (None, 1, 16, None))])  # fmt: skip
    batch = next(iter(src))
    assert batch.x.shape == (8, 1, 16, 64)
    result = score_dist(str(tmp_path / "line.onnx"), fp, str(tmp_path / "new"), provider="cpu")
    assert result.n_samples == 30


def test_declared_preprocessing_is_applied_exactly(tmp_path):
    """BGR order, per-channel mean/std, keep-aspect into (4, 4), NHWC: value by value."""
    (tmp_path / "a").mkdir()
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[..., 0], pixels[..., 2] = 255, 51  # red 255, blue 51
    Image.fromarray(pixels, "RGB").save(tmp_path / "a" / "x.png")
    spec = ImageSpec(mode="BGR", scale=1 / 255, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5), layout="NHWC",
                     resize="keep-aspect", size=(4, 4))  # fmt: skip
    x = next(iter(DataSource(str(tmp_path), image_spec=spec))).x
    assert x.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(x[0, [0, 3]], 0.0)  # letterbox rows: zero after normalisation
    expected = (np.array([51, 0, 255], np.float32) * np.float32(1 / 255) - np.float32([0.1, 0.2, 0.3])) / 0.5
    np.testing.assert_allclose(x[0, 1:3], np.broadcast_to(expected, (2, 4, 3)), rtol=1e-6)
    crop = ImageSpec(mode="RGB", resize="center-crop", size=(2, 2))
    assert next(iter(DataSource(str(tmp_path), image_spec=crop))).x.shape == (1, 3, 2, 2)


def test_preprocessing_from_onnx_metadata_and_sidecar(tmp_path):
    ref = write_folder(tmp_path / "ref", 16, 1)
    proto = onnx.load_model_from_string(conv_model("NCHW"))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "resque.preprocess", json.dumps({"mode": "BGR", "mean": [0.5], "std": [0.25]})
    onnx.save(proto, tmp_path / "meta.onnx")
    fp = fingerprint_model(str(tmp_path / "meta.onnx"), str(ref), provider="cpu")
    assert (fp.input_spec.image.mode, fp.input_spec.image.mean, fp.input_spec.image.std) == ("BGR", (0.5,), (0.25,))
    (tmp_path / "side.onnx").write_bytes(conv_model("NCHW"))
    (tmp_path / "side.onnx.preprocess.json").write_text(json.dumps({"scale": 1.0, "resize": "center-crop"}))
    fp = fingerprint_model(str(tmp_path / "side.onnx"), str(ref), provider="cpu", image_spec={"mode": "BGR"})
    assert (fp.input_spec.image.scale, fp.input_spec.image.resize, fp.input_spec.image.mode) == (
        1.0, "center-crop", "BGR",  # the flag given wins over the sidecar, field by field
    )  # fmt: skip


def test_grey_model_with_rgb_mode_names_the_flag(tmp_path, capsys, cnn_onnx):
    write_folder(tmp_path / "ref", 8, 1, size=(8, 8))
    code = main(["fingerprint", "--model", str(cnn_onnx[1]), "--data", str(tmp_path / "ref"), "--out",
                 str(tmp_path / "fp"), "--image-mode", "RGB", "--provider", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "pass --image-mode L" in err and err.strip().count("\n") == 0, err
    assert (
        main(
            [
                "fingerprint",
                "--model",
                str(cnn_onnx[1]),
                "--data",
                str(tmp_path / "ref"),
                "--out",
                str(tmp_path / "fp"),
                "--provider",
                "cpu",
            ]
        )
        == 0
    )  # default: L, from the model's 1 channel


def test_class_folders_map_by_name_never_by_sorted_position(tmp_path):
    for c in ("0", "90", "180", "270"):
        (tmp_path / "rot" / c).mkdir(parents=True)
        Image.new("L", (8, 8), 100).save(tmp_path / "rot" / c / "a.png")
    src = DataSource(str(tmp_path / "rot"), image_size=(8, 8), image_spec=ImageSpec(mode="L"))
    assert src.class_names == ["0", "90", "180", "270"]  # numeric: not "0, 180, 270, 90"
    labels = {path.split("/")[-2]: label for path, label in src.files}
    assert labels == {"0": 0, "90": 1, "180": 2, "270": 3}
    # A fingerprint made from arrays has class ids, no names: folders "2" and "3" are classes 2 and 3.
    for c in ("2", "3"):
        (tmp_path / "ids" / c).mkdir(parents=True)
        Image.new("L", (8, 8), 100).save(tmp_path / "ids" / c / "a.png")
    src = DataSource(str(tmp_path / "ids"), image_size=(8, 8), image_spec=ImageSpec(mode="L"), num_classes=4)
    assert sorted(label for _, label in src.files) == [2, 3]
    named = DataSource(str(tmp_path / "rot"), image_size=(8, 8), class_names=["270", "180", "90", "0"])
    assert {p.split("/")[-2]: label for p, label in named.files} == {"270": 0, "180": 1, "90": 2, "0": 3}


def _trained_cnn():
    import torch
    from conftest import make_cnn

    model = make_cnn()
    x, y = make_images(400, seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _as_folder(root, x, y):
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img[0] * 255, 0, 255).round().astype(np.uint8), "L").save(
            root / str(label) / f"{i}.png"
        )
    return root


def test_cnn_on_image_folders_and_a_fixed_batch_model_are_published_and_reused(tmp_path, capsys):
    """The CNN family end to end: images published with their preprocessing, then gated; and the same CNN with a
    fixed batch size of 1 (which ONNX Runtime runs one row at a time) through resque publish --batch-size."""
    import torch

    from resque_airflow.runtime.export import export_torch

    model = _trained_cnn()
    export_torch(model, torch.randn(2, 1, 8, 8), tmp_path / "cnn.onnx", layer="conv2")
    proto = onnx.load(tmp_path / "cnn.onnx")
    for vi in [*proto.graph.input, *proto.graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_value = 1  # a model exported with batch size 1, as many are
    onnx.save(proto, tmp_path / "cnn-b1.onnx")
    ref = _as_folder(tmp_path / "ref", *make_images(300, seed=1))
    new = _as_folder(tmp_path / "new", *make_images(200, seed=2))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for name, path in (("cnn", "cnn.onnx"), ("cnn-b1", "cnn-b1.onnx")):
        code = main(["publish", "--model", str(tmp_path / path), "--reference", str(ref), "--name", name,
                     "--tracking-uri", uri, "--batch-size", "32", "--num-classes", "4", "--provider", "cpu",
                     "--json"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
        code = main(["gate", "--model-uri", f"models:/{name}@champion", "--data", str(new), "--tracking-uri", uri,
                     "--batch-size", "32", "--provider", "cpu", "--json"])  # fmt: skip
        out = capsys.readouterr()
        assert code == 0, out.err
        result = json.loads(out.out)
        assert result["decision"] == "reuse" and result["n_samples"] == 200, result.get("reason")
