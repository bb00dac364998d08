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
RNG state, so a resumed run continues the same sequence of updates (`checkpoints.py`). The run's
state is one `TrainState` (`state.py`), made once the model and the run's length are known and
passed to every step, validation and checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xllm.model.checkpoint import load_model
from xllm.model.train.checkpoints import Checkpointer, has_run, read_history
from xllm.model.train.config import TrainConfig
from xllm.model.train.data import (
    BatchPlan,
    Manifest,
    MediaDataset,
    make_loader,
    manifest_files,
    read_manifest,
)
from xllm.model.train.distributed import Dist, init_distributed
from xllm.model.train.errors import TrainingError
from xllm.model.train.metrics_log import METRICS_NAME, MetricsLog, format_record, progress_bar
from xllm.model.train.precision import STORAGE_DTYPE, autocast, autocast_dtype
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
    set_train_mode,
)
from xllm.model.train.state import (
    TrainState,
    new_state,
    seed_everything,
    trainable_parameters,
)
from xllm.model.train.validation import validation_loss
from xllm.model.xllm import XLLM

log = logging.getLogger("xllm.train")

# The manifests of a --data folder each stage reads; `row_filter` keeps the rows that fit it
# (stage 2: every row whose only media is the stage's, e.g. spoken questions beside transcripts).
STAGE_FILES = {1: "{modality}_train.jsonl", 2: "*_train.jsonl", 3: "*_train.jsonl"}


