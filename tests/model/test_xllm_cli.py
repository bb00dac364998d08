"""The real `xllm` command in subprocesses: init-tiny, generate (plain, nf4, int8, on llama.cpp),
user errors.

The subprocess runs are independent, so each group is started at once and run side by side.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

# The entry point installed beside this interpreter (the venv's), else the one on PATH.
_BESIDE = Path(sys.executable).parent / "xllm"
XLLM = str(_BESIDE) if _BESIDE.exists() else (shutil.which("xllm") or "xllm")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPT = "What is in <image>?"
CONTEXT = 2048  # the tiny GLM's max_position_embeddings


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [XLLM, *args], capture_output=True, text=True, env=ENV, timeout=timeout, check=False
    )


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def files(media_dir) -> dict[str, Path]:
    return {
        "image": media_dir.png("cli.png", seed=5),
        "audio": media_dir.wav("cli.wav", seconds=1.5, seed=5),
        "video": media_dir.mp4("cli.mp4"),
        "video_av": media_dir.mp4("cli_av.mp4", audio=True),
        "corrupt": media_dir.corrupt("cli_corrupt.png"),
    }


@pytest.fixture(scope="module")
def fps10_model(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The tiny model with video sampled at 10 frames/s (so a 1 s clip gives 8 frames)."""
    out = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("fps10") / "model"))
    config = json.loads((out / "xllm.json").read_text())
    config["image_interface"]["video_fps"] = 10.0
    (out / "xllm.json").write_text(json.dumps(config))
    return out


