"""Pre-training the toy world's speech encoder: a small Whisper encoder trained with CTC over the
LLM tokenizer's word tokens on espeak-ng speech, some voice variants and speeds held out."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from xllm.model.recipes.pretrain import bar, edit_distance, train_steps

log = logging.getLogger("xllm.recipe")

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

    def loss_at(step: int) -> torch.Tensor:
        idx = gen.integers(0, len(features), batch_size)
        x = torch.from_numpy(features[idx].astype(np.float32))
        # SpecAugment-lite: a random time mask and frequency mask per batch.
        if gen.random() < 0.5:
            f0 = gen.integers(0, 70)
            x[:, f0 : f0 + gen.integers(0, 10)] = x.mean()
        logits = head(model(input_features=x).last_hidden_state)  # (B, T, C)
        y, y_len = targets([texts[i] for i in idx])
        return F.ctc_loss(
            logits.log_softmax(-1).transpose(0, 1),
            y,
            torch.full((batch_size,), frames, dtype=torch.long),
            y_len,
            zero_infinity=True,
        )

    train_steps(
        "pretrain speech (CTC)", opt, params, steps=steps, lr=lr, warmup=100, loss_at=loss_at
    )

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
