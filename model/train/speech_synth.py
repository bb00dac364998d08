"""Synthetic speech from several TTS engines, voices, speeds and noise levels, at 16 kHz.

A speech interface trained on one synthesiser learns that synthesiser; varying the engine, the
voice, the tempo, the pitch (by speed perturbation) and the background noise is what lets it
generalise to voices it never heard. `VOICES` is the one table of every voice with its split:
held-out voices never speak in training data, so evaluation can measure unseen voices.

Each engine writes WAV at its own rate (espeak-ng 22,050 Hz, flite 8 or 16 kHz, festival 16 or
32 kHz by voice); the rate is read from each file's header, never assumed.
"""

from __future__ import annotations

import functools
import io
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xllm.model.train.toy import ToolMissingError, resample

RATE = 16000  # what Whisper's log-mel features expect


@dataclass(frozen=True)
class Engine:
    program: str  # the executable that synthesises
    package: str  # the Debian package that installs it


ENGINES: dict[str, Engine] = {
    "espeak-ng": Engine("espeak-ng", "espeak-ng"),
    "flite": Engine("flite", "flite"),
    "festival": Engine("text2wave", "festival"),
}


@dataclass(frozen=True)
class Voice:
    engine: str  # a key of ENGINES
    name: str  # the engine's voice id: espeak-ng "accent+variant", flite -voice, festival voice_*
    heldout: bool = False  # True: only evaluation speech uses it
    package: str | None = None  # a Debian package the voice needs beyond its engine's
    stretch: bool = True  # False: the voice ignores the engine's tempo setting

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


