"""The manifest loader: relative paths, lists of media, bad rows counted, bucketed batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from xllm.model.preprocess import MediaPreparer
from xllm.model.train.data import (
    BatchPlan,
    MediaDataset,
    collate,
    make_loader,
    read_manifest,
)


def write_manifest(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def preparer(tiny_model_dir: Path) -> MediaPreparer:
    """The tiny model's media preparer (weights-free), as the training loop hands it over."""
    return MediaPreparer.from_pretrained(tiny_model_dir)


def test_relative_paths_and_lists(media, tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    media.png("a.png").rename(root / "img" / "a.png")
    media.png("b.png", seed=1).rename(root / "img" / "b.png")
    audio = media.wav("s.wav")  # absolute path, outside the manifest's folder
    chat = [
        {"role": "user", "content": "<image> and <image>, then <audio>"},
        {"role": "assistant", "content": "Two."},
    ]
    path = write_manifest(
        root / "m.jsonl",
        [
            {"image": "img/a.png", "text": "A red circle."},
            {"image": ["img/a.png", "img/b.png"], "audio": str(audio), "conversations": chat},
        ],
    )
    manifest = read_manifest(path)
    assert not manifest.skipped
    first, second = manifest.examples
    assert first.media == (("image", root.resolve() / "img" / "a.png"),)
    assert second.kinds == ["image", "image", "audio"]
    assert second.media[2][1] == audio
    assert second.group == "audio+image"
    assert second.turns is not None and second.turns[-1] == ("assistant", "Two.")


def test_bad_rows_are_skipped_and_counted(media, preparer, tmp_path: Path) -> None:
    image = media.png("ok.png")
    corrupt = media.corrupt("bad.png")
    chat_without_answer = [{"role": "user", "content": "<image> hi"}]
    too_many_placeholders = [
        {"role": "user", "content": "<image> <image>"},
        {"role": "assistant", "content": "x"},
    ]
    path = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"image": str(image), "text": "fine"},
            "{not json",
            {"image": "missing.png", "text": "x"},
            {"text": "no media"},
            {"image": str(image)},
            {"image": str(image), "conversations": chat_without_answer},
            {"image": str(image), "conversations": too_many_placeholders},
            {"image": str(corrupt), "text": "decodes badly"},
            "",
        ],
    )
    manifest = read_manifest(path)
    assert len(manifest.examples) == 2
    assert manifest.skipped == Counter(
        {
            "bad JSON": 1,
            "missing media file": 1,
            "no media": 1,
            "neither text nor conversations": 1,
            "conversation does not end with an assistant answer": 1,
            "placeholders do not match the media": 1,
        }
    )
    assert "6 skipped" in manifest.describe("m.jsonl")
    # A row whose media does not decode is dropped from its batch and counted there.
    dataset = MediaDataset(manifest.examples, preparer, video_audio=True)
    batch = collate([dataset[0], dataset[1]])
    assert [s.example.text for s in batch.samples] == ["fine"]
    assert batch.skipped == 1 and "m.jsonl:8" in batch.errors[0]


def test_stage_filter_counts_its_reason(media, tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"image": str(media.png()), "text": "a"},
            {"audio": str(media.wav()), "text": "b"},
        ],
    )
    manifest = read_manifest(path, lambda e: None if e.kinds == ["audio"] else "not speech")
    assert [e.text for e in manifest.examples] == ["b"]
    assert manifest.skipped == Counter({"not speech": 1})


def plan(**kwargs) -> BatchPlan:
    lengths = tuple((i * 37) % 101 for i in range(40))
    groups = tuple("image" if i % 4 else "audio" for i in range(40))
    return BatchPlan(lengths, groups, **{"batch_size": 4, "seed": 3, "bucket_batches": 5, **kwargs})


def test_bucketing_groups_similar_lengths() -> None:
    p = plan()
    batches = p.epoch(0)
    assert sorted(i for b in batches for i in b) == list(range(40))  # each row once
    assert len(batches) == p.batches_per_rank(1) == 10
    for batch in batches:  # one modality per batch where the window allows, sorted by length
        keys = [(p.groups[i], p.lengths[i]) for i in batch]
        assert keys == sorted(keys)
    # Buckets are tighter than random batches of the same rows.
    spread = sum(max(p.lengths[i] for i in b) - min(p.lengths[i] for i in b) for b in batches)
    shuffled = [list(range(k, 40, 10)) for k in range(10)]
    random_spread = sum(
        max(p.lengths[i] for i in b) - min(p.lengths[i] for i in b) for b in shuffled
    )
    assert spread < random_spread


def test_batches_are_deterministic_and_split_across_ranks() -> None:
    p = plan()
    assert p.epoch(1) == plan().epoch(1)  # same seed and epoch: same batches
    assert p.epoch(0) != p.epoch(1)
    ranks = [p.rank_batches(0, r, 3) for r in range(3)]
    assert {len(r) for r in ranks} == {3}  # 10 batches over 3 ranks: 3 each, one dropped
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))
    stream = p.stream(rank=0, world_size=1, epoch=0, start=2, per_epoch=10)
    assert [next(stream) for _ in range(10)] == p.epoch(0)[2:] + p.epoch(1)[:2]


def test_balanced_sampling_evens_out_modalities() -> None:
    p = plan(balance=True)
    counts = Counter(p.groups[i] for b in p.epoch(0) for i in b)
    assert abs(counts["audio"] - counts["image"]) <= 10  # 10 audio rows vs 30 image rows
    assert counts["audio"] > 10  # the small group is cycled


def test_loader_workers_keep_the_planned_order(media, preparer, tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "m.jsonl",
        [{"image": str(media.png(f"{i}.png", seed=i)), "text": str(i)} for i in range(6)],
    )
    dataset = MediaDataset(read_manifest(path).examples, preparer, video_audio=True)
    order = [[5, 1], [0, 2, 3], [4]]
    loaded = list(make_loader(dataset, order, workers=2, seed=0))
    assert [[s.example.text for s in b.samples] for b in loaded] == [
        ["5", "1"],
        ["0", "2", "3"],
        ["4"],
    ]
    (prepared,) = loaded[0].samples[0].media  # decoded and prepared in the worker
    assert prepared.kind == "image" and prepared.pixels is not None
