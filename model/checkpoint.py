"""Model directories: load an `XLLM` from `xllm.json` + components, save trained interfaces."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2Config

from xllm.model.config import (
    CONFIG_NAME,
    INTERFACES_NAME,
    ComponentPath,
    ModelConfigError,
    XLLMConfig,
    resolve,
)
from xllm.model.encoders.speech import SpeechEncoder
from xllm.model.encoders.vision import VisionEncoder, load_prefixed_state_dict
from xllm.model.llm import Quantize, cpu_bf16_is_fast, load_llm, pick_device, pick_dtype
from xllm.model.xllm import XLLM

log = logging.getLogger("xllm.model")


def load_model(
    model_dir: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    quantize: Quantize = "none",
    require_interfaces: bool = True,
) -> XLLM:
    """Load a model directory. Errors name the missing file or key (ModelConfigError).

    require_interfaces=False lets training start from fresh (or BLIP-2-initialised) interfaces.
    """
    model_dir = Path(model_dir)
    config = XLLMConfig.load(model_dir)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
        llm, tokenizer = load_llm(
            resolve(model_dir, config.llm, "llm"), torch_device, torch_dtype, quantize
        )
    vision = speech = None
    if config.vision is not None:
        layers = config.image_interface.vision_layers if config.image_interface else None
        vision = VisionEncoder.from_pretrained(
            resolve(model_dir, config.vision, "vision"), layers=layers
        )
    if config.speech is not None:
        interface = config.speech_interface
        speech = SpeechEncoder.from_pretrained(
            resolve(model_dir, config.speech, "speech"),
            window=interface.encoder_window if interface else "full",
            states=interface.speech_states if interface else "encoder",
        )
    if config.image_interface is not None and config.image_interface.init_from:
        blip2 = _resolve_path(model_dir, config.image_interface.init_from)
        config.image_interface.qformer = Blip2Config.from_pretrained(blip2).qformer_config.to_dict()
    model = XLLM(config, llm, tokenizer, vision, speech)
    if config.image_interface is not None and config.image_interface.init_from:
        load_blip2_qformer(model, _resolve_path(model_dir, config.image_interface.init_from))
    weights = model_dir / INTERFACES_NAME
    if weights.is_file():
        load_interfaces(model, weights)
    elif require_interfaces and model.interfaces():
        raise ModelConfigError(
            f"{weights} not found: the model directory has no trained interfaces"
        )
    # The frozen encoders run in the LLM's dtype on a GPU, and on the CPU in bfloat16 when that is
    # asked for and the CPU has native bfloat16 matmuls (oneDNN's AVX-512 / AMX; float16 has no
    # fast CPU path), else float32; the interfaces stay float32 (encode() casts between). The LLM
    # alone may be quantized.
    half_ok = torch_device.type == "cuda" or (torch_dtype == torch.bfloat16 and cpu_bf16_is_fast())
    encoder_dtype = torch_dtype if half_ok else torch.float32
    encoders = [m for m in (vision, speech) if m is not None]
    if torch_dtype == torch.bfloat16 and not half_ok and encoders:
        log.info("encoders run in float32: this CPU has no native bfloat16 matmuls")
    for module in encoders:
        module.to(torch_device, encoder_dtype)
    for module in model.interfaces().values():
        module.to(torch_device).eval().requires_grad_(False)
    if model.transcript_prior is not None:  # its piece table; no weights of its own
        model.transcript_prior.to(torch_device)
    return model


def _resolve_path(model_dir: Path, path: str) -> Path:
    return resolve(model_dir, ComponentPath(path), "image_interface.init_from")


def load_interfaces(model: XLLM, path: Path) -> None:
    state = load_file(str(path))
    modules = model.interfaces()
    for name, module in modules.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ModelConfigError(f"{path}: no weights for '{name}'")
        try:
            missing, unexpected = module.load_state_dict(own, strict=False)
        except RuntimeError as exc:  # shapes differ from what xllm.json configures
            raise ModelConfigError(
                f"{path}: '{name}' does not match xllm.json: {str(exc).splitlines()[-1].strip()}"
            ) from None
        if missing or unexpected:
            raise ModelConfigError(
                f"{path}: '{name}' missing keys {missing[:5]}, unexpected {unexpected[:5]}"
            )
    extra = sorted({k.split(".")[0] for k in state} - set(modules))
    if extra:
        raise ModelConfigError(f"{path}: weights for {extra}, which xllm.json does not configure")


def load_blip2_qformer(model: XLLM, path: Path) -> None:
    """Initialise the I2L and V2L Q-Formers and queries from a BLIP-2 checkpoint."""
    assert model.image_interface is not None and model.video_interface is not None
    qformer = load_prefixed_state_dict(path, "qformer.")
    for interface in (model.image_interface, model.video_interface):
        missing, _ = interface.qformer.load_state_dict(qformer, strict=False)
        if missing:
            raise ModelConfigError(f"{path}: Q-Former weights missing: {missing[:5]}")
    queries = load_prefixed_state_dict(path, "query_tokens")[""]
    if queries.shape != model.image_interface.query_tokens.shape:
        raise ModelConfigError(
            f"{path}: the checkpoint has {queries.shape[1]} query tokens but xllm.json sets "
            f"'image_interface.num_query_tokens' to {model.image_interface.num_query_tokens}"
        )
    with torch.no_grad():
        model.image_interface.query_tokens.copy_(queries)
        model.video_interface.query_tokens.copy_(
            queries
        )  # X-LLM: video starts from the image queries


def save_interfaces(model: XLLM, out_dir: str | Path, base_dir: str | Path | None = None) -> None:
    """Write a loadable model directory holding only the interfaces.

    Components are referenced by absolute path (to `base_dir`'s components when given), so a
    training run's output directory is usable at once by `xllm generate` and `xllm serve`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(model.config)
    if base_dir is not None:
        base = Path(base_dir).resolve()
        for name in ("llm", "vision", "speech"):
            component = getattr(config, name)
            if component is not None and component.pretrained is None:
                setattr(config, name, ComponentPath(str(resolve(base, component, name).resolve())))
        if config.image_interface is not None and config.image_interface.init_from:
            init = _resolve_path(base, config.image_interface.init_from).resolve()
            config.image_interface = dataclasses.replace(
                config.image_interface, init_from=str(init)
            )
    config.save(out)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.interface_state_dict().items()
    }
    save_file(state, str(out / INTERFACES_NAME))


def default_model_dir() -> Path:
    """The model used when none is named: the default model packaged with xllm (model/default:
    its trained interfaces; the frozen parts it names are fetched into $XLLM_HOME on first use)."""
    default = Path(__file__).parent / "default"
    if not (default / CONFIG_NAME).is_file():
        raise ModelConfigError(
            f"the packaged default model is missing ({default}); pass --model DIR "
            "(or rebuild it: python -m xllm.model.recipes.default_model --out DIR --install)"
        )
    return default