@dataclass
class RunResult:
    out: Path
    step: int
    finished: bool  # False when stopped early (stop_at_step, time limit, signal)
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """One `xllm train` run on this process's rank: load, plan, train, validate, checkpoint."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out)
        self.dist, self.device = init_distributed(config.device)
        self.amp = autocast_dtype(config, self.device)
        self.checkpoints = Checkpointer(self.out, config, self.dist, self.device)
        self.metrics = MetricsLog(self.out / METRICS_NAME, self.dist.main)
        self.stop_reason: str | None = None  # set by a stop condition or a signal

    # ---- setup ----
    def load_model(self) -> tuple[XLLM, list[dict[str, Any]]]:
        """The model to train (frozen parts in the autocast dtype, interfaces in float32) and
        the runs its directory already went through."""
        config = self.config
        seed_everything(config.seed + self.dist.rank)
        model = load_model(
            config.model,
            device=str(self.device),  # "cuda:<local rank>": each rank loads onto its own GPU
            dtype=STORAGE_DTYPE[self.amp],
            quantize=config.quantize,  # type: ignore[arg-type]
            require_interfaces=False,
        )
        check_model(config, model)
        history = read_history(Path(config.model))
        # A video interface that never trained starts from the image one (X-LLM's V2L init).
        video_trained = any(run.get("modality") == "video" for run in history)
        video_stage = config.stage == 2 and config.modality == "video"
        if video_stage and config.init_video_from_image and not video_trained:
            init_video_from_image(model)
        return model, history

    def objective_for(self, model: XLLM) -> tuple[Objective, dict[str, nn.Parameter]]:
        """The stage's objective on this device and the parameters it trains."""
        config = self.config
        objective = build_objective(config, model).to(self.device)
        prefixes = config.trainable or default_trainable(config, model)
        mark_trainable(model.interfaces(), prefixes)
        params = trainable_parameters(objective)
        count = sum(p.numel() for p in params.values())
        if self.dist.main:
            log.info("training %s parameters in: %s", f"{count:,}", ", ".join(prefixes))
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        if config.fsdp:
            self.shard_llm(model)
        return objective, params

    def shard_llm(self, model: XLLM) -> None:
        """FSDP2 over the frozen LLM's decoder layers: each rank keeps 1/world of their weights.

        Embeddings and the LM head stay whole: prompts are embedded outside the LLM's forward.
        """
        if not self.dist.enabled:
            raise TrainingError("--fsdp needs several processes (torchrun --nproc_per_node N)")
        from torch.distributed.fsdp import fully_shard

        for layer in model.llm.model.layers:
            fully_shard(layer)

    def total_steps(self, plan: BatchPlan, rows: int) -> int:
        config = self.config
        steps_per_epoch = plan.batches_per_rank(self.dist.world) // config.grad_accum
        if steps_per_epoch == 0:
            raise TrainingError(
                f"{rows} rows make no full step of {config.batch_size} x {config.grad_accum} "
                f"x {self.dist.world} ranks: lower --batch-size or --grad-accum"
            )
        return config.max_steps or steps_per_epoch * config.epochs

    # ---- main ----
    def run(self) -> RunResult:
        config = self.config
        self.check_out()
        model, history = self.load_model()
        objective, params = self.objective_for(model)
        if self.dist.main:  # made once the base model loaded, so a typo leaves nothing behind
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()
        train = stage_dataset(config, model, Path(config.data), "train", self.dist)
        plan = batch_plan(config, model, train)
        evaluation = (
            stage_dataset(config, model, Path(config.eval_data), "val", self.dist)
            if config.eval_data
            else None
        )
        total_steps = self.total_steps(plan, len(train))
        state = new_state(
            config, model, objective, params, history, total_steps, self.device, self.amp
        )
        if config.resume:
            self.checkpoints.restore(state)
        forward = self.wrap(state.objective)
        self.metrics.truncate_after(state.progress.step)
        with stop_signals(self):
            self.train_loop(state, forward, train, plan, evaluation)
        # A final validation, unless the last step's periodic one just ran.
        step = state.progress.step
        evaluated = config.eval_every > 0 and step % config.eval_every == 0
        if step >= state.total_steps and evaluation is not None and not evaluated:
            self.log_eval(state, evaluation)
        self.checkpoints.save(state)
        finished = step >= state.total_steps
        if self.dist.main:
            status = "finished" if finished else f"stopped ({self.stop_reason})"
            log.info("%s at step %d; model written to %s", status, step, self.out)
        return RunResult(self.out, step, finished, self.metrics.written)

    def check_out(self) -> None:
        """Refuse to overwrite a run by accident: continuing one needs --resume."""
        if has_run(self.out) and not self.config.resume:
            raise TrainingError(
                f"{self.out} already holds a training run: pass --resume to continue it, or "
                "choose another --out"
            )

    def wrap(self, objective: Objective) -> nn.Module:
        """The module the steps call: the objective, under DDP when there are several ranks."""
        set_train_mode(objective)
        if not self.dist.enabled:
            return objective
        # Unused parameters are normal in stage 3 (a batch without video leaves video's idle) and
        # possible with a hand-picked --trainable; elsewhere every trainable weight is used.
        unused = self.config.stage == 3 or bool(self.config.trainable)
        return nn.parallel.DistributedDataParallel(objective, find_unused_parameters=unused)

    def train_loop(
        self,
        state: TrainState,
        forward: nn.Module,
        train: MediaDataset,
        plan: BatchPlan,
        evaluation: MediaDataset | None,
    ) -> None:
        config, dist, progress = self.config, self.dist, state.progress
        bar = progress_bar(state.total_steps, progress.step, dist.main)
        started = time.monotonic()
        self.check_stop(state, started)
        if progress.step >= state.total_steps or self.stop_reason is not None:
            return
        # Batches per rank per epoch, cut to whole optimizer steps.
        per_epoch = plan.batches_per_rank(dist.world) // config.grad_accum * config.grad_accum
        stream = plan.stream(
            dist.rank, dist.world, progress.epoch, progress.batches_done // dist.world, per_epoch
        )
        # One loader for the whole run: its workers live across epochs.
        loader = make_loader(train, stream, config.num_workers, config.seed)
        for group in accumulate(loader, config.grad_accum):
            record = self.optimizer_step(state, forward, group)
            if progress.batches_done == per_epoch * dist.world:
                progress.epoch += 1
                progress.batches_done = 0
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if every(progress.step, config.eval_every) and evaluation is not None:
                record.update(self.evaluate(state, evaluation))
            if every(progress.step, config.log_every) or "eval_loss" in record:
                self.metrics.write(record)
                log.info(format_record(record))
            self.check_stop(state, started)
            if self.stop_reason is None and every(progress.step, config.save_every):
                self.checkpoints.save(state)
            if progress.step >= state.total_steps or self.stop_reason is not None:
                break
        bar.close()

    def optimizer_step(self, state: TrainState, forward: nn.Module, group: list) -> dict[str, Any]:
        """One optimizer step over `grad_accum` micro-batches; returns the log record."""
        config, dist, progress = self.config, self.dist, state.progress
        losses, parts, rows, skipped = [], {}, 0, 0
        for index, batch in enumerate(group):
            for error in batch.errors:
                log.warning("skipped row: %s", error)
            last = index == len(group) - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else forward.no_sync()
            with sync, autocast(self.device, self.amp):
                out: StepOutput = forward(batch.samples)
            state.scaler.scale(out.loss / len(group)).backward()
            losses.append(out.loss.item())
            for key, value in out.parts.items():
                parts[key] = parts.get(key, 0.0) + value / len(group)
            rows += out.samples
            skipped += batch.skipped
        state.scaler.unscale_(state.optimizer)
        params = list(state.params.values())
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
        lr = state.scheduler.get_last_lr()[0]
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.batches_done += len(group) * dist.world
        keys = sorted(parts)
        values = dist.mean(
            [sum(losses) / len(losses), float(norm)] + [parts[k] for k in keys], self.device
        )
        counts = dist.total([rows, skipped], self.device)
        progress.rows += int(counts[0])
        progress.skipped += int(counts[1])
        record = {
            "step": progress.step,
            "epoch": progress.epoch,
            "loss": values[0],
            "lr": lr,
            "grad_norm": values[1],
        }
        record.update(zip(keys, values[2:], strict=True))
        record.update(rows=progress.rows, skipped=progress.skipped)
        return record

    # ---- evaluation ----
    def evaluate(self, state: TrainState, dataset: MediaDataset) -> dict[str, float]:
        """Mean validation loss over the whole eval manifest (every rank takes a share)."""
        return validation_loss(
            state.objective, dataset, self.config, self.dist, self.device, self.amp
        )

    def log_eval(self, state: TrainState, dataset: MediaDataset) -> None:
        record = {"step": state.progress.step, "lr": state.scheduler.get_last_lr()[0]}
        record.update(self.evaluate(state, dataset))
        self.metrics.write(record)
        log.info("eval at step %d: loss %.4f", state.progress.step, record["eval_loss"])

    # ---- stopping ----
    def check_stop(self, state: TrainState, started: float) -> None:
        config = self.config
        reason = self.stop_reason
        if config.stop_at_step is not None and state.progress.step >= config.stop_at_step:
            reason = f"stop_at_step {config.stop_at_step}"
        if config.time_limit is not None and time.monotonic() - started > config.time_limit * 60:
            reason = f"time limit {config.time_limit:g} min"
        # Every rank must stop at the same step: any rank's reason stops all.
        if self.dist.total([1.0 if reason else 0.0], self.device)[0] > 0:
            self.stop_reason = reason or "another rank stopped"


