"""Fixtures for the evaluation tests: a small offline pack, a real server on the tiny model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess

PACK_N = 3  # items per task: every task end to end, in seconds on two busy cores


@pytest.fixture(scope="session")
def eval_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`xllm eval pack --n 3`: every task's manifest with its media."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from xllm.model.evaluation.pack import make_pack

    root = tmp_path_factory.mktemp("pack")
    make_pack(root, PACK_N, seed=0)
    return root


@pytest.fixture(scope="session")
def eval_server_started(tiny_model_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """`xllm serve` on the tiny model, in a subprocess, not yet waited for: requested early, it
    boots while the in-process run works."""
    server = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("eval-server-logs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def eval_server(eval_server_started: ServerProcess) -> ServerProcess:
    eval_server_started.wait_ready(timeout=120)
    return eval_server_started
