"""`xllm eval import` on layouts made here: LibriSpeech, AISHELL-1/2, Kaldi, LLaVA-Bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from xllm.model.evaluation.judge import RULE_COCO, review_content, rule_for
from xllm.model.evaluation.tasks import build_items, read_rows


def wav(path: Path, fmt: str = "WAV") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, np.float32), 16000, format=fmt)
    return path


def run_import(*argv: object, capsys) -> tuple[int, str, str]:
    from xllm.main import main

    capsys.readouterr()
    code = main(["eval", "import", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_librispeech(tmp_path: Path, capsys) -> None:
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    wav(chapter / "1089-134686-0000.flac", "FLAC")
    wav(chapter / "1089-134686-0001.flac", "FLAC")
    (chapter / "1089-134686.trans.txt").write_text(
        "1089-134686-0000 HE HOPED THERE WOULD BE STEW FOR DINNER\n"
        "1089-134686-0001 STUFF IT INTO YOU HIS BELLY COUNSELLED HIM\n"
        "1089-134686-0002 AFTER EARLY NIGHTFALL\n"  # no audio file
    )
    out = tmp_path / "manifests" / "test-clean.jsonl"
    root = tmp_path / "LibriSpeech" / "test-clean"
    code, stdout, _ = run_import(
        "--format", "librispeech", "--root", root, "--out", out, capsys=capsys
    )
    assert code == 0 and "2 rows written" in stdout and "1 no audio file" in stdout
    rows = manifest(out)
    assert rows[0] == {
        "id": "1089-134686-0000",
        "audio": "../LibriSpeech/test-clean/1089/134686/1089-134686-0000.flac",
        "text": "HE HOPED THERE WOULD BE STEW FOR DINNER",
    }
    # the manifest is usable as it is: relative paths resolve, every row fits asr
    parsed, skipped = read_rows(out)
    items, unfit = build_items("asr", parsed)
    assert not skipped and unfit == 0 and len(items) == 2
    assert items[0].queries["answer"].turns == (("user", "Transcribe the audio."),)


def test_aishell1_with_subset(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data_aishell"
    (root / "transcript").mkdir(parents=True)
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
        "BAC009S0724W0121 通过 对 财务 的 分析\n",
        encoding="utf-8",
    )
    wav(root / "wav" / "test" / "S0764" / "BAC009S0764W0121.wav")
    wav(root / "wav" / "dev" / "S0724" / "BAC009S0724W0121.wav")
    wav(root / "wav" / "test" / "S0764" / "BAC009S0764W9999.wav")  # not in the transcript
    out = tmp_path / "aishell-test.jsonl"
    code, stdout, _ = run_import(
        "--format", "aishell", "--root", root, "--out", out, "--subset", "test", capsys=capsys
    )
    assert code == 0 and "1 rows written" in stdout and "1 no transcript" in stdout
    (row,) = manifest(out)
    assert row["id"] == "BAC009S0764W0121" and row["text"] == "甚至 出现 交易 几乎 停滞 的 情况"


def test_aishell2_layout(tmp_path: Path, capsys) -> None:
    root = tmp_path / "iOS" / "test"
    (root).mkdir(parents=True)
    (root / "trans.txt").write_text("IT0011W0001\t换一首歌\nIT0011W0002\t\n", encoding="utf-8")
    wav(root / "wav" / "T0011" / "IT0011W0001.wav")
    wav(root / "wav" / "T0011" / "IT0011W0002.wav")
    out = tmp_path / "ios.jsonl"
    code, stdout, _ = run_import("--format", "aishell", "--root", root, "--out", out, capsys=capsys)
    assert code == 0 and "1 empty transcript" in stdout
    assert manifest(out) == [
        {"id": "IT0011W0001", "audio": "iOS/test/wav/T0011/IT0011W0001.wav", "text": "换一首歌"}
    ]


def test_kaldi(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "egs" / "recipe"
    data = recipe / "data" / "test"
    data.mkdir(parents=True)
    absolute = wav(tmp_path / "audio" / "utt1.wav")
    wav(recipe / "corpus" / "utt2.wav")  # relative to the recipe folder, as recipes write them
    (data / "wav.scp").write_text(
        f"utt1 {absolute}\nutt2 corpus/utt2.wav\nutt3 sox in.sph -t wav - |\nutt4 nowhere.wav\n"
    )
    (data / "text").write_text("utt1 hello world\nutt2 good morning\nutt3 piped\n")
    out = tmp_path / "kaldi.jsonl"
    code, stdout, _ = run_import("--format", "kaldi", "--root", data, "--out", out, capsys=capsys)
    assert code == 0
    assert "1 no audio file" in stdout and "1 piped wav.scp entry" in stdout
    rows = manifest(out)
    assert [(r["id"], r["text"]) for r in rows] == [
        ("utt1", "hello world"),
        ("utt2", "good morning"),
    ]
    assert (out.parent / rows[1]["audio"]).resolve() == (recipe / "corpus" / "utt2.wav").resolve()


def test_llava_bench(tmp_path: Path, capsys) -> None:
    images = tmp_path / "val2014"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "COCO_val2014_000000000001.jpg")

    def jsonl(name: str, rows: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    questions = jsonl(
        "qa90_questions.jsonl",
        [
            {
                "question_id": 0,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "What is it?",
                "category": "conv",
            },
            {
                "question_id": 1,
                "image": "COCO_val2014_000000000001.jpg",
                "text": "Describe it.",
                "category": "detail",
            },
            {"question_id": 2, "image": "missing.jpg", "text": "?", "category": "complex"},
        ],
    )
    answers = jsonl(
        "qa90_gpt4_answer.jsonl",
        [{"question_id": 0, "text": "A black square."}, {"question_id": 1, "text": "Dark."}],
    )
    context = jsonl(
        "caps_boxes_coco2014_val_80.jsonl",
        [
            {
                "image": "COCO_val2014_000000000001.jpg",
                "captions": ["A black image.", "Nothing to see."],
                "instances": [{"category": "square", "bbox": [0.0, 0.0, 1.0, 1.0]}],
            }
        ],
    )
    out = tmp_path / "llava-bench.jsonl"
    code, stdout, _ = run_import(
        "--format",
        "llava-bench",
        "--root",
        images,
        "--questions",
        questions,
        "--reference",
        answers,
        "--context",
        context,
        "--out",
        out,
        capsys=capsys,
    )
    assert code == 0 and "2 rows written" in stdout and "1 no image file" in stdout
    rows, _ = read_rows(out)
    items, _ = build_items("relative-score", rows)
    first = items[0]
    assert first.id == "0" and first.reference == "A black square."
    assert first.extra["category"] == "conversation" and first.extra["question"] == "What is it?"
    assert first.extra["context"] == ["A black image.", "Nothing to see."]
    # boxes make it LLaVA's COCO review: captions, then the boxes, then the COCO rule
    rule = rule_for(first.extra["category"], bool(first.extra["boxes"]))
    content = review_content(
        first.extra["question"],
        first.reference,
        "x",
        first.extra["context"],
        first.extra["boxes"],
        rule,
    )
    assert content.startswith(
        "[Context]\nA black image.\nNothing to see.\n\nsquare: [0.0, 0.0, 1.0, 1.0]\n\n"
    )
    assert rule == RULE_COCO


def test_import_mistakes_exit_2(tmp_path: Path, capsys) -> None:
    code, _, err = run_import(
        "--format",
        "librispeech",
        "--root",
        tmp_path,
        "--out",
        tmp_path / "m.jsonl",
        capsys=capsys,
    )
    assert code == 2 and "no *.trans.txt files" in err
    code, _, err = run_import(
        "--format", "kaldi", "--root", tmp_path, "--out", tmp_path / "m.jsonl", capsys=capsys
    )
    assert code == 2 and "not a Kaldi data directory" in err
