"""Pre-training the toy world's vision tower: a small `Blip2VisionModel` that tells a toy image's
colour, shape, background and centre, and which patches the shape covers."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from xllm.model.recipes.pretrain import bar, train_steps
from xllm.model.train.toy import COLORS, SHAPES

log = logging.getLogger("xllm.recipe")

COLOR_NAMES = sorted(COLORS)


def render_example(args: tuple[int, int, int]) -> tuple[np.ndarray, list[float]]:
    """One toy image (as `xllm data toy` or a video frame draws it), encoded in a random format,
    decoded and resized to the tower's input; label = [color, shape, cx, cy, dark]."""
    import io

    from PIL import Image

    from xllm.model.train import toy

    seed, index, image_size, grid = args
    rng = random.Random(f"vision/{seed}/{index}")
    scene = toy.random_scene(rng)
    if rng.random() < 0.6:  # still image
        width, height = toy.random_size(rng, 64, 512)
        radius = rng.uniform(0.25, 0.70) * min(width, height) / 2
    else:  # video frame
        width, height = toy.random_size(rng, 96, 256, even=True)
        radius = rng.uniform(0.20, 0.45) * min(width, height) / 2
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    # Drawn at most 3x the tower's input size (what survives the resize), for speed.
    k = min(1.0, 3 * image_size / max(width, height))
    size = (max(1, round(width * k)), max(1, round(height * k)))
    angle = rng.uniform(0, 7)
    image = toy.draw(scene, size, (centre[0] * k, centre[1] * k), radius * k, angle)
    # Which patches the shape covers (a per-patch target that teaches patch tokens geometry).
    ink = toy.Scene(scene.color, scene.shape, (255, 255, 255), (0, 0, 0))
    mask = toy.draw(ink, size, (centre[0] * k, centre[1] * k), radius * k, angle).convert("L")
    cover = np.asarray(mask.resize((grid, grid), Image.Resampling.BOX), dtype=np.float32) / 255
    fmt = rng.choice(("png", "jpeg", "webp"))
    if fmt != "png":
        buffer = io.BytesIO()
        image.save(buffer, format=fmt.upper(), quality=rng.randint(60, 95))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    # The BLIP image processor's resize: bicubic to a square (aspect 3:4..4:3 squashes mildly).
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    label = [
        COLOR_NAMES.index(scene.color),
        SHAPES.index(scene.shape),
        centre[0] / width,
        centre[1] / height,
        float(sum(scene.background) < 300),
        *cover.reshape(-1).tolist(),
    ]
    return np.asarray(image, dtype=np.uint8), label


def render_pool(seed: int, count: int, image_size: int, grid: int, jobs: int, desc: str):
    from concurrent.futures import ProcessPoolExecutor

    jobs_list = [(seed, i, image_size, grid) for i in range(count)]
    images = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    labels = np.zeros((count, 5 + grid * grid), dtype=np.float32)
    progress = bar(count, desc)
    with ProcessPoolExecutor(jobs) as pool:
        for i, (image, label) in enumerate(pool.map(render_example, jobs_list, chunksize=64)):
            images[i], labels[i] = image, label
            progress.update(1)
    progress.close()
    return images, labels


