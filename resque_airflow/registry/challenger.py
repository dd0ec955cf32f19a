"""Retrain or rebuild after a gate: train a challenger on the new data, measure what it cost, register it.

Used by the example DAGs' ``retrain`` and ``rebuild`` tasks. The measured cost (DESIGN.md 2.4) is logged on the
challenger's run together with the id of the gate run that triggered it, which is what later gates learn from.
torch is imported only when this runs.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.audit_loop import write_back_cost
from resque_airflow.registry.client import make_client, registry_call
from resque_airflow.registry.publish import publish_model
from resque_airflow.runtime.readers import DataSource

log = logging.getLogger(__name__)

TARGET_TAG = "resque.target"  # on a challenger's run and version: whether it reached its target accuracy
TARGET_MET = "met"
TARGET_MISSED = "missed"


def heldout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of a labelled set, stratified; the promotion check reuses the same held-out part."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(y)), test_size=fraction, stratify=y, random_state=seed)


def load_labelled(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """All of a labelled data set in memory (the retraining set; small by construction in the examples)."""
    xs, ys = [], []
    for batch in DataSource(uri, batch_size=4096):
        if batch.y is None:
            raise ResqueInputError(f"data: {uri} has no labels (y); retraining needs labelled data")
        xs.append(batch.x)
        ys.append(np.asarray(batch.y, np.int64))
    if not xs:
        raise ResqueInputError(f"data: {uri} holds no samples")
    return np.concatenate(xs), np.concatenate(ys)


def _load_torch_model(client, version, *, fresh: bool, seed: int):
    """The torch model of ``version`` (from its factory tag): its stored weights, or fresh ones for a rebuild."""
    import mlflow.artifacts
    import torch

    from resque_airflow.runtime.export import import_callable

    factory_ref = version.tags.get(names.TORCH_FACTORY_TAG)
    if not factory_ref:
        raise ResqueInputError(
            f"model {version.name} version {version.version} has no torch factory on file; publish it with "
            "weights_path= and torch_factory= so it can be retrained"
        )
    factory = import_callable(factory_ref, what=f"model {version.name} version {version.version}: tag "
                              f"{names.TORCH_FACTORY_TAG}")  # fmt: skip
    if fresh:
        torch.manual_seed(seed)  # a rebuild starts from freshly initialised weights
        return factory(), factory_ref
    model = factory()
    files = registry_call("listing torch weights", client.list_artifacts, version.run_id, names.WEIGHTS_ARTIFACT)
    if not files:
        raise ResqueInputError(f"model {version.name} version {version.version} has no torch weights on file")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=version.run_id, artifact_path=files[0].path, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        state = torch.load(local, map_location="cpu", weights_only=True)  # never unpickle code from the registry
    model.load_state_dict(state)
    return model, factory_ref


def train_challenger(
    *,
    tracking_uri: str,
    gate_result: dict,
    data_uri: str,
    fresh: bool,
    registry_uri: str | None = None,
    alias: str = "challenger",
    target_relative: float = 0.95,
    max_epochs: float = 40,
    lr: float = 0.1,
    batch_size: int = 32,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    country_iso_code: str = "USA",
    measure_energy: bool = True,
) -> dict:
    """Fine-tune the gated version's weights (``fresh=False``: retrain) or train from scratch (``fresh=True``:
    rebuild) on ``data_uri`` until held-out accuracy reaches ``target_relative`` x the source model's reference
    accuracy (capped at ``max_epochs``); register the result as a new version with ``alias``.

    The defaults (SGD, lr 0.1, batch 32, quarter-epoch checks, cap 40 epochs, 0.95 x reference accuracy) are those
    of ``benchmarks/evidence.py``, so costs logged here are comparable with docs/EVIDENCE.md.

    Returns a JSON-serialisable dict: kind, version, run id, gate run id, target, and the measured costs.
    """
    import torch

    from resque_airflow.runtime.export import export_torch
    from resque_airflow.runtime.training import fine_tune

    client = make_client(tracking_uri, registry_uri)
    name, source_version = gate_result["model_name"], str(gate_result["model_version"])
    version = registry_call("reading the gated version", client.get_model_version, name, source_version)
    model, factory_ref = _load_torch_model(client, version, fresh=fresh, seed=seed)
    source_run = registry_call("reading the source run", client.get_run, version.run_id)
    reference_accuracy = source_run.data.metrics.get(names.REFERENCE_ACCURACY_METRIC)
    layer = source_run.data.params.get("layer")
    if reference_accuracy is None:
        raise ResqueInputError(f"model {name} version {source_version} has no reference accuracy on file")
    target = target_relative * reference_accuracy

    x, y = load_labelled(data_uri)
    train_idx, held_idx = heldout_split(y, heldout_fraction, seed)
    kind = names.KIND_REBUILD if fresh else names.KIND_RETRAIN
    log.info(
        "%s %s v%s on %s: target held-out accuracy %.3f, cap %s epochs",
        kind,
        name,
        source_version,
        data_uri,
        target,
        max_epochs,
    )
    cost = fine_tune(
        model, x[train_idx], y[train_idx], x[held_idx], y[held_idx], target_accuracy=target, max_epochs=max_epochs,
        lr=lr, batch_size=batch_size, seed=seed, country_iso_code=country_iso_code, measure_energy=measure_energy,
    )  # fmt: skip
    met = not cost.censored and cost.final_accuracy >= target
    with tempfile.TemporaryDirectory(prefix="resque-challenger-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_torch(
            model, torch.from_numpy(x[:2]), onnx_path, layer=layer if layer in dict(model.named_modules()) else None
        )
        weights = Path(tmp) / "state_dict.pt"
        torch.save(model.state_dict(), weights)
        published = publish_model(
            tracking_uri=tracking_uri, registry_uri=registry_uri, name=name, model_path=onnx_path,
            reference=data_uri, alias=alias if met else None, layer=layer or "auto", provider="cpu",
            weights_path=weights,
            torch_factory=factory_ref, training_cost=cost.to_metrics(), experiment_name=names.RETRAIN_EXPERIMENT,
            run_kind=kind,
            run_tags={names.GATE_RUN_TAG: gate_result["gate_run_id"], names.SOURCE_VERSION_TAG: source_version,
                      TARGET_TAG: TARGET_MET if met else TARGET_MISSED},
        )  # fmt: skip
    if not met:  # recorded as such, on the version too, and never given the alias
        registry_call("marking the challenger as missing its target", client.set_model_version_tag, name,
                      published.version, TARGET_TAG, TARGET_MISSED)  # fmt: skip
        log.warning(
            "%s of %s v%s missed its target: held-out accuracy %.4f < %.4f after %s epochs; version %s is registered "
            "without @%s (the current @%s, if any, is kept)", kind, name, source_version, cost.final_accuracy,
            target, max_epochs, published.version, alias, alias,
        )  # fmt: skip
    write_back_cost(client, gate_result["gate_run_id"], published.run_id, cost.to_metrics(), met_target=met)
    result = {
        "kind": kind, "model_name": name, "source_version": source_version, "version": published.version,
        "alias": alias if met else None, "run_id": published.run_id, "gate_run_id": gate_result["gate_run_id"],
        "target_accuracy": target, "met_target": met, "heldout_fraction": heldout_fraction, "seed": seed,
        "data_uri": data_uri, **cost.to_metrics(),
    }  # fmt: skip
    log.info("%s done: %s", kind, {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return result
