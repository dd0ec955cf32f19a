"""Measured retraining cost (DESIGN.md 2.4): train until held-out accuracy reaches a target, and record what it took.

:func:`fine_tune` trains a torch classifier with mini-batch SGD until its accuracy on a held-out split reaches
``target_accuracy`` (checked at every quarter epoch by default) or ``max_epochs`` is spent, and returns a
:class:`RetrainCost`: steps and epochs to target, gradient norms, parameter change, wall time, energy and emissions
(codecarbon's ``OfflineEmissionsTracker``, no network; see :mod:`resque_airflow.runtime.energy`). Fine-tuning versus
rebuilding is the caller's choice: a rebuild is the same call on a freshly initialised model.

torch and codecarbon are imported here; this module is imported only by retrain tasks, the examples and benchmarks.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from resque_airflow.errors import ResqueInputError
from resque_airflow.runtime.energy import EnergyMeter, validate_country_iso_code

log = logging.getLogger(__name__)

# The MLflow metrics of a cost are named after its fields: those marked _COST, then censored and final_accuracy.
# registry/names.py spells the same names for the audit trail's readers (COST_METRICS, CENSORED_METRIC,
# FINAL_ACCURACY_METRIC); runtime does not import registry (the layers point one way, docs/ARCHITECTURE.md), so
# tests/test_retrain.py checks that the two agree.
_COST = {"cost_metric": True}


@dataclass(frozen=True)
class RetrainCost:
    """What one training run cost. Metric names match :data:`resque_airflow.registry.names.COST_METRICS`
    (the fields marked as cost metrics, in their order).

    Attributes:
        steps_to_target: optimizer steps until the first accuracy check at or above the target (0 when the model
            met it before training); when censored, the steps run (a lower bound).
        epochs_to_target: the same in epochs, at the resolution of the checks (quarter epochs by default);
            ``max_epochs`` when censored.
        censored: True when the target was not reached within ``max_epochs``.
        grad_norm_first: mean global L2 gradient norm per step over the first epoch (the steps run, if the target
            was reached within it). With no step run, the mean over one epoch of batches at the starting weights,
            without updating them.
        grad_norm_mean: mean global L2 gradient norm per step over all steps run (same fallback).
        param_change: mean over parameter tensors of ``||theta - theta_start||_2 / sqrt(numel)`` at the end.
        wall_s: seconds spent training and checking accuracy.
        energy_kwh: energy measured by codecarbon over the same span (NaN when not measured).
        emissions_kg: kg CO2eq from codecarbon's country energy mix (NaN when not measured).
        final_accuracy: held-out accuracy at the last check.
        initial_accuracy: held-out accuracy before training.
        target_accuracy: the target that was asked for.
        steps_run, epochs_run: what was actually run (equal to the ``*_to_target`` values when the run stopped at
            the target).
    """

    steps_to_target: int = field(metadata=_COST)
    epochs_to_target: float = field(metadata=_COST)
    censored: bool
    grad_norm_first: float = field(metadata=_COST)
    grad_norm_mean: float = field(metadata=_COST)
    param_change: float = field(metadata=_COST)
    wall_s: float = field(metadata=_COST)
    energy_kwh: float = field(metadata=_COST)
    emissions_kg: float = field(metadata=_COST)
    final_accuracy: float
    initial_accuracy: float
    target_accuracy: float
    steps_run: int
    epochs_run: float

    def to_metrics(self) -> dict[str, float]:
        """MLflow metrics, as floats: every cost metric (``COST_METRICS``), ``censored`` (0/1), ``final_accuracy``."""
        out = {f.name: float(getattr(self, f.name)) for f in fields(self) if f.metadata.get("cost_metric")}
        out["censored"] = float(self.censored)
        out["final_accuracy"] = float(self.final_accuracy)
        return out


def _as_tensors(x: np.ndarray, y: np.ndarray, device: torch.device, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
        raise ResqueInputError(f"{what}: expected x (N, ...) and y (N,) with N > 0, got {x.shape} and {y.shape}")
    if y.dtype.kind not in "iu":
        raise ResqueInputError(f"{what}: labels must be integers, got dtype {y.dtype}")
    return (
        torch.as_tensor(np.ascontiguousarray(x, np.float32), device=device),
        torch.as_tensor(y.astype(np.int64), device=device),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``x`` (``(N, ...)``) against ``y`` (``(N,)``), in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / x.shape[0]


def _global_grad_norm(params: list[nn.Parameter]) -> float:
    norms = [p.grad.detach().norm(2) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _check_points(steps_per_epoch: int, eval_every_fraction: float) -> list[tuple[int, float]]:
    """(step within the epoch, fraction of the epoch) at which accuracy is checked; the last is the epoch's end."""
    q = max(1, math.ceil(1.0 / eval_every_fraction - 1e-9))
    points: dict[int, float] = {}
    for i in range(1, q + 1):
        step = max(1, round(i * steps_per_epoch / q))
        points.setdefault(step, i / q)  # tiny epochs: several fractions fall on one step; keep the earliest
    return sorted(points.items())


