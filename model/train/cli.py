"""`xllm train`, `xllm data toy` and `xllm data scenes` (also `python -m xllm.train` for
torchrun); registers `xllm eval`, which lives in xllm.model.evaluation."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from xllm.model.config import QUANTIZE_CHOICES
from xllm.model.train.config import PRECISIONS, STAGES, TRAIN_MODALITIES


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train the X2L interfaces (stage 1, 2 or 3)",
        description="Train X-LLM's interfaces; the output directory is a loadable model dir.",
    )
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    data = subparsers.add_parser("data", help="training data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="TOOL")
    toy = data_commands.add_parser(
        "toy", help="generate the toy world of shapes (images, speech, video, mixed)"
    )
    add_generator_arguments(toy)
    toy.set_defaults(func=run_toy)
    scenes = data_commands.add_parser(
        "scenes",
        help="generate training data for a real LLM: scenes of shapes, many-voice speech",
        description="Images of several shapes, moving shapes, speech of thousands of sentences "
        "by several TTS engines and voices (held-out voices and sentences kept for evaluation).",
    )
    add_generator_arguments(scenes)
    scenes.add_argument(
        "--heldout", type=int, default=0, metavar="N", help="also N rows of held-out speech"
    )
    scenes.set_defaults(func=run_scenes)

    from xllm.model.evaluation.cli import register as register_eval

    register_eval(subparsers)  # `xllm eval` (tasks, pack, import) lives in xllm.model.evaluation


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """What every data generator takes: where, how many rows, the seed and the processes."""
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--n", required=True, type=int, help="training rows per manifest")
    parser.add_argument("--n-val", type=int, default=None, help="validation rows (default n/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs)")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag defaults to None, so only the flags given override the YAML config."""
    add = parser.add_argument
    add("--stage", type=int, choices=STAGES, help="1: interface alone, 2: align, 3: instructions")
    add("--modality", choices=TRAIN_MODALITIES, help="image | speech | video (stages 1-2), all (3)")
    add("--model", type=Path, help="base model directory (e.g. from `xllm init-tiny`)")
    add("--data", type=Path, help="manifest, or a folder of *_train.jsonl manifests")
    add("--out", type=Path, help="output model directory (checkpoints go inside)")
    add("--config", type=Path, help="YAML file with these options (flags override it)")
    add("--max-steps", type=int, help="optimizer steps (the LR schedule spans them)")
    add("--epochs", type=int, help="epochs when --max-steps is not given (default 1)")
    add(
        "--stop-at-step",
        type=int,
        help="end this invocation at step N (checkpointed; resume later)",
    )
    add("--time-limit", type=float, help="minutes; checkpoint and stop when they run out")
    add("--batch-size", type=int, help="rows per micro-batch per process (default 8)")
    add("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    add("--lr", type=float, help="peak learning rate (default 1e-4)")
    add("--warmup", type=int, help="linear warmup steps before the cosine decay (default 0)")
    add("--min-lr-ratio", type=float, help="cosine floor as a fraction of --lr (1 = constant)")
    add("--weight-decay", type=float)
    add("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    add(
        "--trainable",
        action="append",
        metavar="PREFIX",
        help="parameter prefix that trains, e.g. image_interface.projection (repeatable)",
    )
    add("--eval-data", type=Path, help="validation manifest (or folder of *_val.jsonl)")
    add("--eval-every", type=int, help="steps between validation runs (default: at the end)")
    add("--save-every", type=int, help="steps between checkpoints (default: at the end)")
    add("--log-every", type=int, help="steps between metrics lines (default 10)")
    add("--num-workers", type=int, help="DataLoader processes decoding media (default 2)")
    add("--resume", action="store_true", default=None, help="continue from OUT's last checkpoint")
    add("--quantize", choices=QUANTIZE_CHOICES, help="load the frozen LLM quantized")
    add("--device", choices=("auto", "cpu", "cuda"))
    add("--precision", choices=PRECISIONS, help="autocast on GPU (default auto: bf16 or fp16)")
    add("--gradient-checkpointing", action="store_true", default=None)
    add("--fsdp", action="store_true", default=None, help="shard the frozen LLM (multi-GPU)")
    add("--seed", type=int)


def run_train(args: argparse.Namespace) -> int:
    from xllm.main import UserError
    from xllm.model.train.config import ConfigError, build_config, load_yaml
    from xllm.model.train.data import RowError
    from xllm.model.train.errors import TrainingError
    from xllm.model.train.loop import Trainer
    from xllm.model.train.stages import StageError

    setup_logging()
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    try:
        file_values = load_yaml(args.config) if args.config else {}
        config = build_config(file_values, flags)
        trainer = Trainer(config)
        try:
            trainer.run()
        finally:
            close_distributed()
    except (ConfigError, TrainingError, StageError, RowError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
    return 0


def close_distributed() -> None:
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def setup_logging() -> None:
    """INFO on rank 0, warnings only from the other ranks."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_toy(args: argparse.Namespace) -> int:
    from xllm.main import UserError
    from xllm.model.train.toy import ToolMissingError, generate_toy

    if args.n < 1:
        raise UserError("--n must be at least 1")
    try:
        written = generate_toy(args.out, args.n, seed=args.seed, n_val=args.n_val, jobs=args.jobs)
    except ToolMissingError as exc:
        raise UserError(str(exc)) from None
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


def run_scenes(args: argparse.Namespace) -> int:
    from xllm.main import UserError
    from xllm.model.train.scenes import generate_heldout, generate_scenes
    from xllm.model.train.toy import ToolMissingError

    for flag, value, least in (("--n", args.n, 1), ("--n-val", args.n_val, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}")
    if args.jobs is not None and args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if args.heldout < 0:
        raise UserError("--heldout must be at least 0")
    try:
        written = generate_scenes(args.out, args.n, args.seed, args.n_val, args.jobs)
        if args.heldout:
            written |= generate_heldout(args.out, args.heldout, args.seed, args.jobs)
    except ToolMissingError as exc:
        raise UserError(str(exc)) from None
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
