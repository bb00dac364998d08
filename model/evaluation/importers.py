"""`xllm eval import`: common dataset layouts -> our JSONL manifests.

    librispeech  ROOT/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt lines "ID TEXT", with
                 ROOT/<speaker>/<chapter>/ID.flac (a split folder such as test-clean)
    aishell      a transcript file of "ID TEXT" lines (AISHELL-1's
                 transcript/aishell_transcript_v0.8.txt, AISHELL-2's trans.txt; found under ROOT
                 unless --transcript is given) and the wav files under ROOT, matched by file
                 name; --subset test keeps files with a folder named "test" in their path
    kaldi        a Kaldi data directory: ROOT/wav.scp ("ID PATH") and ROOT/text ("ID TEXT");
                 piped wav.scp entries ("cmd |") and segments files are not supported
    llava-bench  LLaVA-Bench: questions (question_id, image, text, category), reference answers
                 (question_id, text; e.g. GPT-4's), optional context (image, caption or captions,
                 instances with bbox) and the image folder ROOT

Media paths are written relative to the manifest's folder. Rows that cannot be used (no audio
file, no transcript, an empty text) are counted by reason, not written.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("librispeech", "aishell", "kaldi", "llava-bench")


class LayoutError(ValueError):
    """The layout is not what the format expects (the user's to fix)."""


@dataclass
class Imported:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def _rel(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), out.parent.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def _id_text_lines(path: Path) -> list[tuple[str, str]]:
    """'ID TEXT' lines (split at the first run of whitespace); blank lines skipped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            out.append((parts[0], parts[1] if len(parts) > 1 else ""))
    return out


def import_librispeech(root: Path, out: Path) -> Imported:
    result = Imported()
    transcripts = sorted(root.rglob("*.trans.txt"))
    if not transcripts:
        raise LayoutError(f"no *.trans.txt files under {root} (a LibriSpeech split folder)")
    for trans in transcripts:
        for utt, text in _id_text_lines(trans):
            audio = next(
                (p for ext in (".flac", ".wav") if (p := trans.parent / f"{utt}{ext}").is_file()),
                None,
            )
            if audio is None:
                result.skipped["no audio file"] += 1
            elif not text.strip():
                result.skipped["empty transcript"] += 1
            else:
                result.rows.append({"id": utt, "audio": _rel(audio, out), "text": text.strip()})
    return result


def _find_aishell_transcript(root: Path) -> Path:
    for pattern in ("*transcript*.txt", "trans.txt"):
        candidates = sorted(p for p in root.rglob(pattern) if p.is_file())
        if candidates:
            return candidates[0]
    raise LayoutError(
        f"no transcript file under {root} (aishell_transcript_v0.8.txt or trans.txt); "
        "give --transcript"
    )


def import_aishell(
    root: Path, out: Path, transcript: Path | None = None, subset: str | None = None
) -> Imported:
    result = Imported()
    transcript = transcript or _find_aishell_transcript(root)
    texts = dict(_id_text_lines(transcript))
    wavs = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".wav" and p.is_file())
    if subset:
        wavs = [p for p in wavs if subset in p.relative_to(root).parts[:-1]]
    if not wavs:
        raise LayoutError(f"no .wav files under {root}" + (f" in '{subset}'" if subset else ""))
    for wav in wavs:
        text = texts.get(wav.stem)
        if text is None:
            result.skipped["no transcript"] += 1
        elif not text.strip():
            result.skipped["empty transcript"] += 1
        else:
            result.rows.append({"id": wav.stem, "audio": _rel(wav, out), "text": text.strip()})
    return result


def import_kaldi(root: Path, out: Path) -> Imported:
    result = Imported()
    scp, text_file = root / "wav.scp", root / "text"
    if not scp.is_file() or not text_file.is_file():
        raise LayoutError(f"{root} is not a Kaldi data directory (wav.scp and text needed)")
    if (root / "segments").is_file():
        raise LayoutError(f"{root}/segments: segmented recordings are not supported")
    texts = dict(_id_text_lines(text_file))
    for utt, location in _id_text_lines(scp):
        location = location.strip()
        if location.endswith("|"):
            result.skipped["piped wav.scp entry (not supported)"] += 1
            continue
        audio = Path(location)
        audio = audio if audio.is_absolute() else root / audio
        if not audio.is_file():
            # Kaldi recipes usually give paths relative to the recipe folder, one level up
            alternative = root.parent.parent / location
            audio = alternative if alternative.is_file() else audio
        text = texts.get(utt)
        if not audio.is_file():
            result.skipped["no audio file"] += 1
        elif text is None:
            result.skipped["no transcript"] += 1
        elif not text.strip():
            result.skipped["empty transcript"] += 1
        else:
            result.rows.append({"id": utt, "audio": _rel(audio, out), "text": text.strip()})
    return result


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LayoutError(f"{path}:{number}: bad JSON") from None
    return rows


def import_llava_bench(
    root: Path, out: Path, questions: Path, reference: Path, context: Path | None = None
) -> Imported:
    """LLaVA-Bench files -> relative-score rows: the question with its image, the reference
    answer as the assistant turn, category, context captions and (COCO) boxes."""
    result = Imported()
    answers = {str(a["question_id"]): a for a in _jsonl(reference)}
    contexts: dict[str, dict[str, Any]] = {}
    if context is not None:
        contexts = {str(c["image"]): c for c in _jsonl(context)}
    for q in _jsonl(questions):
        qid = str(q.get("question_id"))
        image = root / str(q.get("image", ""))
        answer = answers.get(qid)
        if not image.is_file():
            result.skipped["no image file"] += 1
            continue
        if answer is None or not str(answer.get("text", "")).strip():
            result.skipped["no reference answer"] += 1
            continue
        row: dict[str, Any] = {
            "id": qid,
            "image": _rel(image, out),
            "category": q.get("category", "conv"),
            "conversations": [
                {"role": "user", "content": f"<image>\n{q['text']}"},
                {"role": "assistant", "content": str(answer["text"])},
            ],
        }
        ctx = contexts.get(str(q.get("image")))
        if ctx is not None:
            captions = ctx.get("captions", ctx.get("caption", ""))
            row["context"] = captions if isinstance(captions, list | str) else str(captions)
            if ctx.get("instances"):
                row["boxes"] = [
                    {"category": i.get("category"), "bbox": i.get("bbox")} for i in ctx["instances"]
                ]
        result.rows.append(row)
    return result


def write_manifest(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_import(fmt: str, root: Path, out: Path, **options: Any) -> Imported:
    """Import `root` in format `fmt` and write the manifest to `out`."""
    if not root.is_dir():
        raise LayoutError(f"not a folder: {root}")
    if fmt == "librispeech":
        result = import_librispeech(root, out)
    elif fmt == "aishell":
        result = import_aishell(root, out, options.get("transcript"), options.get("subset"))
    elif fmt == "kaldi":
        result = import_kaldi(root, out)
    elif fmt == "llava-bench":
        if not options.get("questions") or not options.get("reference"):
            raise LayoutError("llava-bench needs --questions and --reference")
        result = import_llava_bench(
            root, out, options["questions"], options["reference"], options.get("context")
        )
    else:
        raise LayoutError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    limit = options.get("limit")
    if limit is not None:
        result.rows = result.rows[:limit]
    if not result.rows:
        reasons = ", ".join(f"{n} {why}" for why, n in result.skipped.items()) or "nothing found"
        raise LayoutError(f"no rows imported from {root} ({reasons})")
    write_manifest(result.rows, out)
    return result