def _check_arguments(eval_every_fraction: float, max_epochs: float, batch_size: int, lr: float) -> None:
    if not 0 < eval_every_fraction <= 1:
        raise ResqueInputError(f"eval_every_fraction: expected a value in (0, 1], got {eval_every_fraction}")
    if max_epochs <= 0 or batch_size < 1 or lr <= 0:
        raise ResqueInputError(
            f"max_epochs, batch_size, lr: expected positive values, got {max_epochs}, {batch_size}, {lr}"
        )


@dataclass
class _Run:
    """What the training loop works on: the model, its data on the model's device, the optimiser and the plan."""

    model: nn.Module
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    loss_fn: nn.Module
    xt: torch.Tensor  # (N, ...) training inputs
    yt: torch.Tensor  # (N,) int64 training labels
    xh: torch.Tensor  # (M, ...) held-out inputs
    yh: torch.Tensor  # (M,) int64 held-out labels
    batch_size: int
    steps_per_epoch: int
    checks: list[tuple[int, float]]  # from _check_points
    gen: torch.Generator  # data order
    target_accuracy: float
    max_epochs: float
    stop_at_target: bool


@dataclass
class _Progress:
    """The loop's state: steps and epochs run, when the target was first reached, accuracy, gradient norms."""

    steps: int = 0
    epochs_run: float = 0.0
    hit_steps: int | None = None  # steps when the target was first reached, None while it is not
    hit_epochs: float | None = None
    initial_accuracy: float = math.nan
    accuracy: float = math.nan  # at the last check
    grad_norms: list[float] = field(default_factory=list)  # one per step, all epochs
    first_epoch_norms: list[float] = field(default_factory=list)

    def record_accuracy(self, accuracy: float, target: float) -> None:
        self.accuracy = accuracy
        if self.hit_steps is None and accuracy >= target:
            self.hit_steps, self.hit_epochs = self.steps, self.epochs_run

    def stopped_at_target(self, run: _Run) -> bool:
        return run.stop_at_target and self.hit_steps is not None


