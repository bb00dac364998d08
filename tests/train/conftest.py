"""Fixtures for the training tests: one toy world per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOY_ROWS = 6  # training rows per manifest; every test batch holds all of them (a fixed batch)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`xllm data toy --n 6`: images, speech, video and mixed manifests with their media."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from xllm.model.train.toy import generate_toy

    root = tmp_path_factory.mktemp("toy")
    generate_toy(root, TOY_ROWS, seed=0, n_val=2, jobs=2)
    return root
