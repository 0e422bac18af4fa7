"""What a user installs from, beside the editable install the README uses: a source distribution (what
`pip install amm-kernels` builds from, or a `pip download --no-binary` mirror) must hold everything the
extension's build includes (MANIFEST.in), and a wheel must hold the whole package and run outside the
source tree. Both are built from a copy of the tree in a temporary folder, so the checkout is not touched."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "README.md", "MANIFEST.in", "amm_kernels", "csrc", "tests", "examples")
BUILD_JUNK = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "build", "*.egg-info")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _copy_tree(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=BUILD_JUNK)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _tracked(prefix: str, suffixes) -> list[str]:
    """Files of the checkout under prefix with one of suffixes, by git where it is a checkout."""
    try:
        out = subprocess.run(["git", "ls-files", prefix], cwd=ROOT, capture_output=True, text=True, timeout=60)
        names = out.stdout.split() if out.returncode == 0 else []
    except OSError:
        names = []
    if not names:
        names = [str(p.relative_to(ROOT)) for p in (ROOT / prefix).rglob("*") if p.is_file()]
    return sorted(n for n in names if n.endswith(suffixes) and "__pycache__" not in n)


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    """{path inside the sdist, without its top folder: bytes}"""
    tree = _copy_tree(tmp_path_factory.mktemp("sdist_src"))
    dist = tree / "dist"
    # AMM_KERNELS_NO_EXTENSION: setup.py then lists no extension, as on a machine without torch: the
    # sdist must not depend on what the machine that makes it can build.
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], tree, {"AMM_KERNELS_NO_EXTENSION": "1"})
    (archive,) = dist.glob("*.tar.gz")
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                files[member.name.split("/", 1)[1]] = tar.extractfile(member).read()
    return files


def test_the_sdist_holds_every_source_the_extension_build_reads(sdist_files):
    wanted = _tracked("csrc", (".h", ".cuh", ".cpp", ".cu")) + _tracked("amm_kernels", (".py",)) + ["setup.py"]
    missing = [name for name in wanted if name not in sdist_files]
    assert not missing, f"missing from the sdist (MANIFEST.in): {missing}"
    assert not [n for n in sdist_files if n.endswith((".so", ".o", ".pyc"))]


def test_every_include_of_the_sdists_csrc_resolves_inside_it(sdist_files):
    """setup.py compiles with -I csrc: a quoted include is found beside the including file or under csrc."""
    unresolved = []
    for name, data in sdist_files.items():
        if not (name.startswith("csrc/") and name.endswith((".h", ".cuh", ".cpp", ".cu"))):
            continue
        for inc in INCLUDE.findall(data.decode("utf-8")):
            beside = os.path.normpath(os.path.join(os.path.dirname(name), inc))
            if beside not in sdist_files and f"csrc/{inc}" not in sdist_files:
                unresolved.append(f"{name}: {inc}")
    assert not unresolved, unresolved
    assert any(n.startswith("csrc/cuda/") for n in sdist_files), "the CUDA sources must travel in every sdist"


def test_a_wheel_holds_the_whole_package_and_runs_outside_the_tree(tmp_path):
    tree = _copy_tree(tmp_path / "src")
    # No extension (it is the sdist tests' and the build's business): the wheel's Python side.
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
          str(tree)], tmp_path, {"AMM_KERNELS_NO_EXTENSION": "1"})
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
         tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch, amm_kernels\n"
        "assert amm_kernels.__file__.startswith(sys.argv[1]), amm_kernels.__file__\n"
        "from amm_kernels import AMAdamW, AMSGD, RLLC\n"
        "import amm_kernels.reference, amm_kernels.triton_kernels\n"
        "p = torch.nn.Parameter(torch.ones(5)); opt = AMAdamW([p], backend='torch')\n"
        "p.grad = torch.full((5,), 0.5); opt.step(); assert (p < 1).all()\n"
        "print('ok')\n"
    )
    res = _run([sys.executable, "-c", code, str(target)], tmp_path)
    assert res.stdout.strip().endswith("ok")
    installed = {str(p.relative_to(target)) for p in (target / "amm_kernels").rglob("*.py")}
    expected = set(_tracked("amm_kernels", (".py",)))
    assert expected <= installed, sorted(expected - installed)
    assert not (target / "tests").exists() and not (target / "bench").exists()
