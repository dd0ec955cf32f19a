"""Decision quality of the gate's policies on the evidence runs, against an oracle that knows the measured costs.

Usage::

    python benchmarks/decision_quality.py [--runs docs/evidence/dist_runs.csv] [--out docs/evidence] [--name digits]

For every distribution-shift run the oracle's decision is

- **reuse** when the production model already meets the target on the shifted held-out split (fine-tuning needed
  0 steps);
- **rebuild** when training from scratch reached the target in fewer steps than fine-tuning, or fine-tuning was
  censored (did not reach the target within the cap) and training from scratch was not;
- **retrain** otherwise.

Policies compared, each from the columns the gate itself computed (``benchmarks/evidence_runs.py`` calls the
gate's ``calibrate``):

- ``fixed``: today's fixed thresholds (RESQUE <= 0.0123 reuses; rebuild never) with the accuracy guard;
- ``calibrated``: the new default with labels, by the gate's own ``decide_calibrated`` (RESQUE against its null at
  alpha = 0.01, the measured accuracy's interval against the target, the accuracy guard), with the cost prior
  refitted *without the run's shift type* (leave-one-shift-type-out) deciding rebuild against retrain;
- ``calibrated_label_free``: the same with the model's predicted labels and the ATC accuracy estimate.

Reported per policy: the confusion matrix (oracle x chosen), the false-reuse rate (needed retraining or
rebuilding, was reused), the false-alarm rate on unshifted runs, and the wasted cost (optimizer steps the chosen
branch spends beyond the oracle's; a false reuse spends none but leaves the model below target, counted apart).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from resque_airflow.core.costmodel import CostModel  # noqa: E402
from resque_airflow.core.null import NullCheck  # noqa: E402
from resque_airflow.core.policy import DEFAULT_TARGET_RELATIVE, Accuracy, CostForecast, decide_calibrated  # noqa: E402
from resque_airflow.core.prior import PRIOR_SIGNALS, load_prior, transfer_signals  # noqa: E402

FIXED_REUSE = 0.0123  # the shipped reuse threshold before the calibrated decision
DECISIONS = ("reuse", "retrain", "rebuild")


def _f(v: str | None) -> float | None:
    try:
        return None if v in (None, "") else float(v)
    except ValueError:
        return None


def oracle(r: dict) -> str:
    steps, rebuild = _f(r["steps_to_target"]), _f(r["rebuild_steps_to_target"])
    ft_censored, rb_censored = bool(_f(r["censored"])), bool(_f(r["rebuild_censored"]))
    if not ft_censored and steps == 0:
        return "reuse"
    if not rb_censored and (ft_censored or rebuild < steps):
        return "rebuild"
    return "retrain"


def spent(r: dict, decision: str) -> float:
    """Optimizer steps the branch spends (a censored run spends its whole cap, which ``steps_to_target`` holds)."""
    return {"reuse": 0.0, "retrain": _f(r["steps_to_target"]), "rebuild": _f(r["rebuild_steps_to_target"])}[decision]


def fixed_policy(r: dict) -> str:
    if _f(r["resque_dist"]) > FIXED_REUSE:
        return "retrain"
    acc, ref = _f(r.get("accuracy")), _f(r.get("reference_accuracy"))
    if acc is not None and ref and acc < DEFAULT_TARGET_RELATIVE * ref:
        return "retrain"  # the accuracy guard
    return "reuse"


def _prior_rows(rows: list[dict]) -> tuple[list[dict], list[float]]:
    xs, ys = [], []
    for r in rows:
        steps, rebuild = _f(r["steps_to_target"]), _f(r["rebuild_steps_to_target"])
        if _f(r["censored"]) or _f(r["rebuild_censored"]) or not rebuild:
            continue
        xs.append(_signals(r, labelled=True))
        ys.append(steps / rebuild)
    return xs, ys


def _signals(r: dict, *, labelled: bool) -> dict:
    suffix = "" if labelled else "_predicted"
    score = _f(r["resque_dist"] if labelled else r["resque_dist_predicted"]) or 0.0
    acc = _f(r["accuracy"] if labelled else r["atc_accuracy"])
    return transfer_signals(score, _f(r[f"null_q{suffix}"]), acc, _f(r["reference_accuracy"]))


def calibrated_policy(r: dict, prior: CostModel, *, labelled: bool) -> str:
    """The product's own rule (:func:`~resque_airflow.core.policy.decide_calibrated`) on the run's columns."""
    suffix, acc_col = ("", "accuracy") if labelled else ("_predicted", "atc_accuracy")
    score = _f(r["resque_dist"] if labelled else r["resque_dist_predicted"]) or 0.0
    detection = NullCheck(score, _f(r[f"null_q{suffix}"]), _f(r[f"p_value{suffix}"]), alpha=0.01, n_replicates=1000)
    accuracy = None
    if _f(r.get(acc_col)) is not None:
        accuracy = Accuracy(_f(r[acc_col]), _f(r[f"{acc_col}_low"]), _f(r[f"{acc_col}_high"]),
                            "measured" if labelled else "atc")  # fmt: skip
    ref = _f(r["reference_accuracy"])
    pred = prior.predict(_signals(r, labelled=labelled))
    cost = CostForecast(pred.value, pred.low, pred.high, 1.0, "x training", "prior")  # relative to training anew
    verdict = decide_calibrated(detection, n_samples=int(_f(r["n_new"])), accuracy=accuracy,
                                target=None if ref is None else DEFAULT_TARGET_RELATIVE * ref, cost=cost)  # fmt: skip
    return verdict.decision.value


def evaluate(rows: list[dict]) -> dict:
    """Every policy's confusion matrix, false-reuse and false-alarm rates and wasted steps (see the docstring)."""
    priors, shipped = {}, 0
    for shift in {r["shift_type"] for r in rows}:
        xs, ys = _prior_rows([r for r in rows if r["shift_type"] != shift])
        if len(xs) >= 10:
            priors[shift] = CostModel(signals=PRIOR_SIGNALS).fit(xs, ys)
        else:  # no uncensored rebuilds to fit on: the gate's own cold start, the shipped prior
            priors[shift], shipped = load_prior(), shipped + 1
    policies = {
        "fixed": fixed_policy,
        "calibrated": lambda r: calibrated_policy(r, priors[r["shift_type"]], labelled=True),
        "calibrated_label_free": lambda r: calibrated_policy(r, priors[r["shift_type"]], labelled=False),
    }
    out = {
        "n_runs": len(rows),
        "oracle": dict(Counter(oracle(r) for r in rows)),
        "prior": "shipped (fitted on the digits runs)" if shipped else "refitted leave-one-shift-type-out",
    }
    for name, policy in policies.items():
        chosen = [(oracle(r), policy(r), r) for r in rows]
        needed = [c for c in chosen if c[0] != "reuse"]
        unshifted = [c for c in chosen if c[2]["shift_type"] == "none"]
        wasted = [max(spent(r, d) - spent(r, o), 0.0) for o, d, r in chosen if d != "reuse"]
        out[name] = {
            "confusion": {
                o: {d: sum(1 for a, b, _ in chosen if (a, b) == (o, d)) for d in DECISIONS} for o in DECISIONS
            },
            "false_reuse_rate": sum(d == "reuse" for _, d, _ in needed) / max(len(needed), 1),
            "false_alarm_rate_unshifted": sum(d != "reuse" for _, d, _ in unshifted) / max(len(unshifted), 1),
            "n_unshifted": len(unshifted),
            "wasted_steps": float(sum(wasted)),
            "agreement": sum(o == d for o, d, _ in chosen) / len(chosen),
        }
    shifted = [r for r in rows if r["shift_type"] != "none" and _f(r.get("atc_accuracy")) is not None]
    errors = [abs(_f(r["atc_accuracy"]) - _f(r["accuracy"])) for r in shifted]
    out["atc_mean_absolute_error"] = sum(errors) / max(len(errors), 1)
    out["atc_n"] = len(errors)
    return out


