"""ONNX export of a transformers `Dinov2Model` -> `Blip2VisionModel` (xllm's vision tower).

Why: a small pretrained ViT reaches us only as an ONNX graph (a DINOv2 backbone with a task head
behind it). Its initializers hold every backbone weight, so the backbone can be rebuilt exactly,
and a DINOv2 ViT is a BLIP-2 ViT up to three reparametrisations, which lets xllm's
`VisionEncoder` load it unchanged.

Step 1, ONNX -> `Dinov2Model` (torch's TorchScript exporter's naming):
    - most initializers keep their HF names, under the exported module's prefix (`backbone.`);
    - Linear weights are folded into unnamed `onnx::MatMul_*` initializers, stored transposed
      (in, out): each takes its name from the bias `Add` right after its `MatMul`;
    - the position embeddings (1, 1 + G*G, D) are split by the traced interpolation into the
      class token's (1, 1, D), consumed by a `Concat`, and the patch grid's (1, G*G, D),
      consumed by a `Reshape`;
    - head count and LayerNorm epsilon are not tensors: they are read from the graph (the
      attention-score scale, the constant under each LayerNorm's `Sqrt`).
Step 2, `Dinov2Model` -> `Blip2VisionModel` at `image_size`:
    - LayerScale (y = lambda * W x + lambda * b) is folded into the attention output and fc2;
    - q, k, v are fused into `qkv` (weight (3D, D), bias (3D,));
    - the position embeddings are resampled to the (image_size / patch)^2 grid with DINOv2's own
      bicubic interpolation, so both models compute the same function at that size.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import Blip2VisionModel, Dinov2Model
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

DINOV2_HEAD_DIM = 64  # every released DINOv2 ViT (S, B, L, g); used when the graph does not say
PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"
BACKBONE_SCOPES = ("embeddings.", "encoder.layer.", "layernorm.")  # Dinov2Model's children
# transformers 5 renamed DINOv2's attention projections (its loader renames old checkpoints).
LEGACY_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
NODE_SCOPE = re.compile(r"^/(.+)/[^/]+$")  # "/backbone/encoder/layer.0/mlp/fc1/MatMul"


class OnnxDinov2Error(ValueError):
    """The ONNX graph is not a DINOv2 backbone export this converter understands."""


class _Graph:
    """Initializers, constants and producer/consumer maps of an ONNX graph."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants = dict(self.initializers)
        for node in self.nodes:
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attribute.t)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def split_constant(self, node: Any) -> tuple[float | None, str]:
        """A binary node's (scalar constant operand, other operand)."""
        a, b = node.input[0], node.input[1]
        if self.scalar(b) is not None:
            return self.scalar(b), a
        return self.scalar(a), b


def _attention_scale(graph: _Graph) -> float | None:
    """The factor the attention scores are scaled by, from the first `Softmax`'s inputs.

    Exporters scale the scores after q.k^T, or q and k^T each by the square root before it.
    """

    def scaled(name: str, scale: float) -> tuple[float, Any]:
        node = graph.producer.get(name)
        while node is not None and node.op_type in ("Mul", "Div", "Transpose"):
            if node.op_type == "Transpose":
                node = graph.producer.get(node.input[0])
                continue
            constant, other = graph.split_constant(node)
            if constant is None:
                break
            scale = scale * constant if node.op_type == "Mul" else scale / constant
            node = graph.producer.get(other)
        return scale, node

    softmax = next((n for n in graph.nodes if n.op_type == "Softmax"), None)
    if softmax is None:
        return None
    scale, matmul = scaled(softmax.input[0], 1.0)
    if matmul is None or matmul.op_type != "MatMul":
        return None
    for name in matmul.input:
        scale, _ = scaled(name, scale)
    return scale


def _layer_norm_eps(graph: _Graph) -> float | None:
    """The epsilon under each decomposed LayerNorm's `Sqrt(variance + eps)`, if they agree."""
    values = set()
    for node in graph.nodes:
        if node.op_type != "Sqrt":
            continue
        add = graph.producer.get(node.input[0])
        if add is not None and add.op_type == "Add":
            constant, _ = graph.split_constant(add)
            if constant is not None:
                values.add(constant)
    # Stored as float32: print it back at float32's precision (1e-06, not 9.99999997e-07).
    return float(f"{values.pop():.7g}") if len(values) == 1 else None


