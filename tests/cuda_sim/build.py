"""Builds csrc/'s CUDA kernels and their torch glue as a CPU library (NOTE [CUDA on the CPU] in
amm_cuda_sim.h), so the tests can run the CUDA backend's code on a machine without a GPU.

The sources are copied unchanged except for three mechanical rewrites that C++ cannot express
through headers, each counted so that a source change the rewrites miss fails the build loudly:
  - `kernel<<<grid, block, shared, stream>>>(args)`  ->  `::amm_sim::launch(&kernel, grid, block, shared, stream, args)`
  - `__shared__ T name[N]...;`  ->  a reference to this block's copy (`extern __shared__` to the
    launch's dynamic shared memory)
  - the op registrations move to the `amm_cuda_sim` library and the CPU dispatch key (so they load
    beside the real amm_kernels._C), and `device.index()` names the simulated device 0.
The shim headers in include/ stand in for the CUDA runtime, cuda_bf16/fp16, cooperative_groups and
c10/cuda. The library is cached under build/cuda_sim/<hash of every input>.

    python tests/cuda_sim/build.py        # builds (or finds) the library and prints its path
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
LIBRARY_NAME = "libamm_cuda_sim.so"
# The translation units: the op schemas, the CUDA glue and kernels, and the simulator.
UNITS = ["ops.cpp", "cuda/ops_cuda.cpp", "cuda/rllc_ops_cuda.cpp", "cuda/amsgd_kernels.cu",
         "cuda/amadamw_kernels.cu", "cuda/finalize_kernels.cu", "cuda/persistent_kernels.cu", "cuda/rllc_kernels.cu",
         "sim_selftest.cu"]


class SimUnavailable(RuntimeError):
    """This machine cannot build the simulator (not x86-64 Linux, no C++ compiler)."""


def unavailable_reason() -> str | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CUDA simulator's context switch is x86-64 Linux only (this is {sys.platform}/{platform.machine()})"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX) to build the CUDA simulator"
    return None


# ---- source rewrites -----------------------------------------------------------------------------

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<")
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _matching_paren(text: str, open_index: int) -> int:
    depth = 0
    for i in range(open_index, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced parentheses after a kernel launch")


def rewrite_launches(text: str) -> tuple[str, int]:
    out, pos, count = [], 0, 0
    while True:
        m = _LAUNCH.search(text, pos)
        if m is None:
            out.append(text[pos:])
            return "".join(out), count
        close_cfg = text.index(">>>", m.end())
        cfg = _split_top_level(text[m.end():close_cfg])
        if not 2 <= len(cfg) <= 4:
            raise ValueError(f"launch configuration {cfg} of {m.group(1)} has {len(cfg)} items")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        open_args = close_cfg + 3
        while text[open_args].isspace():
            open_args += 1
        if text[open_args] != "(":
            raise ValueError(f"no argument list after the launch of {m.group(1)}")
        close_args = _matching_paren(text, open_args)
        args = text[open_args + 1:close_args].strip()
        call = f"::amm_sim::launch(&{m.group(1)}, dim3({cfg[0]}), dim3({cfg[1]}), {cfg[2]}, {cfg[3]}"
        out.append(text[pos:m.start()] + call + (f", {args})" if args else ")"))
        pos = close_args + 1
        count += 1


def rewrite_shared(text: str, name: str) -> tuple[str, int]:
    count = 0

    def dynamic(m):
        nonlocal count
        count += 1
        return f"{m.group(1)}* {m.group(2)} = ::amm_sim::dynamic_shared_array<{m.group(1)}>();"

    def static(m):
        nonlocal count
        count += 1
        line = text.count("\n", 0, m.start()) + 1
        site = zlib.crc32(f"{name}:{line}".encode()) & 0x7FFFFFFF
        return f"auto& {m.group(2)} = ::amm_sim::shared_var<{m.group(1)}{m.group(3)}, {site}u>();"

    text = _DYNAMIC_SHARED.sub(dynamic, text)
    text = _STATIC_SHARED.sub(static, text)
    return text, count


def rewrite_registration(text: str) -> tuple[str, int]:
    n = 0
    for old, new in [("TORCH_LIBRARY(amm_kernels,", "TORCH_LIBRARY(amm_cuda_sim,"),
                     ("TORCH_LIBRARY_IMPL(amm_kernels, CUDA,", "TORCH_LIBRARY_IMPL(amm_cuda_sim, CPU,"),
                     ("device.index()", "amm_sim_device_index(device)")]:
        n += text.count(old)
        text = text.replace(old, new)
    return text, n


def rewrite(text: str, name: str, counts: dict[str, int]) -> str:
    """All three rewrites of one source file; adds how many of each were made to counts."""
    for key, fn in (("launches", rewrite_launches), ("shared", lambda t: rewrite_shared(t, name)),
                    ("registrations", rewrite_registration)):
        text, n = fn(text)
        counts[key] = counts.get(key, 0) + n
    if "<<<" in text or "__shared__" in text:
        raise ValueError(f"{name}: a launch or __shared__ declaration the rewrites did not recognise")
    return text


def prepare_sources(dest: Path) -> dict[str, int]:
    """Copies csrc/ (and the simulator's self-test kernels, as sim_selftest.cu) to dest with the
    rewrites; returns how many of each were made in csrc/."""
    counts: dict[str, int] = {}
    for src in sorted(CSRC.rglob("*")):
        if src.is_dir() or src.suffix not in (".h", ".cuh", ".cu", ".cpp"):
            continue
        rel = src.relative_to(CSRC)
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rewrite(src.read_text(), f"csrc/{rel}", counts))
    (dest / "sim_selftest.cu").write_text(rewrite((HERE / "selftest_kernels.cu").read_text(), "selftest", {}))
    return counts


# ---- compile and link ----------------------------------------------------------------------------

def _inputs_hash(variant: str) -> str:
    import torch

    h = hashlib.sha256((torch.__version__ + variant).encode())
    for root in (CSRC, HERE):
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(str(f.relative_to(REPO)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _flags(src_dir: Path, sanitize: bool) -> tuple[list[str], list[str]]:
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cflags = [std, "-O2", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-Wno-unknown-pragmas",
              f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DAMM_WITH_CUDA=1",
              f"-I{HERE / 'include'}", f"-I{HERE}", f"-I{src_dir}",
              *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}"]
    libdirs = cpp_extension.library_paths()
    ldflags = ["-shared", *(f"-L{p}" for p in libdirs), *(f"-Wl,-rpath,{p}" for p in libdirs),
               "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    if sanitize:  # NOTE [AddressSanitizer] in amm_cuda_sim.cpp; the process must preload libasan
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1"]
        ldflags += ["-fsanitize=address"]
    return cflags, ldflags


def asan_runtime() -> str | None:
    """LD_PRELOAD for a Python process that loads the AddressSanitizer build, or None: libasan (it must be
    loaded first), then libstdc++, whose __cxa_throw ASan's interceptor must find at start-up. Without it
    the first C++ exception (a TORCH_CHECK) aborts the process: "CHECK failed: asan_interceptors.cpp ...
    real___cxa_throw", so no error path could run under ASan."""
    paths = []
    for name in ("libasan.so", "libstdc++.so.6"):
        res = subprocess.run([os.environ.get("CXX", "g++"), f"-print-file-name={name}"], capture_output=True, text=True)
        path = res.stdout.strip()
        if res.returncode != 0 or not os.path.isabs(path) or not os.path.exists(path):
            return None
        paths.append(path)
    return ":".join(paths)


def build(verbose: bool = False, sanitize: bool = False) -> Path:
    """The simulator library's path, building it first if these inputs were not built before.
    sanitize: with AddressSanitizer (NOTE [AddressSanitizer] in amm_cuda_sim.cpp)."""
    reason = unavailable_reason()
    if reason:
        raise SimUnavailable(reason)
    variant = "asan" if sanitize else "plain"
    out_dir = REPO / "build" / "cuda_sim" / f"{variant}-{_inputs_hash(variant)}"
    library = out_dir / LIBRARY_NAME
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (pytest-xdist workers, parallel runs)
        if library.exists():
            return library
        src_dir = out_dir / "src"
        shutil.rmtree(src_dir, ignore_errors=True)
        counts = prepare_sources(src_dir)
        # Every launch, shared array and registration of csrc/cuda must have been rewritten.
        if counts["launches"] < 9 or counts["shared"] < 3 or counts["registrations"] < 5:
            raise RuntimeError(f"cuda_sim: fewer rewrites than csrc/ needs: {counts}")
        cflags, ldflags = _flags(src_dir, sanitize)
        cxx = os.environ.get("CXX", "g++")
        jobs = [(src_dir / unit, out_dir / (unit.replace("/", "_") + ".o")) for unit in UNITS]
        jobs.append((HERE / "amm_cuda_sim.cpp", out_dir / "amm_cuda_sim.o"))
        jobs.append((HERE / "host_stubs.cpp", out_dir / "host_stubs.o"))

        def compile_one(job):
            src, obj = job
            cmd = [cxx, *cflags, "-x", "c++", "-c", str(src), "-o", str(obj)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"cuda_sim: compiling {src.name} failed:\n{res.stderr[-8000:]}")

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(compile_one, jobs))
        tmp = out_dir / (LIBRARY_NAME + ".tmp")
        res = subprocess.run([cxx, *(str(obj) for _, obj in jobs), *ldflags, "-o", str(tmp)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"cuda_sim: linking failed:\n{res.stderr[-8000:]}")
        tmp.rename(library)
        for old in out_dir.parent.iterdir():  # this variant's libraries built from older sources
            if old.is_dir() and old != out_dir and old.name.startswith(f"{variant}-"):
                shutil.rmtree(old, ignore_errors=True)
    return library


def build_program(source: Path, exe: Path, units: list[str]) -> None:
    """A C++ program that calls csrc/cuda's launchers directly (tests/cpp/huge_tensor_check.cpp), linked
    with the plain build's objects of `units` (e.g. "cuda/amsgd_kernels.cu") and of the simulator."""
    library = build()
    cflags, _ = _flags(library.parent / "src", sanitize=False)
    objects = [library.parent / (unit.replace("/", "_") + ".o") for unit in units]
    cmd = [os.environ.get("CXX", "g++"), *cflags, "-Wall", "-Werror", str(source), *(str(o) for o in objects),
           str(library.parent / "amm_cuda_sim.o"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cuda_sim: building {source.name} failed:\n{res.stderr[-8000:]}")


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv, sanitize="--asan" in sys.argv))
