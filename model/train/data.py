"""Training data: JSONL manifests, length-bucketed deterministic batches, media decoded in workers.

A manifest has one JSON object per line. Media paths are relative to the manifest's folder (or
absolute); each media key holds one path or a list of paths:

    {"image": "images/0001.png", "text": "A red circle."}
    {"audio": ["a.wav"], "text": "a red circle"}
    {"video": "v.mp4", "image": "i.png", "conversations": [
        {"role": "user", "content": "<video> <image> Same shape?"},
        {"role": "assistant", "content": "Yes."}]}

`text` is a caption or transcript; `conversations` is a chat whose `<image>`/`<audio>`/`<video>`
placeholders bind, in order, to the row's media of that kind. Rows that cannot be used (bad JSON,
missing files, a malformed chat, media the stage does not train) are skipped and counted when the
manifest is read; media that fails to decode is dropped from its batch and counted there, so a
bad file never stops an epoch.

Batches are planned up front from (seed, epoch) alone: the same run always sees the same batches
in the same order, and a resumed run skips exactly the batches already consumed.
"""

from __future__ import annotations

import gc
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xllm.model.config import MODALITIES, Modality
from xllm.model.media import MediaError
from xllm.model.preprocess import MediaPreparer
from xllm.model.prompt import ROLES, PromptError, bind_media

log = logging.getLogger(__name__)

Turns = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Example:
    """One usable manifest row."""

    source: str  # "manifest.jsonl:line" for messages
    media: tuple[tuple[Modality, Path], ...]  # absolute paths, images then audio then video
    text: str | None = None
    turns: Turns | None = None  # (role, content) pairs

    @property
    def kinds(self) -> list[Modality]:
        return [kind for kind, _ in self.media]

    @property
    def group(self) -> str:
        """The modality signature ('audio+image', 'video', ...) used for balancing and buckets."""
        return "+".join(sorted(set(self.kinds))) or "text"

    def length(self, media_tokens: dict[Modality, int]) -> int:
        """Estimated prompt length in LLM tokens (about 4 characters a token), for bucketing."""
        chars = len(self.text or "") + sum(len(content) for _, content in self.turns or ())
        return chars // 4 + 1 + sum(media_tokens.get(kind, 1) for kind in self.kinds)


@dataclass
class Manifest:
    examples: list[Example] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows

    def extend(self, other: Manifest) -> None:
        self.examples += other.examples
        self.skipped.update(other.skipped)

    def describe(self, name: str) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return f"{name}: {len(self.examples)} rows used, {skipped} skipped" + (
            f" ({reasons})" if reasons else ""
        )


class RowError(ValueError):
    """Why a row is unusable: the message is the reason counted in the log."""


def _paths(value: Any, root: Path, key: str) -> list[Path]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise RowError(f"bad '{key}' value")
    paths = [p if p.is_absolute() else root / p for p in map(Path, values)]
    if not all(p.is_file() for p in paths):
        raise RowError("missing media file")
    return paths


def _turns(value: Any) -> Turns:
    if not isinstance(value, list) or not value:
        raise RowError("bad conversations")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise RowError("bad conversations")
        if not isinstance(turn.get("content"), str):
            raise RowError("bad conversations")
        turns.append((turn["role"], turn["content"]))
    if turns[-1][0] != "assistant":
        raise RowError("conversation does not end with an assistant answer")
    return tuple(turns)


def parse_row(raw: Any, root: Path, source: str) -> Example:
    """A manifest row -> Example, or RowError naming what is wrong."""
    if not isinstance(raw, dict):
        raise RowError("not a JSON object")
    media = [(kind, p) for kind in MODALITIES if kind in raw for p in _paths(raw[kind], root, kind)]
    if not media:
        raise RowError("no media")
    text = raw.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise RowError("bad text")
    turns = _turns(raw["conversations"]) if "conversations" in raw else None
    if text is None and turns is None:
        raise RowError("neither text nor conversations")
    if turns is not None:
        try:
            bind_media(turns, [kind for kind, _ in media])
        except PromptError:
            raise RowError("placeholders do not match the media") from None
    return Example(source, tuple(media), text.strip() if text else None, turns)


def read_manifest(path: Path, accept: Callable[[Example], str | None] | None = None) -> Manifest:
    """Parse a manifest; `accept` may return a reason to skip an otherwise valid row."""
    manifest = Manifest()
    root = path.parent.resolve()
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                example = parse_row(json.loads(line), root, f"{path.name}:{number}")
            except json.JSONDecodeError:
                manifest.skipped["bad JSON"] += 1
                continue
            except RowError as exc:
                manifest.skipped[str(exc)] += 1
                continue
            reason = accept(example) if accept else None
            if reason:
                manifest.skipped[reason] += 1
            else:
                manifest.examples.append(example)
    return manifest


def manifest_files(data: Path, pattern: str) -> list[Path]:
    """A manifest file, or the manifests in a folder matching `pattern` (e.g. '*_train.jsonl')."""
    if data.is_dir():
        files = sorted(data.glob(pattern))
        if not files:
            raise FileNotFoundError(f"no {pattern} manifests in {data}")
        return files
    if not data.is_file():
        raise FileNotFoundError(f"data not found: {data}")
    return [data]


