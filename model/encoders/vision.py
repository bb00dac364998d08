"""Frozen image encoder: BLIP-2's vision tower (EVA ViT-g/14 at 224 px for real checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import Blip2Config, Blip2VisionConfig, Blip2VisionModel
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from xllm.model.config import ModelConfigError


def read_model_type(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ModelConfigError(f"{config} not found")
    return json.loads(config.read_text()).get("model_type", "")


def load_prefixed_state_dict(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix` from a (possibly sharded) safetensors checkpoint, prefix stripped.

    Reads only the wanted keys, so taking the Q-Former out of a 4B-parameter BLIP-2 checkpoint
    never loads its language model.
    """
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"no *.safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = handle.get_tensor(key)
    if not state:
        raise ModelConfigError(f"no weights under '{prefix}' in {path}")
    return state


class VisionEncoder(nn.Module):
    """pixel_values (N, 3, S, S) -> patch features (N, 1 + (S/p)^2, vision_hidden)."""

    def __init__(self, model: Blip2VisionModel, processor: BlipImageProcessorPil) -> None:
        super().__init__()
        self.model = model
        self.processor = processor

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_pretrained(cls, path: Path, layers: int | None = None) -> VisionEncoder:
        """Load a saved `Blip2VisionModel`, or the vision tower of a full BLIP-2 checkpoint.

        `layers`: keep only the first blocks (the later ones are never run); the output is then
        that block's, through the tower's final LayerNorm.
        """
        model_type = read_model_type(path)
        if model_type == "blip-2":
            vision_config = Blip2Config.from_pretrained(path).vision_config
            model = Blip2VisionModel(vision_config)
            state = load_prefixed_state_dict(path, "vision_model.")
            missing, _ = model.load_state_dict(state, strict=False)
            if missing:
                raise ModelConfigError(f"{path}: vision weights missing: {missing[:5]}")
        elif model_type == "blip_2_vision_model":
            model = Blip2VisionModel.from_pretrained(path, dtype=torch.float32)
        else:
            raise ModelConfigError(
                f"{path}: expected a BLIP-2 checkpoint (model_type 'blip-2' or "
                f"'blip_2_vision_model'), found '{model_type}'"
            )
        if layers is not None:
            total = len(model.encoder.layers)
            if not 1 <= layers <= total:
                raise ModelConfigError(
                    f"'image_interface.vision_layers' is {layers}; the tower at {path} has "
                    f"{total} blocks"
                )
            model.encoder.layers = model.encoder.layers[:layers]
            model.config.num_hidden_layers = layers
        processor = BlipImageProcessorPil.from_pretrained(path)
        return cls(model.eval().requires_grad_(False), processor)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state


def tiny_vision_config(image_size: int = 32) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
