"""asr with --compare-transcriptions: the clips joined into one long recording (about 90 s, a
pause between utterances) and transcribed at once through /v1/audio/transcriptions, which
splits it at its pauses. Reported: the recording's WER/CER against the references joined in
order, how many segments it was cut into (one per clip is right), and its subtitles (srt)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from xllm.model.evaluation.metrics import error_rates
from xllm.model.media import SAMPLE_RATE, MediaError, load_media_file

LONG_SECONDS = 90.0
PAUSE_SECONDS = 2.5


def join_clips(
    paths: list[Path], seconds: float = LONG_SECONDS, pause: float = PAUSE_SECONDS
) -> tuple[np.ndarray, int]:
    """The first clips of `paths` one after another, `pause` seconds of silence between them,
    until the recording reaches `seconds` -> (16 kHz samples, how many clips it holds)."""
    gap = np.zeros(round(pause * SAMPLE_RATE), np.float32)
    pieces: list[np.ndarray] = []
    used = 0
    length = 0
    for path in paths:
        if length >= seconds * SAMPLE_RATE:
            break
        clip = load_media_file(path, "audio")
        pieces += [clip, gap]
        length += clip.size + gap.size
        used += 1
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), used


def long_clip_result(
    backend: Any,  # a RemoteBackend: transcribe(wav bytes, response_format) -> the reply's text
    clips: list[tuple[str, Path]],
    normalizer: str,
    numbers: str,
) -> dict[str, Any]:
    """(reference, audio path) clips, in order -> the long recording's scores and srt."""
    try:
        samples, used = join_clips([path for _, path in clips])
    except MediaError as exc:
        return {"error": exc.message}
    if not used:
        return {"error": "no clips to join"}
    buffer = io.BytesIO()
    sf.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    try:
        verbose = json.loads(backend.transcribe(buffer.getvalue(), "verbose_json"))
        srt = backend.transcribe(buffer.getvalue(), "srt")
    except ValueError as exc:  # the server's error answer, or a reply that is not JSON
        return {"error": str(exc)}
    references = " ".join(reference for reference, _ in clips[:used])
    rates = error_rates([references], [verbose["text"]], normalizer, numbers)  # type: ignore[arg-type]
    return {
        "seconds": round(samples.size / SAMPLE_RATE, 2),
        "clips": used,
        "segments": len(verbose["segments"]),
        "wer": rates["wer"],
        "cer": rates["cer"],
        "srt": srt,
    }
