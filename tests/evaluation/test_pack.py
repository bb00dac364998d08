"""`xllm eval pack`: every task's manifest, usable as it is, the same for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

from tests.evaluation.conftest import PACK_N
from xllm.model.evaluation.pack import make_pack
from xllm.model.evaluation.tasks import TASKS, build_items, read_rows


def test_every_task_has_its_manifest(eval_pack: Path) -> None:
    meta = json.loads((eval_pack / "pack.json").read_text())
    assert meta["n"] == PACK_N and list(meta["tasks"]) == list(TASKS)
    for task in TASKS:
        rows, skipped = read_rows(eval_pack / f"{task}.jsonl")
        items, unfit = build_items(task, rows)
        assert not skipped and unfit == 0 and len(items) == PACK_N, task
    rows, _ = read_rows(eval_pack / "relative-score.jsonl")
    items, _ = build_items("relative-score", rows)
    assert [i.extra["category"] for i in items] == ["conversation", "detail", "complex"]
    assert all(i.extra["context"] and i.extra["question"] for i in items)
    masr, _ = read_rows(eval_pack / "masr.jsonl")
    assert all(set(r.example.kinds) == {"audio", "image"} for r in masr)


def test_same_seed_same_pack(eval_pack: Path, tmp_path: Path) -> None:
    """Items are seeded one by one: a pack of some tasks equals the same tasks of the full one."""
    tasks = ["vqa", "caption", "relative-score"]
    made = make_pack(tmp_path / "again", PACK_N, seed=0, tasks=tasks, jobs=1)
    for task in tasks:
        assert made[task].read_text() == (eval_pack / f"{task}.jsonl").read_text()
        for row in map(json.loads, made[task].read_text().splitlines()):
            media = row["image"]
            assert (tmp_path / "again" / media).read_bytes() == (eval_pack / media).read_bytes()
    other = make_pack(tmp_path / "other", PACK_N, seed=1, tasks=["caption"], jobs=1)
    assert other["caption"].read_text() != (eval_pack / "caption.jsonl").read_text()


def test_pack_command(tmp_path: Path, capsys) -> None:
    from xllm.main import main

    assert (
        main(
            [
                "eval",
                "pack",
                "--out",
                str(tmp_path),
                "--n",
                "2",
                "--tasks",
                "caption,vqa",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "caption:" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["caption.jsonl", "vqa.jsonl"]
    assert main(["eval", "pack", "--out", str(tmp_path), "--n", "0"]) == 2
