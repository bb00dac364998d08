"""The training loop: AdamW + warmup/cosine, accumulation, clipping, autocast, DDP/FSDP, resume.

Output directory:
    xllm.json, interfaces.safetensors   a loadable model dir (base components by absolute path)
    stage1_heads.safetensors            stage-1 training heads (never loaded for inference)
    metrics.jsonl                       one JSON object per logged step: step, loss, lr, ...
    training.json                       the stages this model went through (with the base's)
    checkpoints/step-NNNNNNNN/          trainable.safetensors, optimizer.pt, rng.pt, state.json
    checkpoints/latest                  name of the newest complete checkpoint

Exact resume: batches are planned from (seed, epoch) alone and a checkpoint stores how many of
the epoch's batches were consumed, the weights, optimizer/scheduler/scaler state and every rank's
RNG state, so a resumed run continues the same sequence of updates. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xllm.model.checkpoint import load_model, save_interfaces
from xllm.model.train.config import TrainConfig
from xllm.model.train.data import (
    BatchPlan,
    DecodeOptions,
    Manifest,
    MediaDataset,
    make_loader,
    manifest_files,
    read_manifest,
)
from xllm.model.train.stages import (
    Objective,
    StepOutput,
    build_objective,
    check_model,
    default_trainable,
    init_video_from_image,
    mark_trainable,
    media_token_estimate,
    row_filter,
)
from xllm.model.xllm import XLLM

log = logging.getLogger("xllm.train")

HISTORY_NAME = "training.json"
HEADS_NAME = "stage1_heads.safetensors"
METRICS_NAME = "metrics.jsonl"
STAGE_FILES = {1: "{modality}_train.jsonl", 2: "{modality}_train.jsonl", 3: "*_train.jsonl"}


class TrainingError(RuntimeError):
    """The run cannot start or continue as asked (the message says why)."""


# --- processes ----------------------------------------------------------------------------


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


# --- optimisation -------------------------------------------------------------------------


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


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPUs only (bf16 where supported); CPU training runs in float32."""
    if device.type != "cuda" or config.precision == "fp32":
        return None
    if config.precision == "fp16" or not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# --- state that resume restores -----------------------------------------------------------


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch consumed, all ranks together
    rows: int = 0  # rows trained on, all ranks
    skipped: int = 0  # rows dropped because their media did not decode


def rng_state() -> dict[str, Any]:
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