# --- the stage's data -----------------------------------------------------------------------


def stage_dataset(
    config: TrainConfig, model: XLLM, path: Path, split: str, dist: Dist
) -> MediaDataset:
    """The rows of `path` (a manifest or a folder of them) that this stage trains on."""
    pattern = STAGE_FILES[config.stage].format(modality=config.modality)
    if split == "val":
        pattern = pattern.replace("_train", "_val")
    manifest = Manifest()
    accept = row_filter(config)
    for file in manifest_files(path, pattern):
        part = read_manifest(file, accept)
        if dist.main:
            log.info(part.describe(str(file)))
        manifest.extend(part)
    if not manifest.examples:
        raise TrainingError(f"{path}: no usable rows for stage {config.stage} {config.modality}")
    return MediaDataset(manifest.examples, model.preparer, config.keep_video_audio)


def batch_plan(config: TrainConfig, model: XLLM, dataset: MediaDataset) -> BatchPlan:
    """Batches of one modality and similar lengths, planned from the seed and the epoch alone."""
    tokens = media_token_estimate(model)
    return BatchPlan(
        lengths=tuple(e.length(tokens) for e in dataset.examples),
        groups=tuple(e.group for e in dataset.examples),
        batch_size=config.batch_size,
        seed=config.seed,
        balance=config.balanced,
        bucket_batches=config.bucket_batches,
    )


# --- helpers ----------------------------------------------------------------------------------


def enable_checkpointing(model: XLLM) -> None:
    """Recompute the LLM's and the Q-Formers' activations in the backward pass."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    model.llm.gradient_checkpointing_enable(**kwargs)
    # HF only checkpoints modules in training mode; the frozen LLM has no dropout to turn on.
    model.llm.train()
    for interface in (model.image_interface, model.video_interface):
        if interface is not None:
            interface.qformer.gradient_checkpointing_enable(**kwargs)


def every(step: int, interval: int) -> bool:
    """Whether a periodic action (log, eval, save every `interval` steps) falls on `step`."""
    return interval > 0 and step % interval == 0


def accumulate(loader: Any, size: int) -> Iterator[list]:
    """Groups of `size` micro-batches, one per optimizer step (a partial last group is dropped;
    the plan cuts an epoch to whole steps)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


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