def generate_args(model: Path, files: dict[str, Path], video: str, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
        "--prompt",
        PROMPT,
        "--image",
        str(files["image"]),
        "--audio",
        str(files["audio"]),
        "--video",
        str(files[video]),
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, fps10_model: Path, files, tmp_path_factory):
    """Every subprocess run of this module, side by side: `xllm init-tiny`, then `xllm generate`
    on its output (none / nf4 / int8), and the user errors (on the session's tiny model)."""
    out = tmp_path_factory.mktemp("cli") / "tiny"
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi"]
    errors = {
        "corrupt": [*base, "--image", str(files["corrupt"])],
        "missing": [*base, "--audio", str(out.parent / "missing.wav")],
        "bad_flag": [*base, "--temprature", "0.5"],
        "bad_choice": [*base, "--quantize", "nf8"],
        # Over-long: the reply cannot fit the context. The message reports the prompt's length,
        # checked below against the in-process pipeline (video at 10 fps, with its audio track).
        "long": generate_args(fps10_model, files, "video_av", "--max-tokens", str(CONTEXT)),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        init = pool.submit(run, "init-tiny", "--out", str(out))
        futures = {name: pool.submit(run, *argv) for name, argv in errors.items()}
        results = {"init": init.result()}
        if results["init"].returncode == 0:
            for quantize in ("none", "nf4", "int8"):
                video = "video_av" if quantize == "none" else "video"
                argv = generate_args(out, files, video, "--max-tokens", "8")
                argv += ["--quantize", quantize, "--device", "cpu"]
                futures[quantize] = pool.submit(run, *argv)
        results.update({name: future.result() for name, future in futures.items()})
    return out, results


@pytest.fixture(scope="module")
def cli_model(runs) -> Path:
    """A model directory made by the real `xllm init-tiny`."""
    out, results = runs
    result = results["init"]
    assert result.returncode == 0, explain(result)
    assert str(out) in result.stdout
    for name in ("xllm.json", "interfaces.safetensors", "llm/config.json", "vision", "speech"):
        assert (out / name).exists(), name
    return out


def test_init_tiny(cli_model: Path) -> None:
    assert json.loads((cli_model / "xllm.json").read_text())["name"] == "xllm-tiny"


@pytest.mark.parametrize("quantize", ["none", "nf4", "int8"])
def test_generate_with_image_audio_video(runs, cli_model: Path, quantize: str) -> None:
    result = runs[1][quantize]
    assert result.returncode == 0, explain(result)
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr
    # bitsandbytes' per-matmul "inputs will be cast" notice must not flood stderr.
    assert "inputs will be cast" not in result.stderr


def one_clear_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, explain(result)
    assert lines[0].startswith("xllm generate: error: ")
    return lines[0]


def test_corrupt_image(runs, files) -> None:
    line = one_clear_line(runs[1]["corrupt"])
    assert str(files["corrupt"]) in line


def test_missing_file(runs) -> None:
    line = one_clear_line(runs[1]["missing"])
    assert "missing.wav" in line


@pytest.mark.parametrize(("case", "word"), [("bad_flag", "--temprature"), ("bad_choice", "nf8")])
def test_bad_flags(runs, case: str, word: str) -> None:
    result = runs[1][case]
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr
    assert word in result.stderr and "usage:" in result.stderr


def prompt_length(model_dir: Path, files, video: str, fps: float) -> tuple[int, list[str]]:
    """The prompt's length and the video's segments, computed in-process."""
    from xllm.model.checkpoint import load_model
    from xllm.model.media import load_media_file

    model = load_model(model_dir, device="cpu")
    video_media = load_media_file(files[video], "video", fps=fps, max_frames=8)
    items = [
        model.prepare("image", load_media_file(files["image"], "image")),
        model.prepare("audio", load_media_file(files["audio"], "audio")),
        model.prepare("video", video_media),
    ]
    with torch.inference_mode():
        prompt = model.prompt_embeddings([("user", PROMPT)], items)
    return len(prompt), [kind for kind, _ in prompt.encoded[2]]


def test_over_long_prompt(runs, fps10_model: Path, files) -> None:
    result = runs[1]["long"]
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("xllm generate: error: ")
    assert "exceeds the model's context" in last and str(CONTEXT) in last
    match = re.search(r"prompt \((\d+) tokens\)", last)
    assert match, last
    # The CLI samples the video at the model's 10 fps and adds the video's audio track.
    length, segments = prompt_length(fps10_model, files, "video_av", fps=10.0)
    assert segments == ["video", "audio"]
    assert int(match.group(1)) == length
    at_one_fps, _ = prompt_length(fps10_model, files, "video_av", fps=1.0)
    assert length == at_one_fps + 7 * 8  # 8 frames instead of 1, 8 queries each
    silent, segments = prompt_length(fps10_model, files, "video", fps=10.0)
    assert segments == ["video"]
    assert length > silent + 2  # the audio segment's tags and at least one audio token


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "{tmp}/nowhere"], ["model directory not found", "nowhere"]),
        (["--max-tokens", "0"], ["max_tokens"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--image", "{tmp}/x.png"], ["x.png"]),
        (["--prompt", "<image> <image>", "--image", "{png}"], ["2 <image>", "1 image"]),
        (["--llm-backend", "llamacpp", "--quantize", "nf4"], ["none or int8"]),
        (["--llm-backend", "llamacpp", "--device", "cuda"], ["runs on the CPU"]),
    ],
)
def test_user_errors_in_process(tiny_model_dir, files, tmp_path, capsys, argv, words) -> None:
    """The same exit-code mapping through `xllm.main.main`, for cases not worth a subprocess."""
    from xllm.main import main

    argv = [a.format(tmp=tmp_path, png=files["image"]) for a in argv]
    full = ["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "cpu"]
    assert main(full + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("xllm generate: error: ")
    for word in words:
        assert word in err


def test_init_tiny_output_loads_every_weight_from_its_files(cli_model: Path) -> None:
    """No parameter of a loaded model is left at a random initialisation."""
    from safetensors.torch import load_file

    from xllm.model.checkpoint import load_model

    model = load_model(cli_model, device="cpu")
    for loaded, path in (
        (model.llm.state_dict(), cli_model / "llm" / "model.safetensors"),
        (model.interface_state_dict(), cli_model / "interfaces.safetensors"),
    ):
        on_disk = load_file(path)
        assert set(on_disk) <= set(loaded), path
        for name, tensor in on_disk.items():
            assert torch.equal(loaded[name], tensor), (path, name)


def test_quantized_llm_layers_in_process(cli_model: Path) -> None:
    import bitsandbytes as bnb

    from xllm.model.checkpoint import load_model
    from xllm.model.generate import generate
    from xllm.model.llm import Int8WeightOnlyLinear
    from xllm.model.sampling import SamplingParams

    # On the CPU: bitsandbytes for nf4, torch's int8 weight-only kernel for int8 (LM head too).
    for quantize, kind in (("nf4", bnb.nn.Linear4bit), ("int8", Int8WeightOnlyLinear)):
        model = load_model(cli_model, device="cpu", quantize=quantize)
        layers = model.llm.model.layers
        linears = [m for m in layers.modules() if isinstance(m, (torch.nn.Linear, kind))]
        assert linears and all(isinstance(m, kind) for m in linears), quantize
        # Only the LLM is quantized: the encoders and interfaces stay float.
        for module in (model.vision, model.speech, *model.interfaces().values()):
            assert not any(isinstance(m, kind) for m in module.modules())
            assert all(p.dtype == torch.float32 for p in module.parameters())
        with torch.inference_mode():
            embeds = model.prompt_embeddings([("user", "hello")], []).embeds
        deltas = list(
            generate(model.llm, model.tokenizer, embeds, SamplingParams(max_tokens=4, min_tokens=4))
        )
        assert len(deltas) == 4


def test_int8_weight_only_linear_is_the_dequantized_matmul() -> None:
    """Int8WeightOnlyLinear computes x @ (int8 weight x row scale)^T + bias, and the rounding is
    at most half a step of each row's scale."""
    from xllm.model.llm import Int8WeightOnlyLinear, int8_weight_only

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    quantized = Int8WeightOnlyLinear(linear)
    dequantized = quantized.weight.float() * quantized.scale[:, None]
    assert (dequantized - linear.weight).abs().le(quantized.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    expected = torch.nn.functional.linear(x, dequantized, linear.bias)
    torch.testing.assert_close(quantized(x), expected, rtol=1e-5, atol=1e-5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert int8_weight_only(model) == 2
    assert [type(m) for m in model] == [Int8WeightOnlyLinear, torch.nn.ReLU, Int8WeightOnlyLinear]


def test_generate_on_llamacpp_streams_what_torch_streams(tiny_llama_model_dir: Path, files) -> None:
    """`--llm-backend llamacpp` runs the frozen LLM on llama.cpp with the image's tokens going in
    as embeddings: in float32 its logits are PyTorch's to float tolerance, so the same seeded
    sample (sampled, not greedy: the tiny random LLM repeats one empty token when greedy)."""
    argv = ["generate", "--model", str(tiny_llama_model_dir), "--prompt", PROMPT, "--image"]
    argv += [str(files["image"]), "--max-tokens", "16", "--ignore-eos", "--temperature", "1"]
    argv += ["--seed", "7", "--dtype", "float32", "--device", "cpu", "--llm-backend"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        torch_run, llamacpp_run = pool.map(lambda b: run(*argv, b), ("torch", "llamacpp"))
    for result in (torch_run, llamacpp_run):
        assert result.returncode == 0, explain(result)
    assert len(torch_run.stdout.strip()) >= 8
    assert llamacpp_run.stdout == torch_run.stdout


def test_generate_on_llamacpp_decodes_every_token_there(
    tiny_llama_model_dir: Path, monkeypatch, capsys
) -> None:
    """The reply's tokens come from llama.cpp's slots, not PyTorch's (in process, counted)."""
    from xllm.main import main
    from xllm.model import llamacpp

    calls: list[str] = []

    class CountingSlots(llamacpp.LlamaCppSlots):
        def prefill(self, *args, **kwargs):
            calls.append("prefill")
            return super().prefill(*args, **kwargs)

        def decode(self, *args, **kwargs):
            calls.append("decode")
            return super().decode(*args, **kwargs)

    monkeypatch.setattr(llamacpp, "LlamaCppSlots", CountingSlots)
    argv = ["generate", "--model", str(tiny_llama_model_dir), "--prompt", "hi", "--max-tokens"]
    argv += ["5", "--ignore-eos", "--device", "cpu", "--llm-backend", "llamacpp"]
    assert main(argv) == 0
    capsys.readouterr()
    assert calls == ["prefill"] + ["decode"] * 4  # the first token comes from the prefill
