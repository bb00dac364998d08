"""A training run's state: what a checkpoint writes and a resume restores.

`TrainState` is made in one place (`new_state`), once the model, its trainable parameters and the
run's length are known; the training loop, the checkpoint writer and resume take it explicitly.
The processes' random streams are global (Python, NumPy, torch, CUDA): `rng_state` captures them
when a checkpoint is written and `set_rng_state` puts them back on resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from xllm.model.train.config import TrainConfig
from xllm.model.train.stages import Objective
from xllm.model.xllm import XLLM


@dataclass
class Progress:
    """Where the run is; written to a checkpoint's state.json as it is."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch consumed, all ranks together
    rows: int = 0  # rows trained on, all ranks
    skipped: int = 0  # rows dropped because their media did not decode


@dataclass
class TrainState:
    """Everything one run trains and resumes; made by `new_state`."""

    model: XLLM  # frozen encoders + LLM, and the interfaces being trained
    objective: Objective  # the stage's loss over `model` (with the stage-1 heads)
    params: dict[str, nn.Parameter]  # what trains: the chosen interface weights + the heads
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR  # warmup + cosine over `total_steps`
    scaler: torch.amp.GradScaler  # loss scaling; enabled for fp16 autocast only
    total_steps: int  # the run's length, which the LR schedule spans
    history: list[dict[str, Any]]  # the base model's training.json runs (this run appends one)
    progress: Progress = field(default_factory=Progress)


def new_state(
    config: TrainConfig,
    model: XLLM,
    objective: Objective,
    params: dict[str, nn.Parameter],
    history: list[dict[str, Any]],
    total_steps: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> TrainState:
    """A run's state at step 0: AdamW over `params`, the LR schedule and the loss scaler."""
    optimizer = build_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup, total_steps, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    return TrainState(
        model, objective, params, optimizer, scheduler, scaler, total_steps, history, Progress()
    )


def trainable_parameters(objective: Objective) -> dict[str, nn.Parameter]:
    """The interfaces' chosen parameters, and the stage-1 heads (which always train)."""
    return {n: p for n, p in objective.named_parameters() if p.requires_grad}


def build_optimizer(named: dict[str, nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / 1-D vectors do not (BLIP-2's grouping)."""
    decay = [p for n, p in named.items() if p.ndim >= 2 and not n.endswith("query_tokens")]
    rest = [p for n, p in named.items() if not (p.ndim >= 2 and not n.endswith("query_tokens"))]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.adam_betas)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """This process's random streams (dropout, shuffles), as a checkpoint stores them."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
