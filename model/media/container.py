"""PyAV helpers shared by audio and video: opening, demuxer allow-lists, durations, packets."""

from __future__ import annotations

import io

import av
import av.error

from xllm.model.media.limits import MediaError, describe

# Demuxers (FFmpeg short names) allowed to feed the audio / video decoders.
# FFmpeg can probe hundreds of formats, including raw elementary streams that
# "recognise" random bytes; an allow-list keeps garbage out and rarely used
# parsers away from untrusted input.
_ISO_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2")
AUDIO_DEMUXERS = frozenset(
    (
        *_ISO_DEMUXERS,
        *("wav", "w64", "rf64", "flac", "ogg", "mp3", "aac", "matroska", "webm", "aiff"),
        *("caf", "au", "amr", "avi", "asf", "mpegts", "mpeg", "flv"),
    )
)
VIDEO_DEMUXERS = frozenset(
    (*_ISO_DEMUXERS, "matroska", "webm", "avi", "asf", "mpegts", "mpeg", "flv", "ogg", "gif")
)


# A few corrupt packets are common in real files (damaged downloads, streams cut
# mid-GOP); past this many we give up rather than grind through garbage.
_MAX_DECODE_ERRORS = 64


def open_container(data: bytes, what: str) -> av.container.InputContainer:
    try:
        # Metadata is free-form bytes; a bad encoding must not fail the decode.
        return av.open(io.BytesIO(data), mode="r", metadata_errors="replace")
    except av.error.FFmpegError as exc:
        raise MediaError(f"could not read {what}: {describe(exc)}", 400) from None


def check_demuxer(
    container: av.container.InputContainer, allowed: frozenset[str], what: str
) -> None:
    names = set(container.format.name.split(","))
    if not names & allowed:
        raise MediaError(f"unsupported {what} container {container.format.name}", 415)


def container_seconds(container: av.container.InputContainer) -> float | None:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def stream_seconds(stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def stream_start(stream: av.stream.Stream) -> float:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return 0.0


class PacketDecoder:
    """Decodes packets of one stream, tolerating a bounded number of bad packets."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.errors = 0
        self.last_error: str | None = None

    def decode(self, packet: av.Packet) -> list[av.frame.Frame]:
        try:
            return packet.decode()
        except (av.error.FFmpegError, ValueError) as exc:
            # Decoders report damaged input with assorted error codes (AAC even
            # uses EPERM), so any decoding error counts as a bad packet.
            self.errors += 1
            self.last_error = describe(exc)
            if self.errors > _MAX_DECODE_ERRORS:
                raise MediaError(f"{self._what} is corrupt: {self.last_error}", 400) from None
            return []