class VisionHeads(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.color = nn.Linear(hidden, len(COLOR_NAMES))
        self.shape = nn.Linear(hidden, len(SHAPES))
        self.dark = nn.Linear(hidden, 1)
        self.where = nn.Linear(hidden, 2)
        self.cover = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Class heads read the [CLS] token; `cover` reads every patch token."""
        pooled = states[:, 0]
        cover = self.cover(states[:, 1:])[..., 0]  # (N, patches)
        return (
            self.color(pooled),
            self.shape(pooled),
            self.dark(pooled),
            self.where(pooled),
            cover,
        )


def vision_config(image_size: int, patch: int, hidden: int, layers: int, heads: int):
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch,
        attention_dropout=0.0,
        # Blip2VisionConfig defaults to 1e-10 (BLIP-2 is always loaded pre-trained): from
        # scratch that starts every weight at ~0 and the tower barely learns shape or position.
        initializer_range=0.02,
    )


def pixels_of(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> BLIP-normalised float (N, 3, S, S), as BlipImageProcessor does."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_CLIP_STD)[None, :, None, None]
    return (x - mean) / std


def vision_eval(model, heads, images, labels, batch: int = 256) -> dict[str, float]:
    model.eval()
    right = np.zeros(3)
    where_err = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            states = model(pixel_values=pixels_of(images[i : i + batch])).last_hidden_state
            color, shape, _, where, _ = heads(states)
            y = torch.from_numpy(labels[i : i + batch])
            c_ok = color.argmax(-1) == y[:, 0].long()
            s_ok = shape.argmax(-1) == y[:, 1].long()
            right += [c_ok.sum().item(), s_ok.sum().item(), (c_ok & s_ok).sum().item()]
            where_err += (torch.sigmoid(where) - y[:, 2:4]).abs().sum().item()
    model.train()
    n = len(images)
    return {
        "color": right[0] / n,
        "shape": right[1] / n,
        "color_and_shape": right[2] / n,
        "centre_mae": where_err / (2 * n),
    }


def pretrain_vision(
    *,
    image_size: int = 64,
    patch: int = 8,
    hidden: int = 96,
    layers: int = 4,
    heads: int = 4,
    pool: int = 30000,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    jobs: int = 2,
    seed: int = 0,
    init: str | None = None,
):
    """A small `Blip2VisionModel` trained to tell colour, shape, background and the centre.

    `init`: continue from a saved tower (fresh heads, a fresh pool of images)."""
    from transformers import Blip2VisionModel

    torch.manual_seed(seed)
    if init is not None:
        model = Blip2VisionModel.from_pretrained(init)
        hidden, image_size = model.config.hidden_size, model.config.image_size
        seed += 1000
    else:
        model = Blip2VisionModel(vision_config(image_size, patch, hidden, layers, heads))
    head = VisionHeads(hidden)
    grid = image_size // model.config.patch_size
    images, labels = render_pool(seed, pool, image_size, grid, jobs, "render images")
    test_images, test_labels = render_pool(seed + 1, 600, image_size, grid, jobs, "render test")
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = np.random.default_rng(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = gen.integers(0, len(images), batch_size)
        batch = images[idx]
        y = torch.from_numpy(labels[idx])
        flip = gen.random() < 0.5  # a mirrored image keeps colour and shape
        if flip:
            batch = batch[:, :, ::-1].copy()
            y = y.clone()
            y[:, 2] = 1 - y[:, 2]
            y[:, 5:] = y[:, 5:].reshape(-1, grid, grid).flip(-1).reshape(len(y), -1)
        states = model(pixel_values=pixels_of(batch)).last_hidden_state
        color, shape, dark, where, cover = head(states)
        return (
            F.cross_entropy(color, y[:, 0].long())
            + F.cross_entropy(shape, y[:, 1].long())
            + F.binary_cross_entropy_with_logits(dark[:, 0], y[:, 4])
            + 5 * F.l1_loss(torch.sigmoid(where), y[:, 2:4])
            + F.binary_cross_entropy_with_logits(cover, y[:, 5:])
        )

    def after_step(step: int) -> None:
        if (step + 1) % 250 == 0 and step + 1 < steps:
            figures = vision_eval(model, head, test_images[:300], test_labels[:300])
            log.info("vision step %d: %s", step + 1, figures)

    train_steps(
        "pretrain vision",
        opt,
        params,
        steps=steps,
        lr=lr,
        warmup=100,
        loss_at=loss_at,
        after_step=after_step,
    )
    metrics = vision_eval(model, head, test_images, test_labels)
    log.info("vision tower on fresh toy images: %s", metrics)
    return model, metrics
