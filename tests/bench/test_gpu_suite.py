"""The GPU suite's driver at tiny sizes on the CPU: the code paths of a GPU run, every section."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_driver():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_script_runs_its_driver(tmp_path: Path) -> None:
    """The shell entry point finds the driver and Python ($PYTHON) and passes $OUT along."""
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr
    assert "--tiny" in done.stdout and "--budget" in done.stdout
    assert (tmp_path / "out").is_dir()


def test_gpu_suite_runs_tiny_on_cpu(tmp_path: Path, capsys) -> None:
    """Every section of the suite at tiny sizes, in this process (torch is loaded already)."""
    import torch

    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two intra-op threads on a busy 2-CPU machine: 5x slower
    try:
        code = load_driver().main(["--tiny", "--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert code == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["tiny"] is True and report["finished"] is True
    assert report["errors"] == {} and report["skipped"] == []
    results = report["results"]
    serving = ("throughput", "ttft_image")
    expected = {
        "build",
        "encoders",
        *(f"{path}_decode_b{b}" for b in (1, 16, 64) for path in ("engine", "compiled", "hf")),
        *(f"{path}_{what}" for path in ("engine", "compiled", "nf4_compiled") for what in serving),
        "nf4_quantize",
        *(f"nf4_{path}_decode_b1" for path in ("engine", "compiled", "hf")),
    }
    assert set(results) == expected
    for name in expected:
        assert "peak_gpu_gb" in results[name]  # None on the CPU
        assert results[name]["seconds"] >= 0
    for batch in (1, 16, 64):
        for path in ("engine", "compiled", "hf"):
            entry = results[f"{path}_decode_b{batch}"]
            assert entry["batch"] == batch and entry["ms_per_step"] > 0
            assert entry["steps"] == report["sizes"]["steps"]
        for path in ("engine", "compiled"):
            assert results[f"{path}_decode_b{batch}"]["all_finite"]
        assert results[f"compiled_decode_b{batch}"]["compiled"]
        # compiled: the batch fills its bucket and kv_len the smallest kv bucket (the tiny ctx)
        assert results[f"compiled_decode_b{batch}"]["shape"] == [batch, report["sizes"]["ctx"]]
    sizes = report["sizes"]
    for path in ("engine", "compiled", "nf4_compiled"):
        throughput = results[f"{path}_throughput"]
        assert throughput["error_count"] == 0, throughput["errors"]
        expected_tokens = sizes["throughput_streams"] * sizes["throughput_tokens"]
        assert throughput["output_tokens"] == expected_tokens
        assert throughput["output_tokens_per_s"] > 0
        ttft = results[f"{path}_ttft_image"]
        assert ttft["image_requests"] == sizes["ttft_requests"] and ttft["ttft_p50_ms"] > 0
        assert ttft["background_errors"] == []
        assert all(n >= sizes["ttft_streams"] for n in ttft["running_at_submit"])
        assert ttft["streams_still_decoding_at_end"] == sizes["ttft_streams"]
    assert results["nf4_quantize"]["linear_layers_nf4"] > 0
    encoders = results["encoders"]
    assert encoders["image_x1_ms"] > 0 and encoders["image_x32_ms"] > 0
    assert not any(key.endswith("_error") for key in encoders), encoders
    table = (out / "gpu_suite.md").read_text()
    assert "decode, batch 64" in table and "TTFT p50" in table and "compiled engine path" in table