def to_markdown(result: dict, name: str) -> str:
    lines = [
        f"### Decision quality: {name} ({result['n_runs']} runs; oracle {result['oracle']}; cost prior "
        f"{result['prior']})",
        "",
    ]
    lines += ["| policy | agreement | false reuse | false alarm (unshifted) | wasted steps |", "|---|---|---|---|---|"]
    for p in ("fixed", "calibrated", "calibrated_label_free"):
        r = result[p]
        far = f"{r['false_alarm_rate_unshifted']:.3f} (n={r['n_unshifted']})"
        lines.append(f"| {p} | {r['agreement']:.2f} | {r['false_reuse_rate']:.3f} | {far} | {r['wasted_steps']:,.0f} |")
    for p in ("fixed", "calibrated", "calibrated_label_free"):
        lines += ["", f"Confusion, {p} (rows: oracle, columns: chosen):", "", "| | " + " | ".join(DECISIONS) + " |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {o} | " + " | ".join(str(result[p]["confusion"][o][d]) for d in DECISIONS) + " |"
                  for o in DECISIONS]  # fmt: skip
    lines += ["", f"ATC accuracy estimate vs measured accuracy on {result['atc_n']} shifted runs: mean absolute error "
              f"{result['atc_mean_absolute_error']:.3f}."]  # fmt: skip
    return "\n".join(lines) + "\n"


