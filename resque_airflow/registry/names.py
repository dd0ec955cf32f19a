"""Names of the audit trail in MLflow (DESIGN.md section 5). They are public interface: document any change.

Runs
    Every run this package writes carries the tag ``resque.kind``:

    - ``gate``: one gate decision (experiment ``resque-gate`` by default).
    - ``retrain`` / ``rebuild``: a retraining run triggered by a gate (``resque.gate_run_id`` says which).
    - ``train``: the training cost of a published model version, recorded at publish time.

Gate run contents
    params  ``GATE_PARAMS``; metrics ``SCORE_METRIC`` plus every companion signal under its own name
    (``resque_dist``, ``resque_dist_predicted``, ``resque_dist_none``, ``mmd``, ``ks``, ``separability``,
    ``confidence_drop``, ``acc_drop``, ``resque_task``) and, with a cost model, ``predicted_<cost>`` /
    ``predicted_<cost>_low`` / ``predicted_<cost>_high``; artifact ``GATE_RESULT_ARTIFACT`` (the full JSON result,
    per-class angles included).

Model-version tags
    ``LAST_GATE_TAG`` (one JSON object: score, decision, gate run id, time, mode) and the ``MV_TAG_*`` below, each
    one field of it; set at publish time: ``MODEL_SHA_TAG``, ``TRAIN_RUN_MV_TAG`` and ``TORCH_FACTORY_TAG``.
"""

KIND_TAG = "resque.kind"
KIND_GATE = "gate"
KIND_RETRAIN = "retrain"
KIND_REBUILD = "rebuild"
KIND_TRAIN = "train"

DEFAULT_EXPERIMENT = "resque-gate"
RETRAIN_EXPERIMENT = "resque-retrain"
MODELS_EXPERIMENT = "resque-models"  # where published versions' runs go
GATE_RUN_NAME = "resque-gate"  # the MLflow run name of every gate run
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to choose the experiment's layout
EXPERIMENT_KIND_ML = "custom_model_development"

# Tags on gate runs.
GATE_KEY_TAG = "resque.gate_key"  # dag_id/run_id/task_id/map_index: one gate run per Airflow task instance
DECISION_TAG = "resque.decision"
BRANCH_TAG = "resque.branch"  # the task ids the gate followed
STATUS_TAG = "resque.status"  # "scoring" while running, then "decided" or "failed"
STATUS_SCORING = "scoring"
STATUS_DECIDED = "decided"
STATUS_FAILED = "failed"
POLICY_TAG = "resque.policy"  # one of the POLICY_* values: what produced the decision
POLICY_THRESHOLDS = "thresholds"
POLICY_ACCURACY = "thresholds+accuracy"  # thresholds said reuse, the accuracy guard said retrain
POLICY_COST_MODEL = "cost_model"
POLICY_DATA_ISSUE = "data_issue"  # the batch failed a data-sanity check
# Calibrated decisions (core.policy): "calibrated", "calibrated+accuracy", "calibrated+cost", "calibrated+prices".
REASON_TAG = "resque.reason"  # the decision's one-sentence explanation
ERROR_TAG = "resque.error"  # on failed gate runs: the exception type and message
ACTION_TAG = "resque.action"  # set by the branch that acted on the decision (e.g. "reused")
ACTION_REUSED = "reused"
MODEL_NAME_TAG = "resque.model_name"
MODEL_VERSION_TAG = "resque.model_version"

# Params of gate runs.
GATE_PARAMS = (
    "model_name", "model_version", "model_alias", "model_sha256", "data_uri", "data_hash", "mode", "layer",
    "label_source", "provider", "n_samples", "n_classes", "reuse_threshold", "rebuild_threshold", "policy",
    "airflow_dag_id", "airflow_run_id", "airflow_task_id", "airflow_try_number",
)  # fmt: skip

SCORE_METRIC = "resque_score"
# Calibration metrics of a dist-mode gate run: the score's interval, its null at this batch size, the accuracy.
CALIBRATION_METRICS = (
    "resque_score_low", "resque_score_high", "null_quantile", "p_value", "shift_detected", "accuracy_measured",
    "accuracy_measured_low", "accuracy_measured_high", "accuracy_estimated", "accuracy_estimated_low",
    "accuracy_estimated_high", "excess", "accuracy_drop_relative",
)  # fmt: skip
ANGLE_METRIC_PREFIX = "angle_class_"  # + class index: the per-class angle (also in GATE_RESULT_ARTIFACT)
SIGNAL_METRICS = (
    "resque_dist", "resque_dist_predicted", "resque_dist_none", "mmd", "ks", "separability", "confidence_drop",
    "acc_drop", "resque_task",
)  # fmt: skip
GATE_RESULT_ARTIFACT = "resque/gate_result.json"

# Tags on the scored model version (the audit trail on the registry side).
MV_TAG_SCORE = "resque.last_score"
MV_TAG_DECISION = "resque.last_decision"
MV_TAG_GATE_RUN = "resque.last_gate_run_id"
MV_TAG_TIME = "resque.last_gate_time"
MV_TAG_MODE = "resque.last_mode"
LAST_GATE_TAG = "resque.last_gate"  # the JSON record the MV_TAG_* derive from (written last: authoritative)
# Each MV_TAG_* is one field of LAST_GATE_TAG's JSON object.
MV_TAG_FIELDS = (
    (MV_TAG_SCORE, "score"), (MV_TAG_DECISION, "decision"), (MV_TAG_GATE_RUN, "run_id"), (MV_TAG_TIME, "time"),
    (MV_TAG_MODE, "mode"),
)  # fmt: skip
MODEL_SHA_TAG = "resque.model_sha256"  # set at publish: the sha256 of the version's model.onnx
TORCH_FACTORY_TAG = "resque.torch_factory"  # set at publish: ``module:callable`` rebuilding the torch model

# Retrain / rebuild / train runs.
GATE_RUN_TAG = "resque.gate_run_id"  # on retrain/rebuild runs: the gate run that triggered them
SOURCE_VERSION_TAG = "resque.source_version"
TRAIN_RUN_MV_TAG = "resque.train_run_id"  # on a model version: the run holding its training cost
COST_METRICS = (
    "steps_to_target", "epochs_to_target", "grad_norm_first", "grad_norm_mean", "param_change", "wall_s",
    "energy_kwh", "emissions_kg",
)  # fmt: skip
CENSORED_METRIC = "censored"  # 1.0 when the target was not reached within the cap
FINAL_ACCURACY_METRIC = "final_accuracy"
REFERENCE_ACCURACY_METRIC = "reference_accuracy"  # on a published version's run: accuracy on its reference data

# Artifacts of a published model version's run.
MODEL_ARTIFACT = "model"  # mlflow.onnx model folder (model.onnx inside)
WEIGHTS_ARTIFACT = "torch"  # optional state_dict (.safetensors-free: a torch.save file loaded weights_only=True)
