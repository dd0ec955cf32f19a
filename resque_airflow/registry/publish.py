"""Publish a model: register the ONNX file with its fingerprint (and optionally torch weights and training cost)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from resque_airflow.core.fingerprint import ImageSpec, sha256_file
from resque_airflow.errors import ResqueInputError
from resque_airflow.registry import names
from resque_airflow.registry.client import ensure_experiment, make_client, registry_call
from resque_airflow.runtime.graph import load_model
from resque_airflow.runtime.pipeline import DEFAULT_BATCH_SIZE, Progress, fingerprint_model

log = logging.getLogger(__name__)

# Passed explicitly: MLflow's inference lists both onnxruntime and onnxruntime-gpu, which conflict.
PIP_REQUIREMENTS = ["onnx>=1.17", "onnxruntime>=1.20"]
TOKENIZER_FILE = "tokenizer.json"  # beside the fingerprint in the version's extra_files/


@dataclass(frozen=True)
class Published:
    """A registered model version, as :func:`publish_model` left it."""

    name: str
    version: str
    alias: str
    run_id: str
    model_sha256: str
    n_reference: int
    reference_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def publish_model(
    *,
    tracking_uri: str,
    name: str,
    model_path: str | Path,
    reference: str,
    alias: str | None = "champion",
    layer: str = "auto",
    pooling: str = "auto",
    provider: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    label_column: str = "label",
    image_spec: ImageSpec | Mapping | None = None,
    tokenizer: str | Path | None = None,
    text_options: Mapping | None = None,
    weights_path: str | Path | None = None,
    torch_factory: str | None = None,
    training_cost: dict[str, float] | None = None,
    registry_uri: str | None = None,
    experiment_name: str = names.MODELS_EXPERIMENT,
    run_kind: str = names.KIND_TRAIN,
    run_tags: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> Published:
    """Register ``model_path`` as a new version of ``name`` with its fingerprint, and point ``alias`` at it.

    The fingerprint is computed from the labelled ``reference`` data and stored inside the model version's folder
    (``extra_files/``), bound to the exact ``model.onnx`` bytes by sha256. ``weights_path`` (a torch state dict)
    and ``torch_factory`` (``module:callable``) let retrain tasks rebuild the torch model later.
    ``training_cost`` (keys of :data:`names.COST_METRICS`) is logged on the version's run, so the rebuild cost is
    on file. The version is created, and the alias moved, only after everything else is stored.
    ``run_kind`` / ``run_tags`` label the run (``retrain`` / ``rebuild`` runs carry the triggering gate run id).
    ``batch_size``, ``num_classes``, ``pooling``, ``class_names``, ``label_column``, ``image_spec``, ``tokenizer``
    and ``text_options`` go to :func:`~resque_airflow.runtime.pipeline.fingerprint_model`; a tokenizer is also
    stored as ``tokenizer.json`` beside the fingerprint (the fingerprint holds it too, bound by sha256).
    """
    import mlflow.onnx

    if not name:
        raise ResqueInputError("name: the registered model name is empty")
    proto = load_model(str(model_path))
    model_bytes = proto.SerializeToString()
    fp = fingerprint_model(
        model_bytes, reference, layer=layer, pooling=pooling, provider=provider, batch_size=batch_size,
        image_spec=image_spec, num_classes=num_classes, class_names=class_names, label_column=label_column,
        tokenizer=tokenizer, text_options=text_options, progress=progress,
    )  # fmt: skip
    client = make_client(tracking_uri, registry_uri, create=True)  # the first publish creates the registry
    exp_id = ensure_experiment(client, experiment_name)
    tags = {names.KIND_TAG: run_kind, names.MODEL_NAME_TAG: name} | dict(run_tags or {})
    run = registry_call("creating the publish run", client.create_run, exp_id, tags=tags, run_name=f"{run_kind}-{name}")
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="resque-publish-") as tmp:
            fp_dir = fp.save(Path(tmp) / "fingerprint")
            extra = [str(fp_dir / "fingerprint.json"), str(fp_dir / "fingerprint.npz")]
            if fp.input_spec.text is not None:
                (fp_dir / TOKENIZER_FILE).write_text(fp.input_spec.text.tokenizer_json, encoding="utf-8")
                extra.append(str(fp_dir / TOKENIZER_FILE))
            model_dir = Path(tmp) / "model"
            mlflow.onnx.save_model(
                proto,
                str(model_dir),
                pip_requirements=PIP_REQUIREMENTS,
                save_as_external_data=False,
                extra_files=extra,
            )
            if sha256_file(model_dir / "model.onnx") != fp.model_sha256:
                raise ResqueInputError("publish: the saved model.onnx differs from the fingerprinted bytes")
            client.log_artifacts(run_id, str(model_dir), names.MODEL_ARTIFACT)
            if weights_path:
                client.log_artifact(run_id, str(weights_path), names.WEIGHTS_ARTIFACT)
        from mlflow.entities import Metric, Param

        params = {
            "layer": fp.layer, "pooling": fp.pooling, "reference_uri": str(reference), "n_reference": fp.n_samples,
            "num_classes": fp.num_classes, "model_sha256": fp.model_sha256, "batch_size": batch_size,
            "inputs": ",".join(t.name for t in fp.input_spec.tensors),
        }  # fmt: skip
        metrics = {names.REFERENCE_ACCURACY_METRIC: fp.summary.accuracy} | dict(training_cost or {})
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if v is not None],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        if not registry_call("reading the registered model", _exists, client, name):
            _create_registered_model(client, name)
        mv_tags = {names.MODEL_SHA_TAG: fp.model_sha256, names.TRAIN_RUN_MV_TAG: run_id}
        if torch_factory:
            mv_tags[names.TORCH_FACTORY_TAG] = torch_factory
        mv = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{names.MODEL_ARTIFACT}", run_id=run_id, tags=mv_tags
        )
        if alias:  # None: registered without an alias (a challenger that missed its target)
            client.set_registered_model_alias(name, alias, mv.version)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    log.info("published %s version %s as @%s (%d reference samples)", name, mv.version, alias, fp.n_samples)
    return Published(name, str(mv.version), alias, run_id, fp.model_sha256, fp.n_samples, fp.summary.accuracy)


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _create_registered_model(client, name: str) -> None:
    """Create registered model ``name``; another publisher creating it at the same moment is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Registered by airflow-provider-resque")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" and not _exists(client, name):
            raise