def dinov2_state_dict_from_onnx(graph: _Graph) -> tuple[dict[str, torch.Tensor], str]:
    """HF `Dinov2Model` state dict (without `mask_token`) and the prefix the export used."""
    prefix_keys = [k for k in graph.initializers if k.endswith(PATCH_WEIGHT)]
    if len(prefix_keys) != 1:
        raise OnnxDinov2Error(f"no single '{PATCH_WEIGHT}' initializer: not a DINOv2 export")
    prefix = prefix_keys[0][: -len(PATCH_WEIGHT)]
    state: dict[str, np.ndarray] = {
        k[len(prefix) :]: v
        for k, v in graph.initializers.items()
        if k.startswith(prefix) and k[len(prefix) :].startswith(BACKBONE_SCOPES)
    }
    unnamed = set(graph.initializers) - {prefix + k for k in state}

    # Linear weights: MatMul(x, W (in, out)) followed by Add(bias `<module>.bias`).
    for node in graph.nodes:
        if node.op_type != "MatMul" or node.input[1] not in unnamed:
            continue
        module = None
        for add in graph.consumers.get(node.output[0], []):
            bias = next((i for i in add.input if i != node.output[0]), "")
            if add.op_type == "Add" and bias.startswith(prefix) and bias.endswith(".bias"):
                module = bias[len(prefix) : -len(".bias")]
        if module is None and (match := NODE_SCOPE.match(node.name)):
            module = match.group(1).replace("/", ".")[len(prefix) :]
        if module is None:
            raise OnnxDinov2Error(f"cannot name the weight {node.input[1]} of {node.name}")
        state[f"{module}.weight"] = graph.initializers[node.input[1]].T

    # Position embeddings: the class token's part feeds a Concat, the patch grid's a Reshape.
    if "embeddings.position_embeddings" not in state:
        class_pos = patch_pos = None
        for name in unnamed:
            value = graph.initializers[name]
            if value.ndim != 3 or value.dtype != np.float32:
                continue
            ops = {c.op_type for c in graph.consumers.get(name, [])}
            if "Concat" in ops and value.shape[1] == 1:
                class_pos = value
            elif "Reshape" in ops and value.shape[1] > 1:
                patch_pos = value
        if class_pos is None or patch_pos is None:
            raise OnnxDinov2Error("position embeddings not found (class Concat + grid Reshape)")
        state["embeddings.position_embeddings"] = np.concatenate([class_pos, patch_pos], axis=1)
    return {
        _current_name(k): torch.from_numpy(np.array(v))
        for k, v in state.items()  # copies
    }, prefix


def _current_name(name: str) -> str:
    """Names of exports made with transformers < 5 -> today's `Dinov2Model` names."""
    for old, new in LEGACY_NAMES:
        name = name.replace(old, new)
    return name


