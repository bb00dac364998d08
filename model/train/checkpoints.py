"""Checkpoints: writing a run's state atomically, and resuming from the newest one exactly.

    checkpoints/step-NNNNNNNN/   trainable.safetensors (the objective's trainable + head weights),
                                 optimizer.pt (AdamW, scheduler, loss scaler), rng.pt (every
                                 rank's random streams), state.json (progress, length, config)
    checkpoints/latest           name of the newest complete checkpoint

Each save also refreshes the loadable model directory beside them (xllm.json,
interfaces.safetensors, stage1_heads.safetensors, training.json). Only rank 0 writes; every rank
joins a save, since the RNG states are gathered from all of them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xllm.model.checkpoint import save_interfaces
from xllm.model.train.config import TrainConfig
from xllm.model.train.distributed import Dist
from xllm.model.train.errors import TrainingError
from xllm.model.train.state import Progress, TrainState, rng_state, set_rng_state

log = logging.getLogger("xllm.train")

HISTORY_NAME = "training.json"
HEADS_NAME = "stage1_heads.safetensors"


class Checkpointer:
    """Saves a run's state under `out` at most once per step, and restores it on --resume."""

    def __init__(self, out: Path, config: TrainConfig, dist: Dist, device: torch.device) -> None:
        self.out, self.config, self.dist, self.device = out, config, dist, device
        self.saved_step = -1  # the step of the last save (or of the checkpoint resumed from)

    def save(self, state: TrainState) -> None:
        """Checkpoint + loadable model dir; every rank joins (RNG states are gathered)."""
        if state.progress.step == self.saved_step:
            return
        self.saved_step = state.progress.step
        states = [None] * self.dist.world
        if self.dist.enabled:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if self.dist.main:
            write_checkpoint(state, self.out, self.config, self.dist.world, states)
        self.dist.barrier()

    def restore(self, state: TrainState) -> None:
        """Load the newest checkpoint into `state` (weights, optimizer, progress, this rank's
        RNG); without one the run starts fresh, so a job script can always pass --resume."""
        directory = latest_checkpoint(self.out)
        if directory is None:
            if self.dist.main:
                log.info("--resume: no checkpoint in %s yet, starting fresh", self.out)
            self.saved_step = state.progress.step
            return
        saved_state = json.loads((directory / "state.json").read_text())
        before = (saved_state["config"]["stage"], saved_state["config"]["modality"])
        if before != (self.config.stage, self.config.modality):
            raise TrainingError(
                f"{directory} is a stage {before[0]} {before[1]} run; it cannot resume as stage "
                f"{self.config.stage} {self.config.modality}"
            )
        weights = load_file(str(directory / "trainable.safetensors"))
        state.objective.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        saved = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=False)
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.scaler.load_state_dict(saved["scaler"])
        state.progress = Progress(**saved_state["progress"])
        if saved_state["total_steps"] != state.total_steps and self.dist.main:
            log.warning(
                "the run was planned for %d steps, now %d: the LR schedule changes",
                saved_state["total_steps"],
                state.total_steps,
            )
        rngs = torch.load(directory / "rng.pt", weights_only=False)
        if len(rngs) == self.dist.world:
            set_rng_state(rngs[self.dist.rank])
        elif self.dist.main:
            log.warning(
                "checkpoint written by %d ranks, resuming on %d: data continues at the "
                "same batch, random streams (dropout) do not",
                len(rngs),
                self.dist.world,
            )
        if self.dist.main:
            log.info("resumed from %s at step %d", directory, state.progress.step)
        self.saved_step = state.progress.step


def write_checkpoint(
    state: TrainState, out: Path, config: TrainConfig, world: int, rng_states: list[Any]
) -> None:
    """Write checkpoints/step-N atomically (temp dir + rename), then the model dir files."""
    step = state.progress.step
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().to("cpu").contiguous() for k, v in state.objective.state_dict().items()
    }
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "scaler": state.scaler.state_dict(),
        },
        tmp / "optimizer.pt",
    )
    torch.save(rng_states, tmp / "rng.pt")
    record = {
        "progress": asdict(state.progress),
        "total_steps": state.total_steps,
        "world_size": world,
        "config": config.to_dict(),
    }
    (tmp / "state.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(final.name + "\n")
    (root / "latest.tmp").replace(root / "latest")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[: -config.keep_checkpoints]:
        shutil.rmtree(old)
    save_interfaces(state.model, out, base_dir=config.model)
    heads = state.objective.heads_state_dict()
    if heads:
        heads = {k: v.detach().cpu().contiguous() for k, v in heads.items()}
        save_file(heads, str(out / HEADS_NAME))
    entry = {
        "stage": config.stage,
        "modality": config.modality,
        "steps": step,
        "data": str(Path(config.data).resolve()),
    }
    history = [*state.history, entry]
    (out / HISTORY_NAME).write_text(json.dumps({"runs": history}, indent=2) + "\n")


def has_run(out: Path) -> bool:
    """Whether `out` already holds a training run (a checkpoint pointer)."""
    return (out / "checkpoints" / "latest").is_file()


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    directory = out / "checkpoints" / pointer.read_text().strip()
    return directory if (directory / "state.json").is_file() else None


def read_history(model_dir: Path) -> list[dict[str, Any]]:
    """The runs a model directory went through (its training.json; none for a base model)."""
    path = model_dir / HISTORY_NAME
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("runs", []))
