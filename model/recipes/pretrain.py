"""Pre-training the toy world's frozen components: tokenizer + GLM, BLIP-2 vision tower, Whisper.

Each function trains one component from scratch on CPU in minutes and returns its measured
figures (time, accuracy); the recipe (`toy_world.py`) saves them into a model directory.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from xllm.model.recipes.world import SPAN_TOKENS, Encoded, World, text_corpus
from xllm.model.train.toy import COLORS, SHAPES

log = logging.getLogger("xllm.recipe")


def bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, mininterval=5.0, smoothing=0.1, dynamic_ncols=True)


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- tokenizer + LLM ----------------------------------------------------------------------


def build_tokenizer(seed: int, vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from xllm.model.prompt import GLM4_CHAT_TEMPLATE
    from xllm.model.tiny import SPECIAL_TOKENS, TAG_TOKENS

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TAG_TOKENS + SPAN_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = text_corpus(random.Random(seed), 2000)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + TAG_TOKENS + SPAN_TOKENS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = GLM4_CHAT_TEMPLATE
    return fast


@dataclass
class LMSize:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    max_len: int = 2048


def build_glm(tokenizer, size: LMSize):
    from xllm.model.tiny import glm_for_tokenizer

    return glm_for_tokenizer(
        tokenizer,
        hidden=size.hidden,
        intermediate=size.intermediate,
        layers=size.layers,
        heads=size.heads,
        kv_heads=size.kv_heads,
        max_len=size.max_len,
    )


def lm_batch(
    model, world: World, rows: list[Encoded], noise: float, rng: torch.Generator | None = None
):
    """(inputs_embeds, attention_mask, labels) with stand-in span vectors (+ Gaussian noise)."""
    embed = model.get_input_embeddings()
    length = max(len(r.ids) for r in rows)
    pad = model.config.pad_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    span = torch.zeros(len(rows), length, dtype=torch.bool)
    px = torch.zeros(len(rows), length)
    py = torch.zeros(len(rows), length)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = torch.tensor(r.ids)
        mask[i, :n] = 1
        target = torch.tensor(r.labels)
        labels[i, :n] = torch.where(target, ids[i, :n], torch.full_like(ids[i, :n], -100))
        span[i, :n] = torch.tensor(r.span)
        px[i, :n] = torch.tensor(r.px)
        py[i, :n] = torch.tensor(r.py)
    x = embed(ids)
    weight = embed.weight
    x = x + px[..., None] * weight[world.px_id] + py[..., None] * weight[world.py_id]
    if noise > 0:
        scale = weight.detach().std() * noise
        per_row = torch.rand(len(rows), 1, 1, generator=rng)  # 0..noise, per dialogue
        x = x + span[..., None] * torch.randn(x.shape, generator=rng) * scale * per_row
    return x, mask, labels


def lm_accuracy(model, world: World, rows: list[Encoded], batch: int = 64) -> dict[str, float]:
    """Teacher-forced exact match of every answer token (= greedy correctness), per kind."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            x, mask, labels = lm_batch(model, world, chunk, 0.0)
            logits = model(inputs_embeds=x, attention_mask=mask).logits
            pred = logits[:, :-1].argmax(-1)
            gold = labels[:, 1:]
            # Every end-of-turn token ends generation alike (<|endoftext|> or <|user|>).
            stops = torch.tensor(model.generation_config.eos_token_id)
            same_stop = torch.isin(pred, stops) & torch.isin(gold, stops)
            ok = ((pred == gold) | (gold == -100) | same_stop).all(-1)
            for r, good in zip(chunk, ok.tolist(), strict=True):
                hits.setdefault(r.kind, []).append(good)
    model.train()
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    return out