def dinov2_from_onnx(onnx_path: Path, num_attention_heads: int | None = None) -> Dinov2Model:
    """Rebuild the `Dinov2Model` an ONNX file was exported from (float32, eval mode)."""
    import onnx
    from transformers import Dinov2Config, Dinov2Model

    graph = _Graph(onnx.load(str(onnx_path)))
    state, _ = dinov2_state_dict_from_onnx(graph)
    hidden = state["embeddings.cls_token"].shape[-1]  # (1, 1, D)
    patch = state[PATCH_WEIGHT].shape[-1]  # (D, 3, p, p)
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)  # (1, 1+G*G, D)
    layers = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))
    )
    if any("weights_in" in k for k in state):
        raise OnnxDinov2Error("SwiGLU DINOv2 (ViT-g) exports are not supported")
    if num_attention_heads is None:
        scale = _attention_scale(graph)
        head_dim = round(scale**-2) if scale else DINOV2_HEAD_DIM
        num_attention_heads = hidden // head_dim
    mlp_hidden = state["encoder.layer.0.mlp.fc1.weight"].shape[0]  # (ratio * D, D)
    if mlp_hidden % hidden:
        raise OnnxDinov2Error(f"MLP width {mlp_hidden} is not a multiple of the width {hidden}")
    mlp_ratio = mlp_hidden // hidden
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        mlp_ratio=mlp_ratio,
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=_layer_norm_eps(graph) or 1e-6,
        qkv_bias="encoder.layer.0.attention.q_proj.bias" in state,
    )
    model = Dinov2Model(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise OnnxDinov2Error(f"weights do not fit: missing {missing[:5]}, extra {unexpected[:5]}")
    return model.requires_grad_(False)


def blip2_vision_from_dinov2(dinov2: Dinov2Model, image_size: int) -> Blip2VisionModel:
    """The `Blip2VisionModel` computing what `dinov2` computes on image_size x image_size input.

    Its `last_hidden_state` (N, 1 + (image_size / p)^2, D) is DINOv2's (after the final norm).
    """
    from transformers import Blip2VisionConfig, Blip2VisionModel

    c = dinov2.config
    if c.use_swiglu_ffn:
        raise OnnxDinov2Error("a SwiGLU MLP has no BLIP-2 equivalent")
    config = Blip2VisionConfig(
        hidden_size=c.hidden_size,
        intermediate_size=int(c.hidden_size * c.mlp_ratio),
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        image_size=image_size,
        patch_size=c.patch_size,
        hidden_act=c.hidden_act,
        layer_norm_eps=c.layer_norm_eps,
        qkv_bias=True,
        attention_dropout=0.0,
    )
    d = {k: v.detach() for k, v in dinov2.state_dict().items()}
    grid = image_size // c.patch_size
    with torch.no_grad():  # DINOv2's own resampling of its position grid
        dummy = torch.zeros(1, 1 + grid * grid, c.hidden_size)
        positions = dinov2.embeddings.interpolate_pos_encoding(dummy, image_size, image_size)
    state = {
        "embeddings.class_embedding": d["embeddings.cls_token"],  # (1, 1, D)
        "embeddings.patch_embedding.weight": d[PATCH_WEIGHT],  # (D, 3, p, p)
        "embeddings.patch_embedding.bias": d["embeddings.patch_embeddings.projection.bias"],
        "embeddings.position_embedding": positions.clone(),  # (1, 1 + grid^2, D)
        "post_layernorm.weight": d["layernorm.weight"],
        "post_layernorm.bias": d["layernorm.bias"],
    }
    zeros = torch.zeros(c.hidden_size)
    for i in range(c.num_hidden_layers):
        src, dst = f"encoder.layer.{i}", f"encoder.layers.{i}"
        attn = f"{src}.attention"
        scale1 = d[f"{src}.layer_scale1.lambda1"]  # (D,)
        scale2 = d[f"{src}.layer_scale2.lambda1"]
        state |= {
            f"{dst}.layer_norm1.weight": d[f"{src}.norm1.weight"],
            f"{dst}.layer_norm1.bias": d[f"{src}.norm1.bias"],
            f"{dst}.layer_norm2.weight": d[f"{src}.norm2.weight"],
            f"{dst}.layer_norm2.bias": d[f"{src}.norm2.bias"],
            f"{dst}.self_attn.qkv.weight": torch.cat(  # (3D, D)
                [d[f"{attn}.{p}_proj.weight"] for p in "qkv"]
            ),
            f"{dst}.self_attn.qkv.bias": torch.cat(  # (3D,)
                [d.get(f"{attn}.{p}_proj.bias", zeros) for p in "qkv"]
            ),
            f"{dst}.self_attn.projection.weight": scale1[:, None] * d[f"{attn}.o_proj.weight"],
            f"{dst}.self_attn.projection.bias": scale1 * d[f"{attn}.o_proj.bias"],
            f"{dst}.mlp.fc1.weight": d[f"{src}.mlp.fc1.weight"],
            f"{dst}.mlp.fc1.bias": d[f"{src}.mlp.fc1.bias"],
            f"{dst}.mlp.fc2.weight": scale2[:, None] * d[f"{src}.mlp.fc2.weight"],
            f"{dst}.mlp.fc2.bias": scale2 * d[f"{src}.mlp.fc2.bias"],
        }
    model = Blip2VisionModel(config).to(d[PATCH_WEIGHT].dtype).eval()
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False)


def image_processor(image_size: int) -> BlipImageProcessorPil:
    """DINOv2's preprocessing as a BLIP image processor: bicubic resize, ImageNet mean / std."""
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        PILImageResampling,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def convert_onnx_dinov2(
    onnx_path: Path, out_dir: Path, image_size: int = 224, num_attention_heads: int | None = None
) -> Path:
    """Write a `Blip2VisionModel` directory (float32 weights + image processor) from the export."""
    dinov2 = dinov2_from_onnx(onnx_path, num_attention_heads)
    if image_size % dinov2.config.patch_size:
        raise OnnxDinov2Error(f"image_size {image_size} is not a multiple of the patch size")
    model = blip2_vision_from_dinov2(dinov2, image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    image_processor(image_size).save_pretrained(out_dir)
    return out_dir
