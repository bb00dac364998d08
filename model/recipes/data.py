"""Toy-world data for the recipe: `xllm data toy`'s rows, with speech in training voices only.

The rows and media are exactly those of `xllm.model.train.toy` (same makers, same manifest
format); only the espeak-ng voice is drawn from the recipe's training variants and speeds (every
accent of the spec is in training), so held-out variants and speeds stay unseen for evaluation.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from xllm.model.recipes import pretrain_speech
from xllm.model.train import toy


def _training_speak(rng: random.Random, text: str):
    return pretrain_speech.speak(rng, text, heldout=False)


def _row(job: tuple[str, str, int, int, str]) -> dict[str, Any]:
    toy.speak = _training_speak  # this worker's toy speech: training voices
    return toy.make_row(job)


def _write(root: Path, plan: list[tuple], rows: list[dict[str, Any]]) -> dict[str, Path]:
    written: dict[str, Path] = {}
    for (manifest, split, *_), row in zip(plan, rows, strict=True):
        path = root / f"{manifest}_{split}.jsonl"
        if f"{manifest}_{split}" not in written:
            path.write_text("")
            written[f"{manifest}_{split}"] = path
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return written


def _cached_row(job: tuple[str, str, int, int, str]) -> dict[str, Any]:
    """A row, remembered in rows/ so an interrupted data phase does not redo it."""
    manifest, split, index, _, root = job
    memo = Path(root) / "rows" / f"{manifest}-{split}-{index:05d}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    row = _row(job)
    memo.write_text(json.dumps(row))
    return row


def generate_training_toy(
    out: Path, counts: dict[str, int], seed: int, jobs: int
) -> dict[str, Path]:
    """<manifest>_train.jsonl with counts[manifest] rows and <manifest>_val.jsonl (n/8, >= 4)."""
    from tqdm import tqdm

    toy.require_espeak()
    root = out.resolve()
    for folder in ("images", "audio", "videos", "mixed", "rows"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = [(m, "train", i, seed, str(root)) for m in toy.MANIFESTS for i in range(counts[m])]
    plan += [
        (m, "val", i, seed, str(root)) for m in toy.MANIFESTS for i in range(max(4, counts[m] // 8))
    ]
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        rows = list(
            tqdm(
                pool.map(_cached_row, plan, chunksize=4),
                total=len(plan),
                desc="toy data",
                mininterval=5,
            )
        )
    return _write(root, plan, rows)


def _heldout_row(job: tuple[int, int, str]) -> dict[str, Any]:
    index, seed, root = job
    rng = random.Random(f"heldout-voices/{seed}/{index}")
    text = toy.utterance(rng)
    samples, rate = pretrain_speech.speak(rng, text, heldout=True)
    import soundfile as sf

    target = rng.choice(toy.SAMPLE_RATES)
    fmt = rng.choice(sorted(toy.AUDIO_FORMATS))
    container, subtype = toy.AUDIO_FORMATS[fmt]
    path = Path(root) / "audio" / f"heldout-{index:05d}.{fmt}"
    sf.write(path, toy.resample(samples, rate, target), target, format=container, subtype=subtype)
    return {"audio": f"audio/{path.name}", "text": text}


def generate_heldout_speech(out: Path, n: int, seed: int, jobs: int) -> Path:
    """speech_heldout.jsonl: utterances in voice variants and speeds never used in training."""
    root = out.resolve()
    (root / "audio").mkdir(parents=True, exist_ok=True)
    jobs_list = [(i, seed, str(root)) for i in range(n)]
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        rows = list(pool.map(_heldout_row, jobs_list, chunksize=8))
    path = root / "speech_heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
