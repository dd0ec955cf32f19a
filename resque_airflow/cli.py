"""The ``resque`` command: fingerprint, score, export, and (with MLflow) publish, gate and audit.

Exit codes: 0 success; 2 bad input (one line on stderr naming the problem); 3 registry unreachable or missing
what was asked for; 1 anything unexpected (with a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from resque_airflow import jsonsafe
from resque_airflow.errors import RegistryError, ResqueInputError, check_finite
from resque_airflow.registry import names

log = logging.getLogger("resque")


@contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int | None], None] | None]:
    """A rich progress bar on stderr (only when stderr is a terminal); yields the callback the pipeline takes."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def image_spec_from(args: argparse.Namespace) -> dict | None:
    """The image-preprocessing fields given by ``--image-*`` flags (None: none given), to lay over what the model
    declares (see :func:`resque_airflow.runtime.preprocess.image_spec_for`)."""

    def numbers(flag: str, text: str, kind: type) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError as exc:
            raise ResqueInputError(f"{flag}: expected comma-separated numbers, got {text!r}") from exc

    given = {
        "mode": args.image_mode, "scale": args.image_scale, "layout": args.image_layout, "resize": args.image_resize,
        "max_width": args.image_max_width,
        "mean": None if args.image_mean is None else numbers("--image-mean", args.image_mean, float),
        "std": None if args.image_std is None else numbers("--image-std", args.image_std, float),
        "size": None if args.image_size is None else numbers("--image-size", args.image_size, int),
    }  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if "size" in given and len(given["size"]) != 2:
        raise ResqueInputError(f"--image-size: expected H,W, got {args.image_size!r}")
    return given or None


def model_options(args: argparse.Namespace) -> dict:
    """How reference data is read and pooled (``fingerprint`` and ``publish``): recorded in the fingerprint."""
    text = {"column": args.text_column, "max_length": args.max_length, "padding": args.text_padding}
    names = [c.strip() for c in args.class_names.split(",")] if args.class_names else None
    return {
        "pooling": args.pooling, "num_classes": args.num_classes, "class_names": names,
        "label_column": args.label_column, "tokenizer": args.tokenizer, "text_options": text,
        "image_spec": image_spec_from(args),
    }  # fmt: skip


def print_result(result: dict, as_json: bool) -> None:
    """One JSON object on stdout with ``--json``, else a readable summary."""
    if as_json:
        print(jsonsafe.dumps(result, default=float))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = f"RESQUE_{result['mode']} = [bold]{result['score']:.4f}[/bold]"
    if result.get("interval"):
        lo, hi = result["interval"]
        head += f"  (90% interval {lo:.4f}-{hi:.4f})"
    if result.get("decision"):
        head += f"  ->  [bold]{result['decision']}[/bold]"
    console.print(head)
    _print_calibration(console, result)
    if result.get("reason"):
        console.print(f"why: {result['reason']}")
    console.print(
        f"{result['n_samples']} samples, {result.get('n_classes', '?')} classes, labels={result.get('label_source')}, "
        f"provider={result['provider']}, layer={result.get('layer')}"
    )
    if result.get("prediction"):
        p = result["prediction"]
        console.print(f"predicted fine-tuning cost: {p['predicted']:.4g} [{p['low']:.4g}, {p['high']:.4g}] "
                      f"{p.get('unit', '')} ({p.get('basis')}), rebuild cost {p['rebuild_cost']:.4g}")  # fmt: skip
    signals = {k: v for k, v in (result.get("signals") or {}).items() if v is not None}
    if signals:
        console.print("signals: " + ", ".join(f"{k}={v:.4g}" for k, v in signals.items()))
    if result.get("per_class"):
        table = Table("class", "angle / pi")
        for k, v in result["per_class"].items():
            table.add_row(str(k), f"{v:.4f}")
        console.print(table)


