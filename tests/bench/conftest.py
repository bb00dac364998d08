"""A real `xllm serve` on the tiny model for the load-generator tests (one per module)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess


@pytest.fixture(scope="module")
def bench_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("bench-server"),
        "--max-batch",
        "8",
        env={"OMP_NUM_THREADS": "1"},  # one intra-op thread: see docs/PERFORMANCE.md
    )
    try:
        server.wait_ready(timeout=120)
        yield server.url
    finally:
        server.stop()
