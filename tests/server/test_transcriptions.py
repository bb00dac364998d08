"""POST /v1/audio/transcriptions through the official `openai` client against a real `xllm serve`
on the tiny random model: every response format, the stream's events, a 90 s recording split
into utterance segments, usage that counts the segments' audio spans, and the 4xx answers."""

from __future__ import annotations

import json
import re
import shutil
from itertools import pairwise

import httpx
import numpy as np
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.media import SAMPLE_RATE, make_png, speech_with_pauses, to_wav
from tests.servers import wait_until
from xllm.model.media import decode_audio
from xllm.model.media.segments import split_speech
from xllm.server.transcription import MAX_SEGMENT_SECONDS

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a red circle and a green square",
    "which way does the star move",
    "large language models can hear speech",
    "the blue triangle moves up",
]
SRT_TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def three() -> tuple[bytes, list[tuple[float, float]]]:
    """Three utterances with pauses between them, and when each sounds."""
    samples, sounds = speech_with_pauses(SENTENCES[:3], pause_s=1.0)
    return to_wav(samples), sounds


@pytest.fixture(scope="module")
def long_clip() -> tuple[bytes, list[tuple[float, float]]]:
    """About 90 s: 16 utterances, 3 s apart."""
    samples, sounds = speech_with_pauses((SENTENCES * 4)[:16], pause_s=3.0)
    assert 80 * SAMPLE_RATE < samples.size < 100 * SAMPLE_RATE
    return to_wav(samples), sounds


def holds(segment: tuple[float, float], sound: tuple[float, float]) -> bool:
    """The segment (times rounded to the millisecond) holds the utterance's sound."""
    return segment[0] - 1e-3 <= sound[0] and sound[1] <= segment[1] + 1e-3


def transcribe(client: openai.OpenAI, data: bytes, **kwargs):
    return client.audio.transcriptions.create(model="m", file=("clip.wav", data), **kwargs)


def seconds(match: tuple[str, ...]) -> float:
    hours, minutes, secs, millis = map(int, match)
    return hours * 3600 + minutes * 60 + secs + millis / 1000


def cue_times(subtitles: str) -> list[float]:
    """Every cue's start and end, in order."""
    found = re.findall(rf"{SRT_TIME} --> {SRT_TIME}", subtitles)
    return [t for m in found for t in (seconds(m[:4]), seconds(m[4:]))]