ESPEAK_ACCENTS = ("en-us", "en-us-nyc", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan")
ESPEAK_ACCENTS += ("en-029", "en-gb-x-gbcwmd")
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
# Held out: one whole accent (West Midlands), and two variants in every accent.
ESPEAK_HELDOUT_ACCENT, ESPEAK_HELDOUT_VARIANTS = "en-gb-x-gbcwmd", ("m7", "f5")

VOICES: tuple[Voice, ...] = (
    *(
        Voice(
            "espeak-ng",
            f"{accent}+{variant}",
            heldout=accent == ESPEAK_HELDOUT_ACCENT or variant in ESPEAK_HELDOUT_VARIANTS,
        )
        for accent in ESPEAK_ACCENTS
        for variant in ESPEAK_VARIANTS
    ),
    Voice("flite", "kal"),
    Voice("flite", "kal16"),
    Voice("flite", "awb"),
    Voice("flite", "slt"),
    Voice("flite", "rms", heldout=True),
    Voice("festival", "kal_diphone", package="festvox-kallpc16k"),
    Voice("festival", "cmu_us_slt_arctic_hts", package="festvox-us-slt-hts", stretch=False),
    Voice("festival", "ked_diphone", heldout=True, package="festvox-kdlpc16k"),
)

TEMPO = (0.8, 1.25)  # the engine's own speaking rate, as a factor of its default
PERTURB = (0.9, 1.0, 1.1)  # Kaldi-style speed perturbation: tempo and pitch together
ESPEAK_PITCH = (25, 75)  # espeak-ng -p (0-99, default 50)
SNR_DB = (None, None, 30, 20, 15, 10)  # None: clean; noise at several signal-to-noise ratios
NOISES = ("white", "pink", "brown")  # spectral slopes 0, -3 and -6 dB per octave
PAD_S = (0.0, 0.3)  # random silence before and after the speech


def voices(heldout: bool) -> tuple[Voice, ...]:
    """The voices of one split."""
    return tuple(v for v in VOICES if v.heldout == heldout)


def debian_packages(selection: tuple[Voice, ...] = VOICES) -> list[str]:
    """The Debian packages that the voices need (engines and voice data)."""
    packages = {ENGINES[v.engine].package for v in selection}
    packages |= {v.package for v in selection if v.package}
    return sorted(packages)


@functools.cache
def _festival_voices() -> frozenset[str]:
    if shutil.which("festival") is None:
        return frozenset()
    listing = subprocess.run(
        ["festival", "--batch", "(print (voice.list))"], capture_output=True, text=True
    ).stdout
    return frozenset(listing.strip("()\n ").split())


def missing(selection: tuple[Voice, ...] = VOICES) -> list[Voice]:
    """The voices that cannot speak here (engine or voice data not installed)."""

    def installed(voice: Voice) -> bool:
        if shutil.which(ENGINES[voice.engine].program) is None:
            return False
        return voice.engine != "festival" or voice.name in _festival_voices()

    return [v for v in selection if not installed(v)]


def require_voices(selection: tuple[Voice, ...] = VOICES) -> None:
    """Raise ToolMissingError naming the packages to install when any voice cannot speak."""
    absent = missing(selection)
    if absent:
        names = ", ".join(v.id for v in absent[:6]) + (", ..." if len(absent) > 6 else "")
        raise ToolMissingError(
            f"TTS voices not installed ({names}); synthetic speech needs them: "
            f"`apt-get install -y {' '.join(debian_packages(tuple(absent)))}` (Debian/Ubuntu)"
        )


def synthesize(
    voice: Voice, text: str, tempo: float = 1.0, pitch: int = 50
) -> tuple[np.ndarray, int]:
    """One utterance by the voice's engine -> (float32 mono samples, the WAV header's rate).

    `tempo` > 1 speaks faster (ignored by voices that cannot stretch); `pitch` is espeak-ng's.
    """
    import soundfile as sf

    program = shutil.which(ENGINES[voice.engine].program)
    if program is None:
        raise ToolMissingError(
            f"{voice.engine} is not installed: `apt-get install -y "
            f"{' '.join(debian_packages((voice,)))}`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        stdin = None
        if voice.engine == "espeak-ng":
            cmd = [program, "-v", voice.name, "-s", str(round(175 * tempo)), "-p", str(pitch)]
            cmd += ["-w", str(wav), text]
        elif voice.engine == "flite":
            cmd = [program, "-voice", voice.name, "--setf", f"duration_stretch={1 / tempo:.4f}"]
            cmd += ["-t", text, "-o", str(wav)]
        else:
            cmd = [program, "-eval", f"(voice_{voice.name})", "-o", str(wav)]
            cmd += ["-eval", f"(Parameter.set 'Duration_Stretch {1 / tempo:.4f})"]
            stdin = text
        subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True)
        samples, rate = sf.read(io.BytesIO(wav.read_bytes()), dtype="float32", always_2d=True)
    return samples[:, 0], rate


def colored_noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-power noise with the spectral slope of `kind` (white, pink or brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    slope = {"white": 0.0, "pink": 0.5, "brown": 1.0}[kind]
    spectrum /= np.maximum(np.arange(len(spectrum)), 1) ** slope
    noise = np.fft.irfft(spectrum, n)
    return (noise / max(1e-12, float(np.sqrt(np.mean(noise**2))))).astype(np.float32)


def render(rng: random.Random, text: str, voice: Voice) -> tuple[np.ndarray, dict[str, Any]]:
    """`text` spoken by `voice` with random tempo, pitch, perturbation, level, padding and noise
    -> (16 kHz float32 samples within [-1, 1], the settings drawn, for the manifest row)."""
    tempo = round(rng.uniform(*TEMPO), 3) if voice.stretch else 1.0
    pitch = rng.randint(*ESPEAK_PITCH) if voice.engine == "espeak-ng" else 50
    perturb, snr, noise_kind = rng.choice(PERTURB), rng.choice(SNR_DB), rng.choice(NOISES)
    samples, rate = synthesize(voice, text, tempo, pitch)
    # Reading `rate`-Hz samples as if at rate * perturb changes tempo and pitch by `perturb`.
    samples = resample(samples, round(rate * perturb), RATE)
    samples *= rng.uniform(0.3, 0.9) / max(1e-4, float(np.abs(samples).max()))
    pad = [np.zeros(round(rng.uniform(*PAD_S) * RATE), np.float32) for _ in range(2)]
    samples = np.concatenate([pad[0], samples, pad[1]])
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    if snr is not None:
        speech_power = float(np.mean(samples**2))
        noise = colored_noise(noise_rng, len(samples), noise_kind)
        samples = samples + noise * np.sqrt(speech_power / 10 ** (snr / 10))
        samples /= max(1.0, float(np.abs(samples).max()))  # scaled down rather than clipped
    settings = {
        "engine": voice.engine,
        "voice": voice.name,
        "tempo": tempo,
        "perturb": perturb,
        "noise": None if snr is None else noise_kind,
        "snr_db": snr,
    }
    if voice.engine == "espeak-ng":
        settings["pitch"] = pitch
    return samples.astype(np.float32), settings


def pick_voice(rng: random.Random, heldout: bool) -> Voice:
    """An engine uniformly, then one of its voices of the split: every engine is heard as often,
    however many voices it has."""
    split = voices(heldout)
    engine = rng.choice(sorted({v.engine for v in split}))
    return rng.choice([v for v in split if v.engine == engine])


def speak_to_file(
    rng: random.Random, text: str, path: Path, heldout: bool = False
) -> tuple[Path, dict[str, Any]]:
    """`text` in a random voice of the split, written as 16 kHz mono FLAC at path.flac."""
    import soundfile as sf

    samples, settings = render(rng, text, pick_voice(rng, heldout))
    path = path.with_suffix(".flac")
    sf.write(path, samples, RATE, format="FLAC", subtype="PCM_16")
    return path, settings
