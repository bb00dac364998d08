"""Speech to text (/v1/audio/transcriptions) on the chat serving path. No HTTP here.

A recording of any length is decoded once, split at its pauses into utterance-sized segments
(`model/media/segments.py`, each within one speech-encoder window and at most 30 s), and every
segment becomes one chat request asking the model's ASR instruction (`ASR_INSTRUCTION`, as in
training and evaluation) about that segment's audio. The segments run as concurrent requests
(batched by the engine, at most `max_batch` started ahead of the one being read; a segment's
features are made when it starts) and their texts join in order.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from xllm.model.media import SAMPLE_RATE, MediaError, decode_audio
from xllm.model.media.segments import AudioSegment, split_speech
from xllm.model.preprocess import PreparedMedia
from xllm.model.prompt import ASR_INSTRUCTION
from xllm.server.engine.events import ErrorEvent, FinishEvent, TokenEvent, Usage
from xllm.server.errors import ServingError
from xllm.server.serving import ChatInput, ChatService, Generation, MediaInput

MAX_SEGMENT_SECONDS = 30.0  # Whisper's window: longer speech is cut, at its quietest point


@dataclass
class TranscriptionInput:
    data: bytes  # the audio file
    request_id: str
    prompt: str | None = None  # given to the model as a system turn before the instruction
    temperature: float | None = None
    logprobs: bool = False  # per token, for the segments' avg_logprob


@dataclass
class SegmentText:
    """One segment's transcript: its text (whitespace stripped), tokens and their logprobs."""

    segment: AudioSegment
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def avg_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0

    @property
    def seek(self) -> int:
        """The start in 10 ms frames (Whisper's unit)."""
        return self.segment.start * 100 // SAMPLE_RATE

    @property
    def compression_ratio(self) -> float:
        """Whisper's repetition check: bytes of text / bytes of its zlib compression."""
        raw = self.text.encode()
        return len(raw) / len(zlib.compress(raw)) if raw else 0.0


@dataclass
class Transcript:
    duration: float  # seconds of audio
    text: str  # the segments' texts joined by spaces
    segments: list[SegmentText]
    usage: Usage  # of all the segments' requests


class TextJoiner:
    """Text deltas of consecutive segments -> deltas of their whitespace-stripped texts joined by
    single spaces: what is emitted adds up to exactly the joined text."""

    def __init__(self) -> None:
        self.text = ""
        self._held = ""  # whitespace that ends what came so far (dropped if the segment ends)
        self._fresh = True  # nothing of the current segment emitted yet

    def next_segment(self) -> None:
        self._held, self._fresh = "", True

    def add(self, delta: str) -> str:
        pending = self._held + delta
        if self._fresh:
            pending = pending.lstrip()
            if not pending:
                self._held = ""
                return ""
            pending = (" " if self.text else "") + pending
            self._fresh = False
        out = pending.rstrip()
        self._held = pending[len(out) :]
        self.text += out
        return out


class TranscriptionRun:
    """A running transcription: its segments' requests, started in order, `window` ahead of the
    one being read (so at most `window` segments hold features or places at once)."""

    def __init__(
        self,
        start: Callable[[int], Awaitable[Generation]],
        segments: list[AudioSegment],
        duration: float,
        window: int,
    ) -> None:
        self.duration = duration
        self.segments = segments
        self._start = start  # segment index -> its running request
        self._window = max(1, window)
        self._started: deque[asyncio.Future[Generation]] = deque()
        self._next = 0  # the next segment to start
        self._read = 0  # the segment being read
        self._current: Generation | None = None
        self.parts = [SegmentText(segment) for segment in segments]
        self.usage = Usage(0, 0)  # of the segments' requests that ended
        self.text = ""

    async def begin(self) -> None:
        """Start the first segments; a refusal of the first (429, 503, 400) is raised here."""
        self._fill()
        if self._started:
            try:
                await asyncio.shield(self._started[0])
            except BaseException:
                self.cancel()
                raise

    def _fill(self) -> None:
        while self._next < len(self.segments) and len(self._started) < self._window:
            self._started.append(asyncio.ensure_future(self._start(self._next)))
            self._next += 1

    async def generations(self) -> AsyncIterator[Generation]:
        """Each segment's generation in order (the next `window` already started)."""
        while self._started:
            self._current = await self._started.popleft()
            self._fill()
            yield self._current

    async def run(self) -> AsyncIterator[str]:
        """The transcript's text deltas in order (adding up to `transcript().text`); an engine
        error raises ServingError. Leaving early (or an error) cancels the segments' requests."""
        joiner = TextJoiner()
        try:
            async for generation in self.generations():
                part = self.parts[self._read]
                joiner.next_segment()
                async for event in generation.events():
                    if isinstance(event, ErrorEvent):
                        raise ServingError(event.message, event.status, event.type)
                    if not isinstance(event, TokenEvent | FinishEvent):
                        continue
                    part.text += event.text
                    if event.token is not None:
                        part.tokens.append(event.token)
                    if event.logprobs is not None and event.logprobs.logprob is not None:
                        part.logprobs.append(event.logprobs.logprob)
                    if isinstance(event, FinishEvent):
                        self.usage += event.usage
                    delta = joiner.add(event.text)
                    if delta:
                        yield delta
                part.text = part.text.strip()
                self._read += 1
        finally:
            self.cancel()
        self.text = joiner.text

    async def collect(self) -> Transcript:
        """The whole transcript (every segment's request cancelled if the caller goes away)."""
        async for _ in self.run():
            pass
        return self.transcript()

    def transcript(self) -> Transcript:
        """What `run` has produced (all of it once it has ended)."""
        return Transcript(self.duration, self.text, self.parts, self.usage)

    def cancel(self) -> None:
        for started in self._started:
            if not started.done():
                started.cancel()
            elif not started.cancelled() and started.exception() is None:
                started.result().cancel()  # it had started: its request goes
        self._started.clear()
        self._next = len(self.segments)
        if self._current is not None:
            self._current.cancel()


