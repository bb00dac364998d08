"""This process's place in a torchrun launch: rank, world size, device, and the collectives the
training loop needs (barrier, mean, sum). Without torchrun a run is rank 0 of 1 and every
collective is the identity."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from xllm.model.train.errors import TrainingError


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Elementwise mean over ranks."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def total(self, values: list[float], device: torch.device) -> list[float]:
        """Elementwise sum over ranks."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (nccl on GPUs, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for, but no CUDA device is available")
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    dist = Dist(int(os.environ.get("RANK", "0")), world, local_rank)
    return dist, torch_device
