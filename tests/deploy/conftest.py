from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(scope="session")
def app_client() -> Iterator:
    """The real FastAPI app (xllm.server.app.create_app), lifespan not run: no model loads, so
    /ready answers 503 "loading" while /health and /metrics answer 200."""
    from fastapi.testclient import TestClient

    from xllm.server.app import create_app
    from xllm.server.settings import Settings

    yield TestClient(create_app(Settings(api_key=None, api_key_file=None)))


@pytest.fixture(scope="session")
def route_status(app_client) -> Callable[[str], int]:
    """GET path -> status code from the app (404 for a route that doesn't exist)."""
    cached: dict[str, int] = {}

    def status(path: str) -> int:
        if path not in cached:
            cached[path] = app_client.get(path).status_code
        return cached[path]

    return status


@pytest.fixture
def check_settings_env(monkeypatch) -> Callable[[dict[str, str | None], str], None]:
    """check(env, where): every XLLM_* name is a Settings field (or one of the pretrained parts'
    cache variables) and the values, as environment variables, make valid Settings (parsed by
    pydantic-settings as the server does)."""
    from pydantic import ValidationError

    from tests.deploy.helpers import environment_names
    from xllm.server.settings import Settings

    fields = environment_names()

    def check(env: dict[str, str | None], where: str) -> None:
        xllm_env = {k: v for k, v in env.items() if k.startswith("XLLM_")}
        unknown = sorted(set(xllm_env) - set(fields))
        assert not unknown, f"{where}: not server settings: {unknown} (known: {sorted(fields)})"
        for name in [n for n in os.environ if n.startswith("XLLM_")]:
            monkeypatch.delenv(name)
        for name, value in xllm_env.items():
            if value is not None:  # None: passed through from the caller's environment
                monkeypatch.setenv(name, value)
        try:
            Settings()
        except ValidationError as exc:
            raise AssertionError(f"{where}: invalid settings {xllm_env}: {exc}") from None

    return check