# The Fashion-MNIST benchmark flattens the gate's whole result into ``gate_*`` columns: the same fields, other names.
FASHION_COLUMNS = {
    "null_q": "gate_calibration_detection_null_quantile", "p_value": "gate_calibration_detection_p_value",
    "detected": "gate_calibration_detection_detected",
    "null_q_predicted": "gate_calibration_companions_resque_dist_predicted_null_quantile",
    "p_value_predicted": "gate_calibration_companions_resque_dist_predicted_p_value",
    "detected_predicted": "gate_calibration_companions_resque_dist_predicted_detected",
    "accuracy": "gate_calibration_accuracy_measured_value", "accuracy_low": "gate_calibration_accuracy_measured_low",
    "accuracy_high": "gate_calibration_accuracy_measured_high",
    "atc_accuracy": "gate_calibration_accuracy_estimated_value",
    "atc_accuracy_low": "gate_calibration_accuracy_estimated_low",
    "atc_accuracy_high": "gate_calibration_accuracy_estimated_high", "n_new": "gate_n_samples",
}  # fmt: skip


def fashion_rows(runs: Path, summary: Path) -> dict[str, list[dict]]:
    """The Fashion-MNIST runs per model family, in this module's column names.

    The target is the benchmark's own (0.95 x the source model's clean test accuracy), so ``reference_accuracy``
    is set to target / 0.95; the booleans are written as ``True``/``False`` there.
    """
    families = json.loads(summary.read_text())["families"]
    out: dict[str, list[dict]] = {}
    with open(runs, newline="") as f:
        for r in csv.DictReader(f):
            row = dict(r) | {ours: r.get(theirs, "") for ours, theirs in FASHION_COLUMNS.items()}
            for k in ("detected", "detected_predicted", "censored", "rebuild_censored"):
                row[k] = {"True": "1", "False": "0"}.get(row.get(k, ""), row.get(k, ""))
            target = families[r["model_family"]]["source"]["target_accuracy"]
            row["reference_accuracy"] = str(target / DEFAULT_TARGET_RELATIVE)
            if not row.get("rebuild_steps_to_target"):  # rebuilt for one seed only: unknown means "not cheaper"
                row["rebuild_steps_to_target"], row["rebuild_censored"] = "inf", "1"
            out.setdefault(r["model_family"], []).append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "docs/evidence/dist_runs.csv")
    p.add_argument("--out", type=Path, default=REPO / "docs/evidence")
    p.add_argument("--name", default="digits")
    p.add_argument(
        "--fashion-summary", type=Path, help="score Fashion-MNIST runs (with their summary.json), per family"
    )
    args = p.parse_args(argv)
    if args.fashion_summary:
        groups = fashion_rows(args.runs, args.fashion_summary)
    else:
        with open(args.runs, newline="") as f:
            groups = {args.name: list(csv.DictReader(f))}
    for name, rows in groups.items():
        result = evaluate(rows) | {"runs": str(args.runs)}
        (args.out / f"decision_quality_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"decision_quality_{name}.md").write_text(to_markdown(result, name))
        print(to_markdown(result, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
