"""Learning-rate schedule: linear warm-up, then cosine decay (a pure function)."""

from __future__ import annotations

import math

__desc__ = (
    "The learning rate rose linearly over {warmup_steps} warm-up steps to {lr}, then followed a "
    "cosine decay to {min_lr} at step {steps}."
)


def warmup_cosine_lr(*, step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Parameters
    ----------
    step : int
        Optimiser step, 0-based.
    base_lr : float
        Peak learning rate, reached at the end of the warm-up.
    warmup_steps : int
        Steps of linear warm-up; step 0 already gets ``base_lr / warmup_steps``
        (never zero, so the first step is not wasted).
    total_steps : int
        Length of the run; the cosine reaches ``min_lr`` at ``total_steps - 1``.
    min_lr : float
        Floor of the cosine.

    Returns
    -------
    float
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