# --- batch planning -----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """Deterministic batches for every epoch, bucketed by length, optionally balanced.

    Each epoch: an order of examples (a seeded permutation, or with `balance` a seeded draw that
    picks each modality group equally often, cycling through each group's shuffled rows); the
    order is cut into windows of `bucket_batches` batches, each window sorted by (group, length)
    and cut into batches, so a batch holds rows of one modality and similar length; then the
    batches are shuffled. Ranks take every world_size-th batch.
    """

    lengths: tuple[int, ...]
    groups: tuple[str, ...]
    batch_size: int
    seed: int
    balance: bool = False
    bucket_batches: int = 16

    def order(self, rng: np.random.Generator) -> list[int]:
        n = len(self.lengths)
        if not self.balance:
            return rng.permutation(n).tolist()
        by_group: dict[str, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        names = sorted(by_group)
        pools = {g: rng.permutation(by_group[g]).tolist() for g in names}
        cursor = dict.fromkeys(names, 0)
        order = []
        for pick in rng.integers(0, len(names), size=n):
            group = names[pick]
            if cursor[group] == len(pools[group]):  # a small group is cycled, reshuffled
                pools[group], cursor[group] = rng.permutation(by_group[group]).tolist(), 0
            order.append(pools[group][cursor[group]])
            cursor[group] += 1
        return order

    def epoch(self, epoch: int) -> list[list[int]]:
        """All batches of an epoch (every rank's), as lists of example indices."""
        rng = np.random.default_rng([self.seed, epoch])
        order = self.order(rng)
        window = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(
                order[start : start + window], key=lambda i: (self.groups[i], self.lengths[i])
            )
            batches += [
                chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)
            ]
        return [batches[i] for i in rng.permutation(len(batches))]

    def rank_batches(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:
        """This rank's batches; every rank gets the same number (the remainder is dropped)."""
        batches = self.epoch(epoch)
        usable = len(batches) - len(batches) % world_size
        return batches[rank:usable:world_size]

    def stream(
        self, rank: int, world_size: int, epoch: int, start: int, per_epoch: int
    ) -> Iterator[list[int]]:
        """This rank's batches from batch `start` of `epoch` on, epoch after epoch, each epoch cut
        to `per_epoch` batches (a whole number of optimizer steps)."""
        while True:
            yield from self.rank_batches(epoch, rank, world_size)[start:per_epoch]
            epoch, start = epoch + 1, 0

    def batches_per_rank(self, world_size: int) -> int:
        """Batches each rank gets per epoch (the same for every epoch)."""
        window = self.batch_size * self.bucket_batches
        full, rest = divmod(len(self.lengths), window)
        batches = full * self.bucket_batches + -(-rest // self.batch_size)
        return batches // world_size


# --- decoding in workers ------------------------------------------------------------------


@dataclass
class Sample:
    """A decoded example: its media prepared for the encoders (CPU tensors)."""

    example: Example
    media: list[Any]  # PreparedMedia, in the example's media order


@dataclass
class Batch:
    samples: list[Sample]
    skipped: int = 0  # rows of this batch dropped because their media did not decode
    errors: list[str] = field(default_factory=list)


class MediaDataset(Dataset):
    """Decodes and prepares one example's media: a Sample, or the error message of a bad row.

    Media go through the model's `MediaPreparer` (decoder by kind, the video interface's frame
    rate and count, image processor, log-mel features) as they do in the server; it holds no
    weights, so it runs in forked DataLoader workers. `video_audio` keeps a video's audio track
    (stage 3); stage 2 video leaves it out.
    """

    def __init__(
        self, examples: Sequence[Example], preparer: MediaPreparer, video_audio: bool
    ) -> None:
        self.examples = list(examples)
        self.preparer = preparer
        self.video_audio = video_audio

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Sample | str:
        example = self.examples[index]
        try:
            media = [
                self.preparer.prepare_file(path, kind, video_audio=self.video_audio)
                for kind, path in example.media
            ]
        except (MediaError, ValueError) as exc:
            return f"{example.source}: {exc}"
        return Sample(example, media)


def collate(items: Iterable[Sample | str]) -> Batch:
    batch = Batch(samples=[])
    for item in items:
        if isinstance(item, Sample):
            batch.samples.append(item)
        else:
            batch.skipped += 1
            batch.errors.append(item)
    return batch


def _worker_init(worker_id: int) -> None:
    # Decoding is per-item work: one thread per worker keeps N workers on N cores.
    torch.set_num_threads(1)


class _ForkingLoader(DataLoader):
    """Collects the parent's garbage before its workers are forked: a forked child inherits
    it, and when the child's collector then frees an inherited PyAV container, FFmpeg waits on
    codec threads that do not exist in the child (a hang)."""

    def __iter__(self):  # type: ignore[override]
        if self.num_workers > 0:
            gc.collect()
        return super().__iter__()


def make_loader(
    dataset: MediaDataset, batches: Iterable[list[int]], workers: int, seed: int
) -> DataLoader:
    """A loader over planned batches; workers decode ahead of the training loop."""
    return _ForkingLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        # Workers are forked: the model's preprocessing settings are shared, not pickled.
        multiprocessing_context="fork" if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # A private generator: making the iterator must not draw from the global RNG, whose
        # state a resumed run restores exactly.
        generator=torch.Generator().manual_seed(seed),
    )