def _prepare(
    model: nn.Module,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    lr: float,
    batch_size: int,
    eval_every_fraction: float,
    seed: int,
    momentum: float,
    weight_decay: float,
    target_accuracy: float,
    max_epochs: float,
    stop_at_target: bool,
) -> _Run:
    """Check the model and data, move the data to the model's device, and build the optimiser and the plan."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ResqueInputError("model: has no trainable parameters")
    device = params[0].device
    xt, yt = _as_tensors(data[0], data[1], device, "train data")
    xh, yh = _as_tensors(data[2], data[3], device, "held-out data")
    steps_per_epoch = math.ceil(xt.shape[0] / batch_size)
    return _Run(
        model=model, params=params,
        opt=torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        loss_fn=nn.CrossEntropyLoss(), xt=xt, yt=yt, xh=xh, yh=yh, batch_size=batch_size,
        steps_per_epoch=steps_per_epoch, checks=_check_points(steps_per_epoch, eval_every_fraction),
        gen=torch.Generator().manual_seed(int(seed)), target_accuracy=target_accuracy, max_epochs=max_epochs,
        stop_at_target=stop_at_target,
    )  # fmt: skip


def _step(run: _Run, idx: torch.Tensor) -> float:
    """One SGD step on the rows ``idx``; returns the global gradient norm before the update."""
    run.opt.zero_grad(set_to_none=True)
    run.loss_fn(run.model(run.xt[idx]), run.yt[idx]).backward()
    g = _global_grad_norm(run.params)
    run.opt.step()
    return g


def _train_epoch(run: _Run, state: _Progress, epoch: int) -> None:
    """One epoch in a seeded random order, checking held-out accuracy at the check points.

    Ends early at the first check that reaches the target (when stopping there) or reaches ``max_epochs``.
    """
    run.model.train()
    order = torch.randperm(run.xt.shape[0], generator=run.gen).to(run.xt.device)
    check_iter = iter(run.checks)
    next_check = next(check_iter)
    for b in range(run.steps_per_epoch):
        g = _step(run, order[b * run.batch_size : (b + 1) * run.batch_size])
        state.grad_norms.append(g)
        if epoch == 0:
            state.first_epoch_norms.append(g)
        state.steps += 1
        if b + 1 == next_check[0]:
            state.epochs_run = epoch + next_check[1]
            state.record_accuracy(accuracy(run.model, run.xh, run.yh), run.target_accuracy)
            if state.stopped_at_target(run) or state.epochs_run >= run.max_epochs - 1e-9:
                return
            next_check = next(check_iter, (0, 0.0))


def _train(run: _Run) -> _Progress:
    """Check accuracy at the start, then train epoch by epoch until the target (when stopping there) or the cap."""
    state = _Progress()
    state.initial_accuracy = accuracy(run.model, run.xh, run.yh)
    state.record_accuracy(state.initial_accuracy, run.target_accuracy)  # met before training: 0 steps, 0 epochs
    epoch = 0
    while not state.stopped_at_target(run) and epoch < run.max_epochs:
        _train_epoch(run, state, epoch)
        epoch += 1
    return state


def _param_change(params: list[nn.Parameter], start: list[torch.Tensor]) -> float:
    """Mean over parameter tensors of ``||theta - theta_start||_2 / sqrt(numel)``."""
    with torch.no_grad():
        return float(
            np.mean([float((p - s).norm(2)) / math.sqrt(p.numel()) for p, s in zip(params, start, strict=True)])
        )


def fine_tune(
    model: nn.Module,
    train_x: np.ndarray,
    train_y: np.ndarray,
    heldout_x: np.ndarray,
    heldout_y: np.ndarray,
    *,
    target_accuracy: float,
    max_epochs: float,
    lr: float,
    batch_size: int,
    eval_every_fraction: float = 0.25,
    seed: int,
    country_iso_code: str = "USA",
    measure_energy: bool = True,
    stop_at_target: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> RetrainCost:
    """Train ``model`` in place until held-out accuracy reaches ``target_accuracy``; return what it cost.

    SGD with momentum on the mean cross-entropy, mini-batches in a seeded random order (deterministic given
    ``seed`` on a given machine and thread count). Accuracy on the held-out split is checked before training and
    every ``eval_every_fraction`` of an epoch (at least every quarter epoch is what the cost measures assume).

    Args:
        model: a classifier returning ``(N, K)`` logits; trained in place (all parameters that require grad).
            For a rebuild pass a freshly initialised model; for a new task, a model with a new head.
        train_x, train_y: ``(N, ...)`` float inputs and ``(N,)`` int labels to train on.
        heldout_x, heldout_y: ``(M, ...)`` and ``(M,)`` held-out data for the accuracy checks.
        target_accuracy: held-out accuracy in [0, 1] to reach (above 1 makes it unreachable: a fixed-length run).
        max_epochs: cap on training, in epochs (a fraction is allowed; rounded up to a check point).
        lr: learning rate.
        batch_size: mini-batch size.
        eval_every_fraction: fraction of an epoch between accuracy checks (0.25 -> quarter epochs).
        seed: seed of the data order.
        country_iso_code: ISO 3166-1 alpha-3 code of the energy mix for emissions (validated).
        measure_energy: measure energy and emissions with codecarbon (NaN otherwise).
        stop_at_target: stop at the first check at or above the target (default); False trains for ``max_epochs``
            and still reports when the target was first reached.
        momentum, weight_decay: SGD settings.

    Returns:
        A :class:`RetrainCost`.

    Raises:
        ResqueInputError: on malformed data, parameters out of range, or a country code codecarbon does not know.
    """
    country = validate_country_iso_code(country_iso_code)
    _check_arguments(eval_every_fraction, max_epochs, batch_size, lr)
    run = _prepare(
        model, (train_x, train_y, heldout_x, heldout_y), lr=lr, batch_size=batch_size,
        eval_every_fraction=eval_every_fraction, seed=seed, momentum=momentum, weight_decay=weight_decay,
        target_accuracy=target_accuracy, max_epochs=max_epochs, stop_at_target=stop_at_target,
    )  # fmt: skip
    start = [p.detach().clone() for p in run.params]
    was_training = model.training
    with EnergyMeter(country, measure_energy) as meter:
        t0 = time.perf_counter()
        state = _train(run)
        wall = time.perf_counter() - t0
    model.train(was_training)

    if not state.grad_norms:
        # No step was needed: report the gradient the first epoch would have started from (weights untouched).
        state.grad_norms = state.first_epoch_norms = _probe_grad_norms(
            model, run.params, run.loss_fn, run.xt, run.yt, batch_size, seed
        )
    censored = state.hit_steps is None
    cost = RetrainCost(
        steps_to_target=state.steps if censored else int(state.hit_steps),
        epochs_to_target=float(state.epochs_run if censored else state.hit_epochs),
        censored=censored,
        grad_norm_first=float(np.mean(state.first_epoch_norms)),
        grad_norm_mean=float(np.mean(state.grad_norms)),
        param_change=_param_change(run.params, start),
        wall_s=float(wall),
        energy_kwh=meter.energy_kwh,
        emissions_kg=meter.emissions_kg,
        final_accuracy=float(state.accuracy),
        initial_accuracy=float(state.initial_accuracy),
        target_accuracy=float(target_accuracy),
        steps_run=int(state.steps),
        epochs_run=float(state.epochs_run),
    )
    log.info(
        "fine_tune: target %.4f %s after %d steps (%.2f epochs); accuracy %.4f -> %.4f; %.2f s",
        target_accuracy, "NOT reached" if censored else "reached", cost.steps_to_target, cost.epochs_to_target,
        state.initial_accuracy, state.accuracy, wall,
    )  # fmt: skip
    return cost


def _probe_grad_norms(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    batch_size: int,
    seed: int,
) -> list[float]:
    """Per-batch global gradient norms over one epoch at the current weights, without updating them."""
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(xt.shape[0], generator=gen).to(xt.device)
    was_training = model.training
    model.train()
    norms = []
    for b in range(0, xt.shape[0], batch_size):
        idx = order[b : b + batch_size]
        for p in params:
            p.grad = None
        loss_fn(model(xt[idx]), yt[idx]).backward()
        norms.append(_global_grad_norm(params))
    for p in params:
        p.grad = None
    model.train(was_training)
    return norms