def test_every_format_tells_the_same_transcript(client, three):
    data, sounds = three
    plain = transcribe(client, data)
    assert plain.text and plain.usage.type == "tokens"
    assert transcribe(client, data, response_format="text") == plain.text + "\n"

    verbose = transcribe(client, data, response_format="verbose_json", language="en")
    assert verbose.text == plain.text and verbose.language == "en"
    assert verbose.duration == pytest.approx(decode_audio(data).size / SAMPLE_RATE, abs=1e-3)
    assert verbose.usage.type == "duration"
    segments = verbose.segments
    assert [s.id for s in segments] == [0, 1, 2]
    for segment, (start, end) in zip(segments, sounds, strict=True):
        assert holds((segment.start, segment.end), (start, end))
        assert segment.tokens and segment.avg_logprob < 0 and segment.temperature == 0
    assert " ".join(s.text for s in segments if s.text) == plain.text

    spoken = [s for s in segments if s.text]
    srt = transcribe(client, data, response_format="srt")
    cues = srt.strip().split("\n\n")
    assert [c.split("\n")[0] for c in cues] == [str(i) for i in range(1, len(spoken) + 1)]
    assert [c.split("\n", 2)[2] for c in cues] == [" ".join(s.text.split()) for s in spoken]
    times = [t for s in spoken for t in (s.start, s.end)]
    assert cue_times(srt) == pytest.approx(times, abs=1e-3)
    vtt = transcribe(client, data, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n") and cue_times(vtt) == cue_times(srt)


def test_stream_events_add_up_to_the_transcript(client, three):
    data, _ = three
    plain = transcribe(client, data)
    events = list(transcribe(client, data, stream=True))
    *deltas, done = events
    assert deltas and {e.type for e in deltas} == {"transcript.text.delta"}
    assert done.type == "transcript.text.done"
    assert "".join(e.delta for e in deltas) == done.text == plain.text
    assert done.usage.input_tokens == plain.usage.input_tokens
    assert done.usage.output_tokens == plain.usage.output_tokens


def test_a_long_recording_is_transcribed_in_utterance_segments(client, long_clip):
    data, sounds = long_clip
    verbose = transcribe(client, data, response_format="verbose_json")
    spans = [(s.start, s.end) for s in verbose.segments]
    assert len(spans) == len(sounds) == 16
    assert all(a[1] <= b[0] for a, b in pairwise(spans))
    for (start, end), (sound_start, sound_end) in zip(spans, sounds, strict=True):
        assert holds((start, end), (sound_start, sound_end))
    srt = transcribe(client, data, response_format="srt")
    spoken = [t for s in verbose.segments if s.text for t in (s.start, s.end)]
    assert len(spoken) > 2 and cue_times(srt) == pytest.approx(spoken, abs=1e-3)


def test_a_client_that_leaves_ends_every_segment(client, server, long_clip):
    whole = transcribe(client, long_clip[0]).usage.output_tokens
    before = server.metric("xllm_generated_tokens_total")
    stream = transcribe(client, long_clip[0], stream=True)
    assert next(iter(stream)).type == "transcript.text.delta"
    stream.close()
    wait_until(
        lambda: (
            server.metric("xllm_num_requests_running") == 0
            and server.metric("xllm_num_requests_waiting") == 0
        ),
        what="the segments' requests to end",
    )
    # the segments were cancelled, not generated to their end
    assert server.metric("xllm_generated_tokens_total") - before < whole / 2


def test_usage_counts_the_segments_audio_spans(client, three, tiny_model):
    data, _ = three
    samples = decode_audio(data)
    preparer = tiny_model.preparer
    longest = min(MAX_SEGMENT_SECONDS, preparer.speech_features.window_samples / SAMPLE_RATE)
    segments = split_speech(samples, max_seconds=longest)
    prepared = [preparer.prepare("audio", samples[s.start : s.end]) for s in segments]
    with torch.inference_mode():
        encoded = tiny_model.encode(prepared)
    audio = sum(tokens.shape[0] for item in encoded for _, tokens in item)

    usage = transcribe(client, data).usage
    assert usage.input_token_details.audio_tokens == audio > 0
    text_tokens = usage.input_token_details.text_tokens
    assert text_tokens > 0 and text_tokens % len(segments) == 0  # the same prompt per segment
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens == audio + text_tokens


def test_silence_is_an_empty_transcript(client):
    silent = to_wav(np.zeros(2 * SAMPLE_RATE, np.float32))
    assert transcribe(client, silent).text == ""
    assert transcribe(client, silent, response_format="srt") == ""
    assert transcribe(client, silent, response_format="verbose_json").segments == []


def test_bad_input_is_a_4xx(client, server):
    with pytest.raises(openai.BadRequestError, match="audio"):
        transcribe(client, b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    with pytest.raises(openai.BadRequestError, match="empty audio"):
        transcribe(client, b"")
    with pytest.raises(openai.APIStatusError) as image:
        transcribe(client, make_png())
    assert image.value.status_code == 415
    with pytest.raises(openai.BadRequestError, match="json or text"):
        transcribe(
            client, to_wav(np.zeros(SAMPLE_RATE, np.float32)), stream=True, response_format="srt"
        )
    with pytest.raises(openai.BadRequestError, match="word timestamps"):
        transcribe(
            client,
            to_wav(np.zeros(SAMPLE_RATE, np.float32)),
            response_format="verbose_json",
            timestamp_granularities=["word"],
        )
    r = httpx.post(f"{server.url}/v1/audio/transcriptions", data={"model": "m"}, timeout=30)
    assert r.status_code == 422 and "file" in r.text  # no file at all
    too_big = to_wav(np.zeros(150 * SAMPLE_RATE, np.float32))  # over --max-upload-mb 4
    with pytest.raises(openai.APIStatusError) as big:
        transcribe(client, too_big)
    assert big.value.status_code == 413


@pytest.fixture(scope="module")
def no_speech_model(tmp_path_factory, tiny_model_dir):
    """The tiny model without its speech encoder and interface: images and video only."""
    root = tmp_path_factory.mktemp("no-speech") / "model"
    shutil.copytree(tiny_model_dir, root)
    config = json.loads((root / "xllm.json").read_text())
    del config["speech"], config["speech_interface"]
    (root / "xllm.json").write_text(json.dumps(config))
    weights = load_file(root / "interfaces.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("speech_interface.")}
    save_file(kept, root / "interfaces.safetensors")
    return root


def test_a_model_without_speech_says_so(start_server, no_speech_model, three):
    server = start_server(model_dir=no_speech_model)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="no speech path") as refused:
        transcribe(client, three[0])
    assert "it takes: image, video" in refused.value.message