def pretrain_lm(
    tokenizer,
    *,
    queries: int,
    max_frames: int,
    size: LMSize,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    noise: float = 0.5,
    pool: int = 20000,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
    init: str | None = None,
):
    """Train a GLM on toy-world dialogues whose answers must be read out of media spans.

    `init`: continue from a saved GLM (a fresh pool of dialogues)."""
    torch.manual_seed(seed)
    if init is not None:
        from transformers import GlmForCausalLM

        model = GlmForCausalLM.from_pretrained(init)
        seed += 1000
    else:
        model = build_glm(tokenizer, size)
    world = World(tokenizer, queries, max_frames)
    rng = random.Random(seed)
    t0 = time.time()
    rows = [world.encode(world.draw(rng)) for _ in range(pool)]
    log.info("LM corpus: %d dialogues in %.1fs", len(rows), time.time() - t0)
    test_rng = random.Random(seed + 10_000)
    test = [world.encode(world.draw(test_rng, kind)) for kind in world.KINDS for _ in range(60)]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    progress = bar(steps, "pretrain LLM")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine(step, steps, min(200, steps // 10 + 1))
        chunk = rng.sample(rows, batch_size)
        x, mask, labels = lm_batch(model, world, chunk, noise, gen)
        loss = model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if on_step:
            on_step(step)
        if (step + 1) % 250 == 0 and step + 1 < steps:
            log.info("LM step %d: copy test %s", step + 1, lm_accuracy(model, world, test[::4]))
    progress.close()
    accuracy = lm_accuracy(model, world, test)
    log.info("LM copy test (answers read from the media spans): %s", accuracy)
    return model, {"final_loss": float(np.mean(losses[-50:])), "copy_test": accuracy}


# --- vision tower -------------------------------------------------------------------------

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
    progress = bar(steps, "pretrain vision")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine(step, steps, 100)
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
        loss = (
            F.cross_entropy(color, y[:, 0].long())
            + F.cross_entropy(shape, y[:, 1].long())
            + F.binary_cross_entropy_with_logits(dark[:, 0], y[:, 4])
            + 5 * F.l1_loss(torch.sigmoid(where), y[:, 2:4])
            + F.binary_cross_entropy_with_logits(cover, y[:, 5:])
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 250 == 0 and step + 1 < steps:
            figures = vision_eval(model, head, test_images[:300], test_labels[:300])
            log.info("vision step %d: %s", step + 1, figures)
    progress.close()
    metrics = vision_eval(model, head, test_images, test_labels)
    log.info("vision tower on fresh toy images: %s", metrics)
    return model, metrics


# --- speech encoder -----------------------------------------------------------------------

# Voices: every accent of the spec; variants and speeds partly held out for evaluation.
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-029", "en-gb-scotland")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")
HELDOUT_VARIANTS = ("m6", "m7", "f4", "f5")
HELDOUT_SPEEDS = tuple(range(136, 145)) + tuple(range(176, 185))
TRAIN_SPEEDS = tuple(s for s in range(120, 201) if s not in HELDOUT_SPEEDS)


def speak(
    rng: random.Random, text: str, heldout: bool = False, pitch: bool = True
) -> tuple[np.ndarray, int]:
    """espeak-ng in a training (or held-out) voice variant and speed; random pitch in training."""
    import io
    import subprocess

    import soundfile as sf

    from xllm.model.train.toy import require_espeak

    variants = HELDOUT_VARIANTS if heldout else TRAIN_VARIANTS
    speeds = HELDOUT_SPEEDS if heldout else TRAIN_SPEEDS
    voice = f"{rng.choice(ACCENTS)}+{rng.choice(variants)}"
    cmd = [require_espeak(), "-v", voice, "-s", str(rng.choice(speeds))]
    if pitch and not heldout:
        cmd += ["-p", str(rng.randint(25, 75))]
    wav = subprocess.run([*cmd, "--stdout", text], check=True, capture_output=True).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return samples[:, 0], rate


def speech_clip(args: tuple[int, int, bool]) -> tuple[np.ndarray, str]:
    """16 kHz samples of one utterance (in a training voice, or a held-out one), band-limited
    through a random rate as the toy data is."""
    from xllm.model.recipes.world import utterance
    from xllm.model.train.toy import SAMPLE_RATES, resample

    seed, index, heldout = args
    rng = random.Random(f"speech/{seed}/{index}")
    text = utterance(rng)
    samples, rate = speak(rng, text, heldout=heldout)
    if rng.random() < 0.4:  # band-limited through a low rate, as 8-16 kHz files are
        target = rng.choice(SAMPLE_RATES[:3])
        samples = resample(samples, rate, target)
        rate = target
    samples = resample(samples, rate, 16000)
    gain = rng.uniform(0.3, 1.0) / max(1e-3, float(np.abs(samples).max()))
    return (samples * gain).astype(np.float32), text


def pretrain_speech(
    tokenizer,
    *,
    d_model: int = 96,
    layers: int = 3,
    heads: int = 4,
    window_seconds: int = 5,
    clips: int = 4000,
    steps: int = 1500,
    batch_size: int = 24,
    lr: float = 2e-3,
    jobs: int = 2,
    seed: int = 0,
    init: str | None = None,
):
    """A small Whisper encoder trained with CTC over the LLM tokenizer's word tokens.

    `init`: continue from a saved encoder (a fresh CTC head, fresh clips)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(seed)
    from xllm.model.encoders.speech import whisper_encoder_config

    config = whisper_encoder_config(d_model, layers, heads, window_seconds)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=window_seconds)
    model = WhisperEncoder(config)
    if init is not None:
        model = WhisperEncoder.from_pretrained(init)
        config, d_model = model.config, model.config.d_model
        seed += 1000

    def featurize(count: int, offset: int, desc: str, heldout: bool = False):
        feats, texts = [], []
        progress = bar(count, desc)
        jobs_list = [(seed, offset + i, heldout) for i in range(count)]
        # espeak-ng waits more than it computes: threads keep several running at once.
        with ThreadPoolExecutor(jobs) as pool:
            for samples, text in pool.map(speech_clip, jobs_list):
                f = extractor(samples, sampling_rate=16000, return_tensors="np")["input_features"]
                feats.append(f[0].astype(np.float16))
                texts.append(text)
                progress.update(1)
        progress.close()
        return np.stack(feats), texts

    features, texts = featurize(clips, 0, "speak clips")
    test_features, test_texts = featurize(150, 10_000_000, "speak test")
    # Held-out voice variants and speeds (as the recipe's heldout-voices/ evaluation uses).
    heldout_features, heldout_texts = featurize(150, 20_000_000, "speak held-out", heldout=True)
    # CTC classes: blank + the tokens the world's utterances use.
    vocab = sorted({i for t in texts + test_texts for i in tokenizer(t)["input_ids"]})
    index = {tok: k + 1 for k, tok in enumerate(vocab)}
    head = nn.Linear(d_model, len(vocab) + 1)

    def targets(batch_texts):
        rows = [[index[i] for i in tokenizer(t)["input_ids"]] for t in batch_texts]
        return torch.tensor([i for r in rows for i in r]), torch.tensor([len(r) for r in rows])

    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    gen = np.random.default_rng(seed)
    frames = config.max_source_positions
    progress = bar(steps, "pretrain speech (CTC)")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * cosine(step, steps, 100)
        idx = gen.integers(0, len(features), batch_size)
        x = torch.from_numpy(features[idx].astype(np.float32))
        # SpecAugment-lite: a random time mask and frequency mask per batch.
        if gen.random() < 0.5:
            f0 = gen.integers(0, 70)
            x[:, f0 : f0 + gen.integers(0, 10)] = x.mean()
        logits = head(model(input_features=x).last_hidden_state)  # (B, T, C)
        y, y_len = targets([texts[i] for i in idx])
        loss = F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1),
            y,
            torch.full((batch_size,), frames, dtype=torch.long),
            y_len,
            zero_infinity=True,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress.update(1)
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()

    # Greedy CTC decoding on fresh clips: word error rate.
    model.eval()
    inverse = {k: tok for tok, k in index.items()}

    def ctc_wer(features: np.ndarray, references: list[str]) -> float:
        errors = words = 0
        with torch.no_grad():
            for i in range(0, len(features), 64):
                x = torch.from_numpy(features[i : i + 64].astype(np.float32))
                best = head(model(input_features=x).last_hidden_state).argmax(-1)  # (B, T)
                for row, ref in zip(best.tolist(), references[i : i + 64], strict=True):
                    out, prev = [], 0
                    for c in row:
                        if c != prev and c != 0:
                            out.append(inverse[c])
                        prev = c
                    hyp = tokenizer.decode(out).split()
                    errors += edit_distance(ref.split(), hyp)
                    words += len(ref.split())
        return errors / words

    metrics = {
        "ctc_wer": ctc_wer(test_features, test_texts),
        "ctc_wer_heldout_voices": ctc_wer(heldout_features, heldout_texts),
    }
    log.info("speech encoder, CTC on fresh clips (training / held-out voices): %s", metrics)
    return model, extractor, metrics


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]
