"""What the toy world's pre-training recipes share: the optimisation loop, its schedule and
progress bar, and word edit distance.

Each component (`pretrain_llm.py`, `pretrain_vision.py`, `pretrain_speech.py`) is trained from
scratch on CPU and returns its figures (accuracy, error rates); the recipe (`toy_world.py`) saves
them into its phase records.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, mininterval=5.0, smoothing=0.1, dynamic_ncols=True)


def cosine(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine down to 5% of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_steps(
    desc: str,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    *,
    steps: int,
    lr: float,
    warmup: int,
    loss_at: Callable[[int], torch.Tensor],
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """`steps` optimizer steps on `loss_at(step)` (a fresh batch's loss), with the LR on
    `cosine` and gradients clipped to norm 1; `after_step(step)` runs after each (periodic
    evaluation). Returns every step's loss."""
    losses: list[float] = []
    progress = bar(steps, desc)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine(step, steps, warmup)
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if after_step:
            after_step(step)
    progress.close()
    return losses


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]
