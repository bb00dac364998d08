"""The wheel holds every module of the tree, and each imports from the installed wheel alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from xllm.model.recipes.default_model import SHIPPED

REPO = Path(__file__).resolve().parents[2]

# Imported from the unpacked wheel with the checkout (and the editable install's finder) taken
# off the path: prints {module: file} for every module, or fails on the first that cannot import.
IMPORT_ALL = """
import importlib, json, sys
site, names = sys.argv[1], json.loads(sys.argv[2])
sys.path[:] = [site] + [p for p in sys.path if p not in ("", {repo!r})]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
print(json.dumps({{name: importlib.import_module(name).__file__ for name in names}}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout's files (the build leaves build/ behind)."""
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_symlink() or (REPO / name).is_file():  # links stay links
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name, follow_symlinks=False)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("xllm-*.whl")
    return built


def tree_modules() -> set[str]:
    """Every Python file the package's tree holds, as a path inside the wheel."""
    found = set()
    for folder, _, files in os.walk(REPO / "xllm", followlinks=True):  # into model/ etc.
        if "__pycache__" not in folder:
            found |= {f"{Path(folder, f).relative_to(REPO).as_posix()}" for f in files}
    return {name for name in found if name.endswith(".py")}


def test_the_wheel_holds_every_module_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert tree_modules() <= names, sorted(tree_modules() - names)
    assert {n for n in names if n.endswith(".py")} == tree_modules()  # and nothing else
    for data in (
        *(f"xllm/model/default/{name}" for name in SHIPPED),
        "xllm/server/static/index.html",
    ):
        assert data in names


def test_every_module_imports_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    modules = sorted(
        path[: -len(".py")].removesuffix("/__init__").replace("/", ".")
        for path in tree_modules()
        if not path.endswith("__main__.py")  # runs the command when imported
    )
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.format(repo=str(REPO)), str(site), json.dumps(modules)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout)
    assert sorted(files) == modules
    outside = {name: file for name, file in files.items() if not file.startswith(str(site))}
    assert not outside, outside
