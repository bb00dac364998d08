"""The model directories the recipes write: the base (pre-trained components + fresh interfaces),
the merge of the two `xllm train` chains, and the self-contained export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xllm.model.recipes.toy_world import Scale

COMPONENTS = ("llm", "vision", "speech")  # the frozen parts, one folder each


def qformer_kwargs(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, Any]:
    """`Blip2QFormerConfig` kwargs of the recipes' Q-Formers: cross-attention in every layer, and
    no dropout (BLIP-2's default is 0.1: on small data it slows the video Q-Former's learning of
    the direction of motion several times, DEMO_MODEL.md "Video")."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "cross_attention_frequency": 1,
        "vocab_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


def assemble_base(base: Path, scale: Scale, seed: int) -> dict[str, Any]:
    """BASE/xllm.json (components by relative path) and freshly initialised interfaces."""
    import torch

    from xllm.model.checkpoint import load_model, save_interfaces
    from xllm.model.config import (
        ComponentPath,
        QFormerInterfaceConfig,
        SamplingDefaults,
        SpeechInterfaceConfig,
        XLLMConfig,
    )

    s = scale
    config = XLLMConfig(
        llm=ComponentPath("llm"),
        vision=ComponentPath("vision"),
        speech=ComponentPath("speech"),
        image_interface=QFormerInterfaceConfig(
            num_query_tokens=s.queries,
            qformer=qformer_kwargs(s.qformer_hidden, s.qformer_layers, 4, 2 * s.qformer_hidden),
            max_frames=s.max_frames,
            video_fps=s.video_fps,
        ),
        speech_interface=SpeechInterfaceConfig(
            type="cformer", hidden_size=s.cformer_hidden, num_layers=2, num_heads=4
        ),
        sampling=SamplingDefaults(max_tokens=64),
        name="xllm-toy-world",
    )
    config.save(base)
    torch.manual_seed(seed)
    model = load_model(base, device="cpu", require_interfaces=False)
    save_interfaces(model, base)
    return {"interface_params": sum(v.numel() for v in model.interface_state_dict().values())}


def merge_chains(runs: Path) -> dict[str, Any]:
    """RUNS/merged: the image/video interfaces of the vision chain and the speech interface of
    the speech chain (each chain trained only its own interfaces)."""
    from safetensors.torch import load_file, save_file

    target = runs / "merged"
    target.mkdir(parents=True, exist_ok=True)
    vision = load_file(str(runs / "stage2-video" / "interfaces.safetensors"))
    speech = load_file(str(runs / "stage2-speech" / "interfaces.safetensors"))
    state = {k: v for k, v in vision.items() if not k.startswith("speech_interface.")}
    state.update({k: v for k, v in speech.items() if k.startswith("speech_interface.")})
    save_file(state, str(target / "interfaces.safetensors"))
    shutil.copy(runs / "stage2-video" / "xllm.json", target / "xllm.json")
    history = []
    for run in ("stage2-video", "stage2-speech"):
        path = runs / run / "training.json"
        if path.is_file():
            history.append(json.loads(path.read_text()))
    (target / "training.json").write_text(json.dumps({"merged": history}, indent=2) + "\n")
    return {"tensors": len(state)}


def export_model(base: Path, final: Path, target: Path) -> None:
    """TARGET: the base's components + the final run's interfaces, paths relative (so the folder
    is self-contained)."""
    from xllm.model.config import ComponentPath, XLLMConfig

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in COMPONENTS:
        shutil.copytree(base / name, target / name)
    config = XLLMConfig.load(final)
    config.llm, config.vision, config.speech = (ComponentPath(name) for name in COMPONENTS)
    config.save(target)
    shutil.copy(final / "interfaces.safetensors", target / "interfaces.safetensors")
    history = final / "training.json"
    if history.is_file():
        shutil.copy(history, target / "training.json")
