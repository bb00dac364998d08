"""The training configuration: one typed dataclass, filled from a YAML file and then from flags.

YAML keys are the flag names (dashes or underscores): `lr: 3.0e-5`, `grad-accum: 4`, ...
Flags given on the command line override the file; everything else keeps its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xllm.model.config import QUANTIZE_CHOICES

Stage = Literal[1, 2, 3]
TrainModality = Literal["image", "speech", "video", "all"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]

STAGES = (1, 2, 3)
TRAIN_MODALITIES = ("image", "speech", "video", "all")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A bad training configuration; the message names the key."""


@dataclass
class TrainConfig:
    # what to train
    stage: int = 2
    modality: str = "image"
    model: Path | None = None  # base model directory
    data: Path | None = None  # manifest, or a folder of *_train.jsonl manifests
    out: Path | None = None
    # which interface parameters train (name prefixes, e.g. "image_interface.projection");
    # empty = the stage's default (see stages.default_trainable)
    trainable: list[str] = field(default_factory=list)
    # length
    max_steps: int | None = None  # optimizer steps; the LR schedule spans them
    epochs: int = 1  # used when max_steps is not given
    stop_at_step: int | None = None  # end this invocation early (a checkpoint is saved)
    time_limit: float | None = None  # minutes; save and stop before a job's wall-clock limit
    # batches and optimisation
    batch_size: int = 8  # per rank, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup: int = 0  # steps
    weight_decay: float = 0.05
    max_grad_norm: float = 1.0  # 0 = no clipping
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    # data
    eval_data: Path | None = None
    num_workers: int = 2
    bucket_batches: int = 16  # batches per length-sorted window
    balance: bool | None = None  # balance modality groups (default: on in stage 3)
    video_audio: bool | None = None  # feed a video's audio track (default: on in stage 3)
    # stage 1 objectives
    itc_weight: float = 1.0
    itg_weight: float = 1.0
    quantity_weight: float = 1.0
    # speech: squared distance of each fired token to its embedding in the frozen LLM's table
    embedding_weight: float = 1.0
    text_layers: int = 2  # the training-only text tower of image stage 1
    text_heads: int = 2  # attention heads of that tower
    max_text_tokens: int = 64
    # stage 2: start the video interface from the trained image one (off to continue a video run)
    init_video_from_image: bool = True
    # logging and checkpoints
    log_every: int = 10
    eval_every: int = 0  # 0 = at the end only
    save_every: int = 0  # 0 = at the end (and when stopped) only
    keep_checkpoints: int = 2
    resume: bool = False
    # hardware
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # autocast dtype on GPU: bf16 where supported, else fp16
    quantize: str = "none"  # none | nf4 | int8 (the frozen LLM)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen LLM's layers across ranks (FSDP2)

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if getattr(self, name) is None:
                raise ConfigError(f"'{name}' is required (--{name})")
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, not {self.stage}")
        if self.modality not in TRAIN_MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(TRAIN_MODALITIES)}")
        if self.stage == 3 and self.modality != "all":
            raise ConfigError("stage 3 trains on mixed data: use --modality all")
        if self.stage != 3 and self.modality == "all":
            raise ConfigError(f"stage {self.stage} trains one modality: image, speech or video")
        if self.stage == 1 and self.modality == "video":
            raise ConfigError("stage 1 trains image or speech (video starts from the image stage)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}")
        positive = ("batch_size", "grad_accum", "epochs", "keep_checkpoints", "bucket_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in ("max_steps", "stop_at_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.lr <= 0:
            raise ConfigError("lr must be positive")
        if min(self.warmup, self.log_every, self.eval_every, self.save_every, self.num_workers) < 0:
            raise ConfigError("warmup, log/eval/save intervals and num_workers must be >= 0")

    @property
    def balanced(self) -> bool:
        return self.stage == 3 if self.balance is None else self.balance

    @property
    def keep_video_audio(self) -> bool:
        return self.stage == 3 if self.video_audio is None else self.video_audio

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """A YAML value -> the field's type (paths, tuples), or ConfigError."""
    default = getattr(TrainConfig(), name)
    kind = _FIELDS[name].type
    if value is None:
        return None
    if "Path" in kind:
        return Path(value)
    if isinstance(default, bool) or kind == "bool | None":
        if not isinstance(value, bool):
            raise ConfigError(f"'{name}' must be true or false")
        return value
    if isinstance(default, tuple):
        return tuple(float(v) for v in value)
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"'{name}' must be a list of strings")
        return value
    try:
        if "float" in kind:
            return float(value)
        if "int" in kind:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"'{name}' has a bad value: {value!r}") from None
    return str(value)


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{path}: unknown option '{key}'")
        values[name] = _coerce(name, value)
    return values


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults, then the YAML file's values, then the flags that were given (not None)."""
    values = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    config = TrainConfig(**values)
    config.validate()
    return config
