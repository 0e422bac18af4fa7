"""setup.py's NOTE [CUDA_HOME]: with a wrapper script for nvcc on PATH (as /usr/local/bin/nvcc on the CI
machines), torch would take CUDA_HOME to be the folder above it, which holds no CUDA headers; setup.py
asks nvcc for its toolkit instead. Needs a CUDA toolkit (nvcc), not a GPU. (.ci/cuda_build_check builds
the whole extension that way.)"""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def _toolkit_nvcc():
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _find_cuda_home():
    """setup.py's function alone (running setup.py would run setup())."""
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_find_cuda_home")
    namespace = {"os": os, "shutil": shutil, "subprocess": subprocess, "sys": sys}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace["_find_cuda_home"]


pytestmark = pytest.mark.skipif(_toolkit_nvcc() is None, reason="needs nvcc (a CUDA toolkit)")


def test_a_wrapper_nvcc_on_path_still_finds_the_toolkit(tmp_path, monkeypatch):
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {_toolkit_nvcc()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    for name in ("CUDA_HOME", "CUDA_PATH"):  # set first, so that monkeypatch also undoes what the lookup sets
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    _find_cuda_home()()
    home = os.environ.get("CUDA_HOME")
    assert home is not None and Path(home, "include", "cuda_runtime.h").is_file(), home
    assert Path(home) != tmp_path  # not the folder above the wrapper, which torch would have taken


def test_a_cuda_home_in_the_environment_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    _find_cuda_home()()
    assert os.environ["CUDA_HOME"] == str(tmp_path)