def _print_calibration(console, result: dict) -> None:
    """The calibrated view of a dist score: detection against the null at this batch size, accuracy."""
    cal = result.get("calibration")
    if not cal:
        return
    det = cal["detection"]
    console.print(
        f"shift {'detected' if det['detected'] else 'not detected'} at false-alarm rate {det['alpha']:g}: null "
        f"quantile {det['null_quantile']:.4f} at n={result['n_samples']}, p = {det['p_value']:.3g}"
    )
    for name in ("accuracy_measured", "accuracy_estimated"):
        if cal.get(name):
            a = cal[name]
            console.print(f"{name.replace('_', ' ')}: {a['value']:.3f} ({a['low']:.3f}-{a['high']:.3f})")


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from resque_airflow.runtime.pipeline import fingerprint_model

    with progress_bar("reference pass", not args.json) as progress:
        fp = fingerprint_model(
            args.model, args.data, layer=args.layer, provider=args.provider, batch_size=args.batch_size,
            progress=progress, **model_options(args),
        )  # fmt: skip
    out = fp.save(args.out)
    meta = fp.metadata() | {"path": str(out), "input_spec": fp.input_spec.to_dict(with_tokenizer=False)}
    if args.json:
        print(jsonsafe.dumps(meta))
    else:
        print(
            f"fingerprint written to {out}: {fp.n_samples} samples, {fp.num_classes} classes, layer {fp.layer!r} "
            f"({fp.pooling} pooling, D={fp.dim}), reference accuracy {meta['reference_accuracy']}"
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from resque_airflow.core.fingerprint import Fingerprint
    from resque_airflow.runtime import pipeline

    with progress_bar(f"scoring ({args.kind})", not args.json) as progress:
        if args.kind == "dist":
            fp = Fingerprint.load(args.fingerprint)
            result = pipeline.score_dist(
                args.model, fp, args.data, label_source=args.labels, provider=args.provider,
                batch_size=args.batch_size, progress=progress, alpha=args.alpha,
            )  # fmt: skip
        else:
            result = pipeline.score_task(
                args.model, args.data, layer=args.layer, provider=args.provider, batch_size=args.batch_size,
                init=args.init, max_samples=args.max_samples, image_spec=image_spec_from(args), progress=progress,
            )  # fmt: skip
    check_finite(f"RESQUE_{args.kind} score of {args.data}", result.score,
                 "the data or the fingerprint holds values that are not numbers")  # fmt: skip
    print_result(result.to_dict(), args.json)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from resque_airflow.runtime.export import export_torch, import_callable

    model = import_callable(args.factory, what="--factory")()
    if args.weights:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)  # never unpickle arbitrary code
        except Exception as exc:
            raise ResqueInputError(f"--weights: cannot load {args.weights} as a state dict: {exc}") from exc
        model.load_state_dict(state)
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError as exc:
        raise ResqueInputError(f"--input-shape: expected comma-separated integers, got {args.input_shape!r}") from exc
    report = export_torch(model, torch.randn(shape), args.out, layer=args.layer)
    print(
        jsonsafe.dumps(report.__dict__)
        if args.json
        else f"exported to {report.path} (max |onnx - torch| = {report.max_abs_diff_logits:.2e})"
    )
    return 0


def training_cost_from(text: str | None) -> dict[str, float] | None:
    """``--training-cost``: ``key=value,...`` or the path of a JSON object; keys are ``names.COST_METRICS``."""
    if text is None:
        return None
    from pathlib import Path

    if "=" not in text:
        try:
            given = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ResqueInputError(f"--training-cost: cannot read {text!r} as a JSON object ({exc}); give "
                                   "steps_to_target=...,energy_kwh=... or a JSON file") from exc  # fmt: skip
        if not isinstance(given, dict):
            raise ResqueInputError(f"--training-cost: {text} holds no JSON object; give one, or key=value pairs")
    else:
        given = dict(part.partition("=")[::2] for part in text.split(",") if part.strip())
    cost = {}
    for key, value in given.items():
        key = str(key).strip()
        if key not in names.COST_METRICS:
            raise ResqueInputError(f"--training-cost: unknown cost {key!r}; expected some of {names.COST_METRICS}")
        cost[key] = check_finite(f"--training-cost {key}", value, "give a number, e.g. steps_to_target=1200")
    return cost


