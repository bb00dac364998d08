"""Validation loss: the stage's objective over a whole eval manifest, without gradients."""

from __future__ import annotations

import torch

from xllm.model.train.config import TrainConfig
from xllm.model.train.data import MediaDataset, make_loader
from xllm.model.train.distributed import Dist
from xllm.model.train.precision import autocast
from xllm.model.train.stages import Objective, set_train_mode


@torch.no_grad()
def validation_loss(
    objective: Objective,
    dataset: MediaDataset,
    config: TrainConfig,
    dist: Dist,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, float]:
    """Mean loss per row over `dataset` in eval mode (no dropout); every rank takes a share of
    the batches and the sums are added over ranks. Leaves the objective in train mode."""
    size = config.batch_size
    batches = [list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)]
    batches += [[]] * (-len(batches) % dist.world)  # equal forward counts for FSDP
    objective.eval()
    total, rows = 0.0, 0
    loader = make_loader(dataset, batches[dist.rank :: dist.world], config.num_workers, 0)
    for batch in loader:
        with autocast(device, amp):
            out = objective(batch.samples)
        total += out.loss.item() * out.samples
        rows += out.samples
    set_train_mode(objective)
    total, rows = dist.total([total, rows], device)
    return {"eval_loss": total / max(rows, 1), "eval_rows": int(rows)}
