"""Measured retraining cost (DESIGN.md 2.4): train until held-out accuracy reaches a target, and record what it took.

:func:`fine_tune` trains a torch classifier with mini-batch SGD until its accuracy on a held-out split reaches
``target_accuracy`` (checked at every quarter epoch by default) or ``max_epochs`` is spent, and returns a
:class:`RetrainCost`: steps and epochs to target, gradient norms, parameter change, wall time, energy and emissions
(codecarbon's ``OfflineEmissionsTracker``, no network). Fine-tuning versus rebuilding is the caller's choice: a
rebuild is the same call on a freshly initialised model.

torch and codecarbon are imported here; this module is imported only by retrain tasks and benchmarks.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from resque_airflow.errors import ResqueInputError
from resque_airflow.registry.names import CENSORED_METRIC, COST_METRICS, FINAL_ACCURACY_METRIC

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainCost:
    """What one training run cost. Metric names match :data:`resque_airflow.registry.names.COST_METRICS`.

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

    steps_to_target: int
    epochs_to_target: float
    censored: bool
    grad_norm_first: float
    grad_norm_mean: float
    param_change: float
    wall_s: float
    energy_kwh: float
    emissions_kg: float
    final_accuracy: float
    initial_accuracy: float
    target_accuracy: float
    steps_run: int
    epochs_run: float

    def to_metrics(self) -> dict[str, float]:
        """MLflow metrics: every name of ``COST_METRICS`` plus ``censored`` (0/1) and ``final_accuracy``."""
        d = asdict(self)
        out = {name: float(d[name]) for name in COST_METRICS}
        out[CENSORED_METRIC] = float(self.censored)
        out[FINAL_ACCURACY_METRIC] = float(self.final_accuracy)
        return out


@functools.lru_cache(maxsize=1)
def _known_country_codes() -> frozenset[str] | None:
    try:
        from codecarbon.input import DataSource

        return frozenset(DataSource().get_global_energy_mix_data())
    except Exception as exc:  # codecarbon missing or its data moved: energy is then not measured at all
        log.warning("codecarbon: cannot read its country data (%s); energy and emissions will be NaN", exc)
        return None


def validate_country_iso_code(code: str) -> str:
    """Return ``code`` (upper-cased) if codecarbon knows its energy mix, else raise :class:`ResqueInputError`.

    codecarbon's tracker swallows an unknown country code and reports nonsense, so it is checked here first.
    When codecarbon's data cannot be read at all, the code is returned unchecked (energy will be NaN anyway).
    """
    if not isinstance(code, str) or len(code.strip()) != 3:
        raise ResqueInputError(
            f"country_iso_code: expected a 3-letter ISO 3166-1 alpha-3 code such as 'USA', got {code!r}"
        )
    code = code.strip().upper()
    known = _known_country_codes()
    if known is not None and code not in known:
        raise ResqueInputError(
            f"country_iso_code: codecarbon has no energy mix for {code!r}; use an ISO 3166-1 alpha-3 code it knows "
            f"(e.g. 'USA', 'FRA', 'DEU'; {len(known)} known)"
        )
    return code