def cmd_publish(args: argparse.Namespace) -> int:
    from resque_airflow.registry.publish import publish_model

    with progress_bar("reference pass", not args.json) as progress:
        published = publish_model(
            tracking_uri=args.tracking_uri, name=args.name, model_path=args.model, reference=args.reference,
            alias=args.alias, layer=args.layer, provider=args.provider, batch_size=args.batch_size,
            weights_path=args.weights, progress=progress, torch_factory=args.torch_factory,
            training_cost=training_cost_from(args.training_cost), **model_options(args),
        )  # fmt: skip
    info = published.to_dict()
    done = f"registered {info['name']} version {info['version']} as @{info['alias']}"
    print(jsonsafe.dumps(info) if args.json else done)
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from resque_airflow.registry.client import make_client
    from resque_airflow.registry.gate import GateRequest, run_gate

    request = GateRequest(
        model_uri=args.model_uri, data=args.data, mode=args.mode, label_source=args.labels, layer=args.layer,
        provider=args.provider, reuse_threshold=args.reuse_threshold, rebuild_threshold=args.rebuild_threshold,
        experiment_name=args.experiment, batch_size=args.batch_size, alpha=args.alpha,
        price_per_kwh=args.price_per_kwh, value_per_accuracy_point=args.value_per_accuracy_point,
    )  # fmt: skip
    with progress_bar("gate", not args.json) as progress:
        outcome = run_gate(request, client=make_client(args.tracking_uri, args.registry_uri), progress=progress)
    print_result(outcome.to_dict(), args.json)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from resque_airflow.runtime.graph import load_model
    from resque_airflow.runtime.layers import candidate_layers, choose_layer

    model = load_model(args.model)
    rows = candidate_layers(model)
    try:
        auto = choose_layer(model, "auto")
        auto_line = f"layer=auto: {auto.name!r}, {auto.reason}"
    except ResqueInputError as exc:
        auto, auto_line = None, f"layer=auto: none ({_one_line(exc)})"
    if args.json:
        print(jsonsafe.dumps({"auto": auto and auto.__dict__, "candidates": [r.__dict__ for r in rows]}))
        return 0
    dims = lambda i: [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim]  # noqa: E731
    inputs = ", ".join(f"{i.name} {dims(i)}" for i in model.graph.input)
    print(f"inputs: {inputs}")
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        print(f"{'*' if r.auto else ' '} {r.name:<{width}}  {r.op:<20} {r.shape}")
    print(auto_line)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from resque_airflow.registry.audit_report import audit_main

    return audit_main(args.model, args.tracking_uri, args.json, registry_uri=args.registry_uri)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resque", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, *, layer: bool = True) -> None:
        sp.add_argument("--provider", default="auto", choices=["auto", "cuda", "cpu"])
        sp.add_argument("--batch-size", type=int, default=256)
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        if layer:
            sp.add_argument("--layer", default="auto", help="tensor name of the representation (default: auto)")

    def images(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group(
            "image folders",
            "how images become model input: (pixel * scale - mean) / std, resized and laid out as declared; flags "
            "not given come from the model's metadata (resque.preprocess), a MODEL.preprocess.json sidecar, or its "
            "input shape (1 channel: L, else RGB; scale 1/255, mean 0, std 1)",
        )
        g.add_argument("--image-mode", default=None, choices=["L", "RGB", "BGR"])
        g.add_argument("--image-scale", type=float, default=None, help="multiplier of 0..255 pixels (1/255)")
        g.add_argument("--image-mean", default=None, help="one value, or one per channel: 0.485,0.456,0.406")
        g.add_argument("--image-std", default=None, help="one value, or one per channel")
        g.add_argument("--image-layout", default=None, choices=["NCHW", "NHWC"], help="default: from the model")
        g.add_argument("--image-resize", default=None, choices=["stretch", "keep-aspect", "center-crop", "height"])
        g.add_argument("--image-size", default=None, help="H,W (default: the model input's fixed size)")
        g.add_argument("--image-max-width", type=int, default=None, help="padded width of --image-resize height")

    def reading(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("reference data", "how the data is read and pooled (recorded in the fingerprint)")
        g.add_argument("--num-classes", type=int, default=None, help="for models without a class-score output")
        g.add_argument("--class-names", default=None, help="class names in id order: image folders map by name")
        g.add_argument("--label-column", default="label", help="labels' Parquet column / .jsonl field")
        g.add_argument("--pooling", default="auto", choices=["auto", "mean", "cls", "spatial", "spatial-last"],
                       help="token sequences: mean over real tokens (default) or the first (CLS) token")  # fmt: skip
        g.add_argument("--tokenizer", default=None, help="tokenizer.json: raw text is tokenized with it")
        g.add_argument("--text-column", default="text", help="the text column / .jsonl field")
        g.add_argument("--max-length", type=int, default=128, help="tokens per text (truncation)")
        g.add_argument("--text-padding", default="max_length", choices=["max_length", "longest"])

    f = sub.add_parser("fingerprint", help="compute a model's reference fingerprint")
    f.add_argument("--model", required=True, help="ONNX file")
    f.add_argument("--data", required=True, help="reference data (labelled): .npz, shard folder, Parquet, images")
    f.add_argument("--out", required=True, help="output folder (fingerprint.json + fingerprint.npz)")
    common(f)
    images(f)
    reading(f)
    f.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("score", help="score new data with RESQUE_dist or RESQUE_task")
    ssub = s.add_subparsers(dest="kind", required=True)
    d = ssub.add_parser("dist", help="RESQUE_dist against a fingerprint")
    d.add_argument("--model", required=True)
    d.add_argument("--fingerprint", required=True)
    d.add_argument("--data", required=True)
    d.add_argument("--labels", default="given", choices=["given", "predicted", "none"])
    d.add_argument("--alpha", type=float, default=0.01, help="false-alarm rate of the calibrated shift test")
    common(d, layer=False)  # no --image-* flags: the fingerprint holds the preprocessing its reference went through
    d.set_defaults(func=cmd_score)
    t = ssub.add_parser("task", help="RESQUE_task of a labelled new task")
    t.add_argument("--model", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--init", default="centroids", choices=["centroids", "k-means++"])
    t.add_argument("--max-samples", type=int, default=20_000)
    common(t)
    images(t)
    t.set_defaults(func=cmd_score)

    e = sub.add_parser("export", help="export a torch model to ONNX with its representation layer")
    e.add_argument("--factory", required=True, help="module:callable returning the torch model")
    e.add_argument("--weights", help="state-dict file (loaded with weights_only=True)")
    e.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    e.add_argument("--layer", default=None, help="torch module name of the representation layer")
    e.add_argument("--out", required=True)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

    pub = sub.add_parser("publish", help="register an ONNX model with its fingerprint in MLflow")
    pub.add_argument("--model", required=True)
    pub.add_argument("--reference", required=True, help="labelled reference data")
    pub.add_argument("--name", required=True)
    pub.add_argument("--alias", default="champion")
    pub.add_argument("--tracking-uri", required=True)
    pub.add_argument("--weights", help="torch state dict to store beside the model, for retraining")
    pub.add_argument("--torch-factory", default=None,
                     help="module:callable returning the torch model, so retrain tasks can rebuild it")  # fmt: skip
    pub.add_argument("--training-cost", default=None,
                     help="measured training cost: steps_to_target=...,energy_kwh=... or a JSON file")  # fmt: skip
    common(pub)
    images(pub)
    reading(pub)
    pub.set_defaults(func=cmd_publish)

    g = sub.add_parser("gate", help="score new data against a registered model and decide")
    g.add_argument("--model-uri", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    g.add_argument("--data", required=True)
    g.add_argument("--tracking-uri", required=True)
    g.add_argument("--registry-uri", default=None)
    g.add_argument("--mode", default="dist", choices=["dist", "task"])
    g.add_argument("--labels", default="given", choices=["given", "predicted", "none"])
    g.add_argument("--reuse-threshold", type=float, default=None)
    g.add_argument("--rebuild-threshold", type=float, default=None)
    g.add_argument("--experiment", default=names.DEFAULT_EXPERIMENT)
    g.add_argument("--alpha", type=float, default=0.01, help="false-alarm rate of the calibrated shift test")
    g.add_argument("--price-per-kwh", type=float, default=None, help="money per kWh of retraining energy")
    g.add_argument("--value-per-accuracy-point", type=float, default=None,
                   help="money one accuracy point is worth over the period the model serves")  # fmt: skip
    common(g)
    g.set_defaults(func=cmd_gate)

    ly = sub.add_parser("layers", help="list the tensors that can serve as the representation, with their shapes")
    ly.add_argument("--model", required=True, help="ONNX file")
    ly.add_argument("--json", action="store_true")
    ly.set_defaults(func=cmd_layers)

    a = sub.add_parser("audit", help="the gate history of a registered model")
    a.add_argument("--model", required=True)
    a.add_argument("--tracking-uri", required=True)
    a.add_argument("--registry-uri", default=None)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except RegistryError as exc:  # first: a missing model is both a registry error and bad input, and exits 3
        print(f"resque: registry error: {_one_line(exc)}", file=sys.stderr)
        return 3
    except ResqueInputError as exc:
        print(f"resque: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The message on one line: some come with a library's multi-line detail (ONNX Runtime, protobuf)."""
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
