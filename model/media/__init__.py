"""Decoding of user-supplied images, audio and video into model-ready form.

Everything here handles untrusted bytes (uploads, data URIs, files named on the command line), so
the package is built around three rules:

* **Only ``MediaError`` escapes** (`limits`): its ``status`` is the HTTP status the server
  answers with.
* **Limits are checked on header metadata before any pixel/sample is decoded, and enforced again
  while decoding**, because headers can lie. Nothing is ever allocated on a header's word: audio
  is read in bounded blocks, video is decoded frame by frame keeping only the sampled frames.
* **No shared mutable state**, so the server may call these functions from a thread pool. (The
  one process-wide setting touched, Pillow's decompression bomb threshold, is only ever raised,
  under a lock, to the configured limit.)

    sniff       kind detection from magic numbers (`sniff_kind`)
    limits      `MediaLimits`, `MediaError` and the checks every decoder shares
    image       `decode_image` -> RGB ``PIL.Image.Image``
    audio       `decode_audio` -> 1-D float32 mono at ``SAMPLE_RATE`` (16 kHz)
    video       `decode_video` -> `DecodedVideo` (sampled RGB frames, timestamps, audio track)
    container   PyAV helpers audio and video share (demuxer allow-lists, durations, packets)
    files       `load_media_file`: a local file, read within the byte limit
"""

from xllm.model.media.audio import SAMPLE_RATE, decode_audio
from xllm.model.media.files import load_media_file
from xllm.model.media.image import decode_image
from xllm.model.media.limits import MediaError, MediaLimits
from xllm.model.media.sniff import sniff_kind
from xllm.model.media.video import DecodedVideo, decode_video

__all__ = [
    "SAMPLE_RATE",
    "DecodedVideo",
    "MediaError",
    "MediaLimits",
    "decode_audio",
    "decode_image",
    "decode_video",
    "load_media_file",
    "sniff_kind",
]