class _EnergyMeter:
    """codecarbon ``OfflineEmissionsTracker`` around a block; NaN (and one warning) if anything in it fails."""

    def __init__(self, country_iso_code: str, enabled: bool) -> None:
        self.country = country_iso_code
        self.enabled = enabled
        self.tracker = None
        self.energy_kwh = math.nan
        self.emissions_kg = math.nan

    def __enter__(self) -> _EnergyMeter:
        if not self.enabled:
            return self
        try:
            from codecarbon import OfflineEmissionsTracker

            # codecarbon logs at INFO/WARNING on every tracker; keep the run's log readable.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            with warnings.catch_warnings():
                # codecarbon 3 deprecates save_to_file in favour of output_methods; False is still honoured.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.tracker = OfflineEmissionsTracker(
                    country_iso_code=self.country, save_to_file=False, log_level="error"
                )
            self.tracker.start()
        except Exception as exc:
            log.warning("codecarbon: could not start the tracker (%s); energy and emissions recorded as NaN", exc)
            self.tracker = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.tracker is None:
            return
        try:
            emissions = self.tracker.stop()
            data = self.tracker.final_emissions_data
            self.emissions_kg = float(emissions) if emissions is not None else math.nan
            self.energy_kwh = float(data.energy_consumed) if data is not None else math.nan
        except Exception as exc:
            log.warning("codecarbon: could not stop the tracker (%s); energy and emissions recorded as NaN", exc)


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
    if not 0 < eval_every_fraction <= 1:
        raise ResqueInputError(f"eval_every_fraction: expected a value in (0, 1], got {eval_every_fraction}")
    if max_epochs <= 0 or batch_size < 1 or lr <= 0:
        raise ResqueInputError(
            f"max_epochs, batch_size, lr: expected positive values, got {max_epochs}, {batch_size}, {lr}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ResqueInputError("model: has no trainable parameters")
    device = params[0].device
    xt, yt = _as_tensors(train_x, train_y, device, "train data")
    xh, yh = _as_tensors(heldout_x, heldout_y, device, "held-out data")

    n = xt.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    checks = _check_points(steps_per_epoch, eval_every_fraction)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    start = [p.detach().clone() for p in params]

    grad_norms: list[float] = []
    first_epoch_norms: list[float] = []
    hit_steps: int | None = None
    hit_epochs: float | None = None
    steps = 0
    epochs_run = 0.0
    was_training = model.training
    with _EnergyMeter(country, measure_energy) as meter:
        t0 = time.perf_counter()
        initial = acc = accuracy(model, xh, yh)
        if acc >= target_accuracy:
            hit_steps, hit_epochs = 0, 0.0
        epoch = 0
        while not (stop_at_target and hit_steps is not None) and epoch < max_epochs:
            model.train()
            order = torch.randperm(n, generator=gen).to(device)
            check_iter = iter(checks)
            next_check = next(check_iter)
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                g = _global_grad_norm(params)
                grad_norms.append(g)
                if epoch == 0:
                    first_epoch_norms.append(g)
                opt.step()
                steps += 1
                if b + 1 == next_check[0]:
                    epochs_run = epoch + next_check[1]
                    acc = accuracy(model, xh, yh)
                    if hit_steps is None and acc >= target_accuracy:
                        hit_steps, hit_epochs = steps, epochs_run
                    if (stop_at_target and hit_steps is not None) or epochs_run >= max_epochs - 1e-9:
                        break
                    next_check = next(check_iter, (0, 0.0))
            epoch += 1
        wall = time.perf_counter() - t0
    model.train(was_training)

    if not grad_norms:
        # No step was needed: report the gradient the first epoch would have started from (weights untouched).
        grad_norms = first_epoch_norms = _probe_grad_norms(model, params, loss_fn, xt, yt, batch_size, seed)
    with torch.no_grad():
        change = float(
            np.mean([float((p - s).norm(2)) / math.sqrt(p.numel()) for p, s in zip(params, start, strict=True)])
        )
    censored = hit_steps is None
    cost = RetrainCost(
        steps_to_target=steps if censored else int(hit_steps),
        epochs_to_target=float(epochs_run if censored else hit_epochs),
        censored=censored,
        grad_norm_first=float(np.mean(first_epoch_norms)),
        grad_norm_mean=float(np.mean(grad_norms)),
        param_change=change,
        wall_s=float(wall),
        energy_kwh=meter.energy_kwh,
        emissions_kg=meter.emissions_kg,
        final_accuracy=float(acc),
        initial_accuracy=float(initial),
        target_accuracy=float(target_accuracy),
        steps_run=int(steps),
        epochs_run=float(epochs_run),
    )
    log.info(
        "fine_tune: target %.4f %s after %d steps (%.2f epochs); accuracy %.4f -> %.4f; %.2f s",
        target_accuracy, "NOT reached" if censored else "reached", cost.steps_to_target, cost.epochs_to_target,
        initial, acc, wall,
    )  # fmt: skip
    return cost


def _probe_grad_norms(model, params, loss_fn, xt, yt, batch_size: int, seed: int) -> list[float]:
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