class Transcriber:
    """Turns an audio file into a running `TranscriptionRun` through the chat service."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def temperature(self, given: float | None) -> float:
        """The temperature the segments are sampled at (the model's default if not given)."""
        return self.service.preparer.config.sampling.temperature if given is None else given

    async def start(self, job: TranscriptionInput) -> TranscriptionRun:
        service = self.service
        try:
            service.preparer.check_kind("audio")
        except ValueError as exc:
            raise ServingError(
                f"this model has no speech path, so it cannot transcribe: {exc}", 400
            ) from None
        # The segments' number is known only once decoded: decoding comes before the places.
        timeout = service.limits.request_timeout
        loop = asyncio.get_running_loop()
        try:
            samples, segments, decode_seconds = await asyncio.wait_for(
                loop.run_in_executor(service.executor, self._split, job.data), timeout
            )
        except TimeoutError:
            raise ServingError(
                f"the request timed out after {timeout:g} s (--request-timeout) while its audio "
                "was being decoded",
                504,
                "timeout",
            ) from None
        except MediaError as exc:
            raise ServingError(exc.message, exc.status) from None
        turns = [("user", ASR_INSTRUCTION)]
        if job.prompt:
            turns.insert(0, ("system", job.prompt))
        overrides = {"temperature": job.temperature, "logprobs": 0 if job.logprobs else None}
        # each segment is a media item of the metrics: its share of the file's decoding
        decode_share = decode_seconds / max(1, len(segments))

        async def start_segment(index: int) -> Generation:
            piece = samples[segments[index].start : segments[index].end]
            prepared = await loop.run_in_executor(
                service.executor, self._features, piece, decode_share
            )
            request_id = f"{job.request_id}-{index}" if index else job.request_id
            media = [MediaInput("audio", b"", prepared)]
            return await service.start(ChatInput(list(turns), media, dict(overrides), request_id))

        duration = samples.size / SAMPLE_RATE
        window = service.engine.config.max_batch
        transcription = TranscriptionRun(start_segment, segments, duration, window)
        await transcription.begin()
        return transcription

    def _split(self, data: bytes) -> tuple[np.ndarray, list[AudioSegment], float]:
        """In a media thread: decode, split at pauses; the seconds decoding took."""
        start = time.perf_counter()
        samples = decode_audio(data, self.service.limits.media)
        decode_seconds = time.perf_counter() - start
        features = self.service.preparer.speech_features
        assert features is not None
        longest = min(MAX_SEGMENT_SECONDS, features.window_samples / SAMPLE_RATE)
        return samples, split_speech(samples, max_seconds=longest), decode_seconds

    def _features(self, piece: np.ndarray, decode_seconds: float) -> PreparedMedia:
        """In a media thread: one segment's log-mel features."""
        start = time.perf_counter()
        prepared = self.service.preparer.prepare("audio", piece)
        self.service.metrics.media_stages("audio", decode_seconds, time.perf_counter() - start)
        return prepared


def timestamp(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (SRT, separator ",") or HH:MM:SS.mmm (WebVTT, ".")."""
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(transcript: Transcript) -> list[tuple[float, float, str]]:
    """(start, end, text) per segment with text; the text on one line (a blank line would end
    the cue)."""
    return [
        (part.segment.start_seconds, part.segment.end_seconds, " ".join(part.text.split()))
        for part in transcript.segments
        if part.text
    ]


def to_srt(transcript: Transcript) -> str:
    return "".join(
        f"{n}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n\n"
        for n, (start, end, text) in enumerate(_cues(transcript), 1)
    )


def to_vtt(transcript: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n\n"
        for start, end, text in _cues(transcript)
    )