# --- the run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    out: Path
    step: int
    finished: bool  # False when stopped early (stop_at_step, time limit, signal)
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.dist, self.device = init_distributed(config.device)
        self.stop_reason: str | None = None

    # ---- setup ----
    def load(self) -> None:
        config = self.config
        seed_everything(config.seed + self.dist.rank)
        self.amp = autocast_dtype(config, self.device)
        # The frozen LLM and encoders are stored in the autocast dtype; interfaces stay float32.
        dtype = {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.amp]
        self.model: XLLM = load_model(
            config.model,
            device=str(self.device),  # "cuda:<local rank>": each rank loads onto its own GPU
            dtype=dtype,
            quantize=config.quantize,  # type: ignore[arg-type]
            require_interfaces=False,
        )
        check_model(config, self.model)
        self.history = read_history(Path(config.model))
        # A video interface that never trained starts from the image one (X-LLM's V2L init).
        video_trained = any(run.get("modality") == "video" for run in self.history)
        video_stage = config.stage == 2 and config.modality == "video"
        if video_stage and config.init_video_from_image and not video_trained:
            init_video_from_image(self.model)
        self.objective: Objective = build_objective(config, self.model).to(self.device)
        prefixes = config.trainable or default_trainable(config, self.model)
        mark_trainable(self.model.interfaces(), prefixes)
        # The interfaces' chosen parameters, and the stage-1 heads (which always train).
        self.named_params = {n: p for n, p in self.objective.named_parameters() if p.requires_grad}
        count = sum(p.numel() for p in self.named_params.values())
        if self.dist.main:
            log.info("training %s parameters in: %s", f"{count:,}", ", ".join(prefixes))
        if config.gradient_checkpointing:
            self._enable_checkpointing()
        if config.fsdp:
            self._shard_llm()

    def _enable_checkpointing(self) -> None:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        self.model.llm.gradient_checkpointing_enable(**kwargs)
        # HF only checkpoints modules in training mode; the frozen LLM has no dropout to turn on.
        self.model.llm.train()
        for interface in (self.model.image_interface, self.model.video_interface):
            if interface is not None:
                interface.qformer.gradient_checkpointing_enable(**kwargs)

    def _shard_llm(self) -> None:
        """FSDP2 over the frozen LLM's decoder layers: each rank keeps 1/world of their weights.

        Embeddings and the LM head stay whole: prompts are embedded outside the LLM's forward.
        """
        if not self.dist.enabled:
            raise TrainingError("--fsdp needs several processes (torchrun --nproc_per_node N)")
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.llm.model.layers:
            fully_shard(layer)

    def data(self, path: Path, split: str) -> MediaDataset:
        config = self.config
        pattern = STAGE_FILES[config.stage].format(modality=config.modality)
        if split == "val":
            pattern = pattern.replace("_train", "_val")
        manifest = Manifest()
        accept = row_filter(config)
        for file in manifest_files(path, pattern):
            part = read_manifest(file, accept)
            if self.dist.main:
                log.info(part.describe(str(file)))
            manifest.extend(part)
        if not manifest.examples:
            raise TrainingError(
                f"{path}: no usable rows for stage {config.stage} {config.modality}"
            )
        qformer = self.model.config.image_interface
        options = DecodeOptions(
            video_fps=qformer.video_fps if qformer else 1.0,
            max_frames=self.model.video_interface.max_frames if self.model.video_interface else 8,
            video_audio=config.keep_video_audio,
        )
        return MediaDataset(manifest.examples, self.model.prepare, options)

    def plan(self, dataset: MediaDataset) -> BatchPlan:
        tokens = media_token_estimate(self.model)
        return BatchPlan(
            lengths=tuple(e.length(tokens) for e in dataset.examples),
            groups=tuple(e.group for e in dataset.examples),
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            balance=self.config.balanced,
            bucket_batches=self.config.bucket_batches,
        )

    # ---- main ----
    def run(self) -> RunResult:
        config = self.config
        self.check_out()
        self.load()
        if self.dist.main:  # made once the base model loaded, so a typo leaves nothing behind
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        train = self.data(Path(config.data), "train")
        plan = self.plan(train)
        evaluation = self.data(Path(config.eval_data), "val") if config.eval_data else None
        steps_per_epoch = plan.batches_per_rank(self.dist.world) // config.grad_accum
        if steps_per_epoch == 0:
            raise TrainingError(
                f"{len(train)} rows make no full step of {config.batch_size} x {config.grad_accum} "
                f"x {self.dist.world} ranks: lower --batch-size or --grad-accum"
            )
        self.total_steps = config.max_steps or steps_per_epoch * config.epochs
        self.optimizer = build_optimizer(self.named_params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, config.warmup, self.total_steps, config.min_lr_ratio),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.progress = Progress()
        if config.resume:
            self.restore()
        self.saved_step = self.progress.step if config.resume else -1
        self.engine = self._wrap()
        self.metrics = MetricsLog(self.out / METRICS_NAME, self.dist.main)
        self.metrics.truncate_after(self.progress.step)
        with stop_signals(self):
            self.train_loop(train, plan, evaluation)
        # A final validation, unless the last step's periodic one just ran.
        evaluated = config.eval_every > 0 and self.progress.step % config.eval_every == 0
        if self.progress.step >= self.total_steps and evaluation is not None and not evaluated:
            self.log_eval(evaluation)
        self.save()
        finished = self.progress.step >= self.total_steps
        if self.dist.main:
            state = "finished" if finished else f"stopped ({self.stop_reason})"
            log.info("%s at step %d; model written to %s", state, self.progress.step, self.out)
        return RunResult(self.out, self.progress.step, finished, self.metrics.written)

    def check_out(self) -> None:
        """Refuse to overwrite a run by accident: continuing one needs --resume."""
        has_run = (self.out / "checkpoints" / "latest").is_file()
        if has_run and not self.config.resume:
            raise TrainingError(
                f"{self.out} already holds a training run: pass --resume to continue it, or "
                "choose another --out"
            )

    def _wrap(self) -> nn.Module:
        set_train_mode(self.objective)
        if not self.dist.enabled:
            return self.objective
        # Unused parameters are normal in stage 3 (a batch without video leaves video's idle) and
        # possible with a hand-picked --trainable; elsewhere every trainable weight is used.
        unused = self.config.stage == 3 or bool(self.config.trainable)
        return nn.parallel.DistributedDataParallel(self.objective, find_unused_parameters=unused)

    def train_loop(
        self, train: MediaDataset, plan: BatchPlan, evaluation: MediaDataset | None
    ) -> None:
        config, dist = self.config, self.dist
        bar = progress_bar(self.total_steps, self.progress.step, dist.main)
        started = time.monotonic()
        self.check_stop(started)
        if self.progress.step >= self.total_steps or self.stop_reason is not None:
            return
        # Batches per rank per epoch, cut to whole optimizer steps.
        per_epoch = plan.batches_per_rank(dist.world) // config.grad_accum * config.grad_accum
        stream = plan.stream(
            dist.rank,
            dist.world,
            self.progress.epoch,
            self.progress.batches_done // dist.world,
            per_epoch,
        )
        # One loader for the whole run: its workers live across epochs.
        loader = make_loader(train, stream, config.num_workers, config.seed)
        for group in accumulate(loader, config.grad_accum):
            record = self.optimizer_step(group)
            if self.progress.batches_done == per_epoch * dist.world:
                self.progress.epoch += 1
                self.progress.batches_done = 0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if self.should(config.eval_every) and evaluation is not None:
                record.update(self.evaluate(evaluation))
            if self.should(config.log_every) or "eval_loss" in record:
                self.metrics.write(record)
                log.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
            self.check_stop(started)
            if self.stop_reason is None and self.should(config.save_every):
                self.save()
            if self.progress.step >= self.total_steps or self.stop_reason is not None:
                break
        bar.close()

    def should(self, every: int) -> bool:
        return every > 0 and self.progress.step % every == 0

    def optimizer_step(self, group: list) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the log record."""
        config, dist = self.config, self.dist
        losses, parts, rows, skipped = [], {}, 0, 0
        for index, batch in enumerate(group):
            for error in batch.errors:
                log.warning("skipped row: %s", error)
            last = index == len(group) - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else self.engine.no_sync()
            with sync, self.autocast():
                out: StepOutput = self.engine(batch.samples)
            self.scaler.scale(out.loss / len(group)).backward()
            losses.append(out.loss.item())
            for key, value in out.parts.items():
                parts[key] = parts.get(key, 0.0) + value / len(group)
            rows += out.samples
            skipped += batch.skipped
        self.scaler.unscale_(self.optimizer)
        params = list(self.named_params.values())
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        self.progress.batches_done += len(group) * dist.world
        keys = sorted(parts)
        values = dist.mean(
            [sum(losses) / len(losses), float(norm)] + [parts[k] for k in keys], self.device
        )
        counts = dist.total([rows, skipped], self.device)
        self.progress.rows += int(counts[0])
        self.progress.skipped += int(counts[1])
        record = {
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "loss": values[0],
            "lr": lr,
            "grad_norm": values[1],
        }
        record.update(zip(keys, values[2:], strict=True))
        record.update(rows=self.progress.rows, skipped=self.progress.skipped)
        return record

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # ---- evaluation ----
    @torch.no_grad()
    def evaluate(self, dataset: MediaDataset) -> dict[str, float]:
        """Mean validation loss over the whole eval manifest (every rank takes a share)."""
        config, dist = self.config, self.dist
        size = config.batch_size
        batches = [
            list(range(i, min(i + size, len(dataset)))) for i in range(0, len(dataset), size)
        ]
        batches += [[]] * (-len(batches) % dist.world)  # equal forward counts for FSDP
        self.objective.eval()
        total, rows = 0.0, 0
        loader = make_loader(dataset, batches[dist.rank :: dist.world], config.num_workers, 0)
        for batch in loader:
            with self.autocast():
                out = self.objective(batch.samples)
            total += out.loss.item() * out.samples
            rows += out.samples
        set_train_mode(self.objective)
        total, rows = dist.total([total, rows], self.device)
        return {"eval_loss": total / max(rows, 1), "eval_rows": int(rows)}

    def log_eval(self, dataset: MediaDataset) -> None:
        record = {"step": self.progress.step, "lr": self.scheduler.get_last_lr()[0]}
        record.update(self.evaluate(dataset))
        self.metrics.write(record)
        log.info("eval at step %d: loss %.4f", self.progress.step, record["eval_loss"])

    # ---- stopping ----
    def check_stop(self, started: float) -> None:
        config = self.config
        reason = self.stop_reason
        if config.stop_at_step is not None and self.progress.step >= config.stop_at_step:
            reason = f"stop_at_step {config.stop_at_step}"
        if config.time_limit is not None and time.monotonic() - started > config.time_limit * 60:
            reason = f"time limit {config.time_limit:g} min"
        # Every rank must stop at the same step: any rank's reason stops all.
        if self.dist.total([1.0 if reason else 0.0], self.device)[0] > 0:
            self.stop_reason = reason or "another rank stopped"

    # ---- checkpoints ----
    def save(self) -> None:
        """Checkpoint + loadable model dir; every rank joins (RNG states are gathered)."""
        if self.progress.step == self.saved_step:
            return
        self.saved_step = self.progress.step
        states = [None] * self.dist.world
        if self.dist.enabled:
            torch.distributed.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if self.dist.main:
            write_checkpoint(self, states)
        self.dist.barrier()

    def restore(self) -> None:
        directory = latest_checkpoint(self.out)
        if directory is None:
            if self.dist.main:
                log.info("--resume: no checkpoint in %s yet, starting fresh", self.out)
            return
        state = json.loads((directory / "state.json").read_text())
        before = (state["config"]["stage"], state["config"]["modality"])
        if before != (self.config.stage, self.config.modality):
            raise TrainingError(
                f"{directory} is a stage {before[0]} {before[1]} run; it cannot resume as stage "
                f"{self.config.stage} {self.config.modality}"
            )
        self.objective.load_state_dict(
            {
                k: v.to(self.device)
                for k, v in load_file(str(directory / "trainable.safetensors")).items()
            }
        )
        saved = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.progress = Progress(**state["progress"])
        if state["total_steps"] != self.total_steps and self.dist.main:
            log.warning(
                "the run was planned for %d steps, now %d: the LR schedule changes",
                state["total_steps"],
                self.total_steps,
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
            log.info("resumed from %s at step %d", directory, self.progress.step)


def set_train_mode(objective: nn.Module) -> None:
    """Train mode where something trains; frozen parts (e.g. a frozen Q-Former) stay in eval
    mode, without dropout."""
    objective.train()
    for module in objective.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def accumulate(loader: Any, size: int) -> Iterator[list]:
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def write_checkpoint(trainer: Trainer, rng_states: list[Any]) -> None:
    """Write checkpoints/step-N atomically (temp dir + rename), then the model dir files."""
    out, step = trainer.out, trainer.progress.step
    root = out / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().to("cpu").contiguous() for k, v in trainer.objective.state_dict().items()
    }
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
        },
        tmp / "optimizer.pt",
    )
    torch.save(rng_states, tmp / "rng.pt")
    state = {
        "progress": asdict(trainer.progress),
        "total_steps": trainer.total_steps,
        "world_size": trainer.dist.world,
        "config": trainer.config.to_dict(),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (root / "latest.tmp").write_text(final.name + "\n")
    (root / "latest.tmp").replace(root / "latest")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[: -trainer.config.keep_checkpoints]:
        shutil.rmtree(old)
    save_interfaces(trainer.model, out, base_dir=trainer.config.model)
    heads = trainer.objective.heads_state_dict()
    if heads:
        heads = {k: v.detach().cpu().contiguous() for k, v in heads.items()}
        save_file(heads, str(out / HEADS_NAME))
    entry = {
        "stage": trainer.config.stage,
        "modality": trainer.config.modality,
        "steps": step,
        "data": str(Path(trainer.config.data).resolve()),
    }
    history = [*trainer.history, entry]
    (out / HISTORY_NAME).write_text(json.dumps({"runs": history}, indent=2) + "\n")


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    directory = out / "checkpoints" / pointer.read_text().strip()
    return directory if (directory / "state.json").is_file() else None


def read_history(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / HISTORY_NAME
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("runs", []))


class MetricsLog:
    """metrics.jsonl, appended by rank 0; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.written: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.written.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress_bar(total: int, done: int, main: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=done,
        unit="step",
        dynamic_ncols=True,
        disable=not (main and sys.stderr.isatty()),
    )


@contextlib.contextmanager
def stop_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM / SIGUSR1 (schedulers' pre-emption warnings): save at the next step and stop."""
    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        trainer.stop_reason = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
