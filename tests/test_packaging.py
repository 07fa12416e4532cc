"""The wheel carries both packages and the driver, installed as the `capsules-experiment`
command; the command runs however it is started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from capsules import experiment

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "capsules", "input_data")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip wheel` builds, offline, from a copy of the sources (the build writes
    build/ and *.egg-info next to setup.py)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    pytest.importorskip("wheel", reason="building the wheel offline needs wheel")
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = out.glob("capsules-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _dist_info(archive: zipfile.ZipFile, name: str) -> str:
    [path] = [path for path in archive.namelist() if path.endswith(f".dist-info/{name}")]
    return archive.read(path).decode()


@pytest.mark.slow
def test_the_wheel_holds_the_driver_and_both_packages_not_the_rest(wheel):
    names = set(wheel.namelist())
    for module in ("capsules/__init__.py", "capsules/experiment.py", "capsules/tf_logs.py",
                   "capsules/kernels/em_votes.cc",
                   "input_data/__init__.py", "input_data/mnist/fetch.py",
                   "input_data/norb/convert.py"):
        assert module in names, module
    assert not [name for name in names if name.split("/")[0] in (
        "tests", "benchmarks", "checkpoints", "scripts", "experiment.py")]


@pytest.mark.slow
def test_the_wheel_declares_the_command_and_its_metadata(wheel):
    entry_points = _dist_info(wheel, "entry_points.txt")
    assert "[console_scripts]" in entry_points
    assert "capsules-experiment = capsules.experiment:console_main" in entry_points
    metadata = _dist_info(wheel, "METADATA").splitlines()
    assert "Name: capsules" in metadata
    assert [line for line in metadata if line.startswith("Version: ")]
    # (License-Expression from setuptools >= 77.)
    assert {"License: Apache-2.0", "License-Expression: Apache-2.0"} & set(metadata)
    [summary] = [line for line in metadata if line.startswith("Summary: ")]
    assert "dynamic routing" in summary and "EM routing" in summary
    assert "Requires-Python: >=3.10" in metadata
    assert "Classifier: Programming Language :: Python :: 3.11" in metadata


def _console_script() -> Path:
    """The installed `capsules-experiment`, beside the Python running the tests."""
    path = Path(sys.executable).parent / "capsules-experiment"
    if not path.exists():
        pytest.skip(f"{path} not installed (an install older than the command: "
                    "REINSTALL=1 bash scripts/env.sh)")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("command", ["module", "console_script"])
def test_the_command_prints_its_flags(command):
    args = ([sys.executable, "-m", "capsules.experiment"] if command == "module"
            else [str(_console_script())])
    result = subprocess.run([*args, "--helpfull"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]  # absl's help exits with 1
    assert not result.stderr, result.stderr[-3000:]
    for flag in ("--data_dir", "--local_workers", "--checkpoint"):
        assert flag in result.stdout


@pytest.mark.parametrize("main, command", [
    (types.SimpleNamespace(__spec__=None, __file__="experiment.py"),
     [sys.executable, os.path.abspath("experiment.py")]),
    (types.SimpleNamespace(__spec__=None, __file__="/venv/bin/capsules-experiment"),
     [sys.executable, "/venv/bin/capsules-experiment"]),
    (types.SimpleNamespace(__spec__=types.SimpleNamespace(name="capsules.experiment"),
                           __file__="/src/capsules/experiment.py"),
     [sys.executable, "-m", "capsules.experiment"]),
], ids=["shim", "console_script", "module"])
def test_local_workers_rerun_the_command_as_it_was_started(monkeypatch, main, command):
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert experiment._this_command() == command
