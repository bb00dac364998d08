"""`xllm data scenes`: rows `xllm train` reads, answers the scenes determine, 16 kHz speech from
several engines, held-out voices and sentences kept out of training, seeded determinism."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xllm.model.train import speech_synth
from xllm.model.train.data import read_manifest
from xllm.model.train.scenes import (
    CAPTION_QUESTIONS,
    DIRECTIONS,
    HELDOUT_MANIFESTS,
    MANIFESTS,
    NUMBERS,
    POSITIONS,
    SPOKEN_PROMPT,
    fill_llm_answers,
    generate_heldout,
    generate_scenes,
    plural,
    transcribe_spoken_questions,
)
from xllm.model.train.sentences import (
    CLEAN,
    FORTUNES,
    fortune_sentences,
    is_heldout,
    sentence_pool,
)

N = 4  # training rows per manifest


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    absent = speech_synth.missing()
    if absent:
        packages = " ".join(speech_synth.debian_packages(tuple(absent)))
        pytest.skip(f"TTS voices not installed: apt-get install -y {packages}")
    if not FORTUNES.is_dir():
        pytest.skip("fortunes not installed: apt-get install -y fortunes fortunes-min")
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(root, N, seed=0, n_val=1, jobs=1)
    generate_heldout(root, 3, seed=0, jobs=1)
    return root


def all_rows(root: Path, split: str) -> list[dict]:
    return [row for path in sorted(root.glob(f"*_{split}.jsonl")) for row in rows(path)]


def test_rows_parse_with_the_training_loader(scenes_dir: Path) -> None:
    for name in MANIFESTS:
        manifest = read_manifest(scenes_dir / f"{name}_train.jsonl")
        used = 0 if name == "spoken" else N  # spoken questions wait for the LLM's answers
        assert len(manifest.examples) == used, manifest.describe(name)
        assert len(rows(scenes_dir / f"{name}_val.jsonl")) == 1
    for name in HELDOUT_MANIFESTS:
        assert len(rows(scenes_dir / f"{name}_heldout.jsonl")) == 3


def test_fill_llm_answers_makes_trainable_rows(scenes_dir: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "spoken_train.jsonl"
    manifest.write_text((scenes_dir / "spoken_train.jsonl").read_text())
    (tmp_path / "spoken").symlink_to(scenes_dir / "spoken")
    asked: list[str] = []

    def answer(typed: str) -> str:
        asked.append(typed)
        return f"An answer to {typed}"

    filled = fill_llm_answers(manifest, answer)
    written = rows(manifest)
    assert filled == N and sorted(set(asked)) == sorted(asked)  # each question asked once
    for row in written:
        assert row["target"] == f"An answer to {row['typed']}"
        assert row["conversations"][0]["content"] == SPOKEN_PROMPT
    assert len(read_manifest(manifest).examples) == N
    assert fill_llm_answers(manifest, answer) == 0 and rows(manifest) == written


def test_spoken_questions_are_also_transcription_rows(scenes_dir: Path, tmp_path: Path) -> None:
    for name in ("speech", "spoken"):
        (tmp_path / f"{name}_train.jsonl").write_text(
            (scenes_dir / f"{name}_train.jsonl").read_text()
        )
    for folder in ("audio", "spoken"):
        (tmp_path / folder).symlink_to(scenes_dir / folder)
    before = rows(tmp_path / "speech_train.jsonl")
    assert transcribe_spoken_questions(tmp_path, "train") == N
    after = rows(tmp_path / "speech_train.jsonl")
    assert after[: len(before)] == before
    questions = rows(tmp_path / "spoken_train.jsonl")
    assert [(r["audio"], r["text"]) for r in after[len(before) :]] == [
        (q["audio"], q["typed"]) for q in questions
    ]
    assert len(read_manifest(tmp_path / "speech_train.jsonl").examples) == len(before) + N
    assert transcribe_spoken_questions(tmp_path, "train") == 0  # a rerun adds nothing


def foreground_blobs(image: np.ndarray, background: tuple[int, int, int]) -> list[np.ndarray]:
    """Masks of the connected regions that differ from the background colour (4-neighbour
    flood fill by repeated dilation); specks of a few pixels (codec ringing) are dropped."""
    todo = np.abs(image.astype(int) - np.asarray(background)).max(axis=2) > 45
    blobs = []
    while todo.any():
        blob = np.zeros_like(todo)
        blob[tuple(np.argwhere(todo)[0])] = True
        while True:
            grown = blob.copy()
            grown[1:] |= blob[:-1]
            grown[:-1] |= blob[1:]
            grown[:, 1:] |= blob[:, :-1]
            grown[:, :-1] |= blob[:, 1:]
            grown &= todo
            if (grown == blob).all():
                break
            blob = grown
        todo &= ~blob
        if blob.sum() > 12:
            blobs.append(blob)
    return blobs


def check_answer(question: str, answer: str, scene: dict) -> None:
    """The answer a recorded scene gives to a question, worked out here from the record alone."""
    items = scene["items"]
    by_name = {f"{i['color']} {i['shape']}": i for i in items}
    unique_shape = {
        i["shape"]: i for i in items if [j["shape"] for j in items].count(i["shape"]) == 1
    }
    unique_color = {
        i["color"]: i for i in items if [j["color"] for j in items].count(i["color"]) == 1
    }
    named = re.findall(r"(\w+) (circle|square|triangle|star|hexagon|cross)", answer)
    where = {phrase: cell for cell, phrase in POSITIONS.items()}
    word = lambda text: text[0].upper() + text[1:] + "."  # noqa: E731
    if question in CAPTION_QUESTIONS:
        assert sorted(named) == sorted((i["color"], i["shape"]) for i in items)
    elif question == "How many shapes are there?":
        assert answer == word(NUMBERS[len(items)])
    elif question == "What is the background like?":
        assert scene["background"]["tone"] in answer and scene["background"]["texture"] in answer
    elif match := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        count = sum(i["color"] == match[1] for i in items)
        assert count >= 1 and answer == word(NUMBERS[count])
    elif match := re.fullmatch(r"How many (\w+) are there\?", question):
        count = sum(plural(i["shape"]) == match[1] for i in items)
        assert count >= 1 and answer == word(NUMBERS[count])
    elif match := re.fullmatch(r"Where is the (\w+ \w+)\?", question):
        assert answer == word(POSITIONS[tuple(by_name[match[1]]["cell"])])
    elif match := re.fullmatch(r"Is the (\w+ \w+) small or large\?", question):
        assert answer == word(by_name[match[1]]["size"])
    elif match := re.fullmatch(r"What color is the (\w+)\?", question):
        assert answer == word(unique_shape[match[1]]["color"])
    elif match := re.fullmatch(r"What shape is the (\w+) one\?", question):
        assert answer.split()[-1] == unique_color[match[1]]["shape"] + "."
    elif question == "What shape is it?":
        assert len(items) == 1 and answer.split()[-1] == items[0]["shape"] + "."
    else:
        match = re.fullmatch(r"What is (.+)\?", question)
        assert match and match[1] in where, question
        assert named == [
            (i["color"], i["shape"]) for i in items if tuple(i["cell"]) == where[match[1]]
        ]


def test_answers_match_the_scene_drawn(scenes_dir: Path) -> None:
    checked = 0
    manifests = ("image_train", "mixed_train", "spoken_image_heldout")
    for row in [row for name in manifests for row in rows(scenes_dir / f"{name}.jsonl")]:
        if "image" not in row:
            continue
        scene = row["scene"]
        pixels = np.asarray(Image.open(scenes_dir / row["image"]).convert("RGB"))
        # every shape is drawn where and in the colour the record says, and nothing else is
        assert len(foreground_blobs(pixels, scene["background"]["rgb"])) == len(scene["items"])
        for item in scene["items"]:
            x, y = (round(c) for c in item["centre"])
            assert np.abs(pixels[y, x].astype(int) - item["rgb"]).max() < 40
        turns = [t["content"].replace("<image> ", "") for t in row.get("conversations", [])]
        if "spoken" in row:  # the question is the audio's
            turns = [row["spoken"], turns[-1]]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            check_answer(question, answer, scene)
            checked += 1
    assert checked >= 1


def test_videos_move_the_recorded_way(scenes_dir: Path) -> None:
    import av

    for row in rows(scenes_dir / "video_train.jsonl") + rows(scenes_dir / "video_val.jsonl"):
        with av.open(str(scenes_dir / row["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        centres = []
        for frame in (frames[0], frames[-1]):
            (blob,) = foreground_blobs(frame, row["scene"]["background"]["rgb"])
            ys, xs = np.nonzero(blob)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = np.subtract(centres[1], centres[0])
        moved = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}
        wanted = row["scene"]["direction"].split("-")
        assert all(moved[d] for d in wanted) and not any(moved[d] for d in set(moved) - set(wanted))
        if "text" in row:
            assert row["text"].endswith(f"moving {DIRECTIONS[row['scene']['direction']]}.")


def spoken_text(row: dict) -> str | None:
    """What a row's speech says: a transcript, a spoken question or a video's narration."""
    if "typed" in row or "spoken" in row:
        return row.get("typed") or row["spoken"]
    if "audio" in row:
        return row.get("text") or row["conversations"][-1]["content"]
    return row.get("scene", {}).get("narration")


def speech_rows(root: Path, split: str) -> list[dict]:
    return [row for row in all_rows(root, split) if "speech" in row and "audio" in row]


def test_speech_is_16_khz_mono_and_fits_its_sentence(scenes_dir: Path) -> None:
    engines = set()
    for split in ("train", "val", "heldout"):
        for row in speech_rows(scenes_dir, split):
            info = sf.info(scenes_dir / row["audio"])
            assert (info.samplerate, info.channels) == (16000, 1)
            samples, _ = sf.read(scenes_dir / row["audio"], dtype="float32")
            assert np.sqrt(np.mean(samples**2)) > 0.01  # not silent
            words_per_second = len(spoken_text(row).split()) / info.duration
            assert 0.5 < words_per_second < 6, (row, info.duration)
            engines.add(row["speech"]["engine"])
    assert len(engines) >= 2


def test_held_out_voices_and_sentences_stay_out_of_training(scenes_dir: Path) -> None:
    heldout_voices = {(v.engine, v.name) for v in speech_synth.voices(heldout=True)}
    training = [r for split in ("train", "val") for r in all_rows(scenes_dir, split)]
    voices = [r["speech"] for r in training if "speech" in r]
    voices += [r["scene"]["speech"] for r in training if "speech" in r.get("scene", {})]
    assert voices and not {(v["engine"], v["voice"]) for v in voices} & heldout_voices
    spoken = [text for text in map(spoken_text, training) if text]
    assert spoken and not any(map(is_heldout, spoken))
    for row in speech_rows(scenes_dir, "heldout"):
        assert (row["speech"]["engine"], row["speech"]["voice"]) in heldout_voices
        assert "scene" in row or is_heldout(spoken_text(row))  # image questions: any sentence


def decoded(root: Path, row: dict) -> list[np.ndarray]:
    out = []
    if "audio" in row:
        out.append(sf.read(root / row["audio"], dtype="int16")[0])
    if "image" in row:
        out.append(np.asarray(Image.open(root / row["image"]).convert("RGB")))
    return out


def test_same_seed_same_content_other_seed_differs(scenes_dir: Path, tmp_path: Path) -> None:
    subset = ("image", "speech", "spoken")
    generate_scenes(tmp_path / "again", 2, seed=0, n_val=0, jobs=2, manifests=subset)
    generate_scenes(tmp_path / "other", 2, seed=1, n_val=0, jobs=1, manifests=subset)
    for name in subset:
        first = rows(scenes_dir / f"{name}_train.jsonl")[:2]
        again = rows(tmp_path / "again" / f"{name}_train.jsonl")
        assert again == first  # made in one process, then in two
        for a, b in zip(first, again, strict=True):
            for x, y in zip(decoded(scenes_dir, a), decoded(tmp_path / "again", b), strict=True):
                np.testing.assert_array_equal(x, y)
        assert rows(tmp_path / "other" / f"{name}_train.jsonl") != first


def test_sentence_pool_sources_split_and_offensive_files(tmp_path: Path) -> None:
    pool = sentence_pool()
    by_source = {s.source.split("/")[0] for s in pool}
    assert by_source == {"fortunes", "scene", "question"} and len(pool) >= 3000
    assert list(pool) == sorted(pool, key=lambda s: (s.source, s.text))
    assert all(CLEAN.fullmatch(s.text) for s in pool)
    assert all(4 <= len(s.text.split()) <= 20 for s in pool if s.source.startswith("fortunes/"))
    heldout = sum(s.heldout for s in pool) / len(pool)
    assert 0.05 < heldout < 0.15 and all(s.heldout == is_heldout(s.text) for s in pool)

    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "rude").write_text("This sentence is marked offensive here.\n%\n")
    (tmp_path / "wisdom").write_text(
        "A clean single sentence of words.\n\t\t-- Someone\n%\nToo short.\n%\n"
        "Two sentences here. Are not one.\n%\nIt has 42 digits in it.\n"
    )
    (tmp_path / "wisdom.dat").write_bytes(b"\0")
    assert fortune_sentences(tmp_path) == [("A clean single sentence of words.", "fortunes/wisdom")]


def test_user_errors_exit_2(monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from xllm.main import main

    assert main(["data", "scenes", "--out", str(tmp_path / "a"), "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    real_which = shutil.which
    monkeypatch.setattr(
        "xllm.model.train.speech_synth.shutil.which",
        lambda name: None if name == "flite" else real_which(name),
    )
    assert main(["data", "scenes", "--out", str(tmp_path / "b"), "--n", "1"]) == 2
    assert "apt-get install -y flite" in capsys.readouterr().err
