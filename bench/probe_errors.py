"""Do the C++ errors of amm_kernels._C reach Python as exceptions on this machine, or crash it?

Run by bench/gpu_session.sh's part "errors". The first GPU session (2026-11-29, H200, torch 2.11) saw
tests/test_cuda_persistent.py::test_forcing_it_where_it_cannot_run_is_an_error end its process with a
segmentation fault inside the CUDA step op, where the CUDA-on-CPU simulator (the same glue, the same
TORCH_CHECK) raises the RuntimeError the test expects. These probes tell a general fault (every C++
error of the extension, or of its CUDA part) from one error path: each case runs in its own process,
some through torch's own C++ errors and the extension's CPU part as controls, and prints whether it
raised, crashed (the signal) or did neither. A crashed case runs again under cuda-gdb where there is
one (the GPU image has no gdb; cuda-gdb also debugs host code; elsewhere gdb), for the native backtrace.

First it prints what the exception runtime of the build is (NOTE [toolchain facts]): that image builds
with /opt/gcc's g++ (build.log), and a C++ exception unwinds through _C.so with whatever libstdc++ and
libgcc_s the process loaded. The cases with TORCH_SHOW_CPP_STACKTRACES=1 (torch's own stack walker,
not glibc's backtrace()) and with that compiler's libstdc++ / libgcc_s preloaded tell the unwinder and
the stack capture apart from the glue. Beside the cases, a one-function extension is built by each C++
compiler here and made to raise (NOTE [a minimal extension]): whether any extension this machine builds
can raise, and whether another compiler would fix it.

    python bench/probe_errors.py [--timeout 60] [--gdb-cases 1] [--gdb-timeout 120] [--build-timeout 120]
                                 [--budget SECONDS]
Exits 0 when every case raised; 1 otherwise (and where there is no CUDA device).
"""
import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

PRELUDE = textwrap.dedent("""\
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from amm_kernels import AMSGD, AMAdamW
    def params(n, size=3, device="cuda"):
        ps = [torch.randn(size, device=device, requires_grad=True) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps
    """).format(root=ROOT)

# name: (environment, code that must raise a RuntimeError or TypeError). The CUDA cases follow the order
# in which the glue checks (csrc/cuda/ops_cuda.cpp): describe() before run_step(), then choose_persistent().
CASES = {
    "torch's own error (control)": ({}, "torch.ones(2, device='cuda') + torch.ones(3, device='cuda')"),
    "the CPU part: AMM_CPU_BATCH_BYTES": ({"AMM_CPU_BATCH_BYTES": "abc"}, "AMSGD(params(1, device='cpu'), backend='cpu').step()"),
    "CUDA describe(): a float64 state tensor": ({}, textwrap.dedent("""\
        ps = params(2)
        opt = AMAdamW(ps, backend="cuda")
        opt.step()
        AMAdamW._match_state_dtypes = lambda self, *args: None  # the optimizer's own cast off: the glue's check
        opt.state[ps[1]]["exp_avg_sq"] = opt.state[ps[1]]["exp_avg_sq"].double()
        opt.state[ps[1]]["exp_avg"] = opt.state[ps[1]]["exp_avg"].double()
        opt.step()""")),
    "CUDA step_variant(): AMM_CUDA_STEP=bogus": ({"AMM_CUDA_STEP": "bogus"}, "AMSGD(params(1), backend='cuda').step()"),
    "CUDA env_int(): AMM_CUDA_PERSISTENT_CACHE=99": ({"AMM_CUDA_STEP": "persistent", "AMM_CUDA_PERSISTENT_CACHE": "99"},
                                                     "AMSGD(params(1), backend='cuda').step()"),
    "CUDA choose_persistent(): forced, adaptive=False": ({"AMM_CUDA_STEP": "persistent"},
                                                         "AMSGD(params(1), backend='cuda', adaptive=False).step()"),
    "CUDA chunk_size(): AMM_CUDA_CHUNK=5000 (first in run_step)": ({"AMM_CUDA_CHUNK": "5000"},
                                                                    "AMSGD(params(1), backend='cuda').step()"),
    # (the tables of that run: 128 tensors, two for these 200; a table takes 384 since, NOTE [one launch
    # per pass] in csrc/cuda/launchers.h)
    "CUDA choose_persistent(): forced, 200 tensors (the test)": (
        {"AMM_CUDA_STEP": "persistent", "AMM_CUDA_TABLE_TENSORS": "128"}, "AMSGD(params(200), backend='cuda').step()"),
    "the test, TORCH_SHOW_CPP_STACKTRACES=1": (
        {"AMM_CUDA_STEP": "persistent", "AMM_CUDA_TABLE_TENSORS": "128", "TORCH_SHOW_CPP_STACKTRACES": "1"},
        "AMSGD(params(200), backend='cuda').step()"),
}
FORCED_200 = "CUDA choose_persistent(): forced, 200 tensors (the test)"
# what each CUDA case must raise: the glue's TORCH_CHECK (tests/test_gpu_session_script.py runs them on the
# CUDA-on-CPU simulator, where they do)
GLUE_ERROR = "RAISED RuntimeError: amm_kernels (CUDA): "


def compiler_runtime_preload() -> str | None:
    """LD_PRELOAD of the build compiler's own libstdc++ and libgcc_s ($CXX, else g++), or None."""
    paths = []
    for name in ("libstdc++.so.6", "libgcc_s.so.1"):
        try:
            res = subprocess.run([os.environ.get("CXX", "g++"), f"-print-file-name={name}"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        path = res.stdout.strip()
        if os.path.isabs(path) and os.path.exists(path):
            paths.append(path)
    return ":".join(paths) or None


# NOTE [toolchain facts]: what decides how a C++ exception leaves _C.so, printed before the cases: the
# compiler named by CC / CXX and its version; which compilers built the objects (.comment); what _C.so
# needs and where it looks (NEEDED, RUNPATH); whether it carries its own unwinder or C++ runtime (defined
# _Unwind_* / __gxx_personality_v0 / __cxa_* symbols: it should define none); and which libstdc++,
# libgcc_s and libgomp a process that imported it has mapped.
MAPS_CODE = ("import sys, torch; sys.path.insert(0, {root!r}); import amm_kernels._C\n"
             "libs = sorted({{l.split()[-1] for l in open('/proc/self/maps') if any(k in l for k in "
             "('libstdc++', 'libgcc_s', 'libgomp', 'libc10.so', '_C.cpython'))}})\nprint('\\n'.join(libs))")


def toolchain_facts() -> list[str]:
    out = [f"CC={os.environ.get('CC', '')!r} CXX={os.environ.get('CXX', '')!r}"]

    def run(cmd, keep=lambda line: True, limit=12):
        try:
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return [f"{' '.join(cmd[:2])}: {err}"]
        lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and keep(ln)]
        return [f"{cmd[0]} {cmd[1]}: {ln}" for ln in dict.fromkeys(lines)][:limit] or [f"{' '.join(cmd[:2])}: (nothing)"]

    cxx = os.environ.get("CXX", "g++")
    out.append(f"{cxx} --version: {compiler_version(cxx)}")
    so = sorted(p for p in os.listdir(os.path.join(ROOT, "amm_kernels")) if p.startswith("_C") and p.endswith(".so"))
    if not so:
        return out + ["no amm_kernels/_C*.so"]
    lib = os.path.join("amm_kernels", so[0])
    out += run(["readelf", "-p", ".comment", lib], keep=lambda ln: "]" in ln)
    out += run(["readelf", "-d", lib], keep=lambda ln: "NEEDED" in ln or "RUNPATH" in ln or "RPATH" in ln, limit=20)
    out += run(["nm", "-D", "--defined-only", lib],
               keep=lambda ln: any(k in ln for k in ("_Unwind_", "__gxx_personality", "__cxa_")))
    out += run([sys.executable, "-c", MAPS_CODE.format(root=ROOT)], limit=12)
    return out

# NOTE [a minimal extension]: does a C++ error of ANY torch extension built on this machine reach Python,
# apart from ours? A one-op extension (a TORCH_CHECK that always fails, registered with TORCH_LIBRARY and
# called through torch.ops, as _C.so's ops are) is built with torch's load_inline, with _C.so's host
# flags, by each C++ compiler found here ($CXX first, then g++ / c++ on the PATH and in /usr/bin, each a
# different file), and called on a CUDA tensor. If the one $CXX built crashes and another compiler's
# raises, the fix is the build's compiler, not our code; if every one raises, the crash is in our path.
# It includes only what it uses (no_implicit_headers, where torch's load_inline has it): ~7 s to build.
MINIMAL_SRC = r"""
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>
at::Tensor amm_probe_throw(const at::Tensor& x) {
  TORCH_CHECK(x.numel() < 0, "amm_probe: the minimal extension's TORCH_CHECK (", x.numel(), " elements)");
  return x;
}
TORCH_LIBRARY(NAME, m) { m.def("throw_check(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(NAME, CompositeExplicitAutograd, m) { m.impl("throw_check", &amm_probe_throw); }
"""
MINIMAL_SCRIPT = textwrap.dedent("""\
    import inspect, sys, tempfile, torch
    from torch.utils.cpp_extension import load_inline
    name = {name!r}
    light = {{"no_implicit_headers": True}} if "no_implicit_headers" in inspect.signature(load_inline).parameters else {{}}
    load_inline(name=name, cpp_sources=[{src!r}.replace("NAME", name)], build_directory=tempfile.mkdtemp(),
                extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], is_python_module=False,
                verbose=False, **light)
    x = torch.ones(2, device="cuda" if torch.cuda.is_available() else "cpu")
    print("CALLING torch.ops", flush=True)
    try:
        getattr(torch.ops, name).throw_check(x)
    except RuntimeError as err:
        print("RAISED", str(err).splitlines()[0][:120], flush=True)
        sys.exit(0)
    print("NOT RAISED", flush=True)
    sys.exit(2)
    """)


def compilers() -> list[str]:
    """$CXX (else c++), then the other C++ compilers here, one per file, at most three."""
    found, seen = [], set()
    for cand in [os.environ.get("CXX") or "c++", "g++", "c++", "/usr/bin/g++", "/usr/bin/c++"]:
        path = shutil.which(cand)
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append(path)
    return found[:3]


def compiler_version(cxx: str) -> str:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return (res.stdout.splitlines() or ["?"])[0].strip()


def minimal_case(index: int, compiler: str) -> tuple[dict, str]:
    """The environment and script that build the minimal extension with compiler and call it."""
    return {"CXX": compiler}, MINIMAL_SCRIPT.format(name=f"amm_probe_{index}", src=MINIMAL_SRC)


EPILOGUE = textwrap.dedent("""\
    except (RuntimeError, TypeError, ValueError) as err:
        print("RAISED", type(err).__name__ + ":", str(err).splitlines()[0][:200], flush=True)
        sys.exit(0)
    print("NOT RAISED", flush=True)
    sys.exit(2)
    """)


def script(code: str) -> str:
    return PRELUDE + "try:\n" + textwrap.indent(code, "    ") + "\n" + EPILOGUE


def run_case(env: dict, code: str, timeout: float, whole: bool = False) -> tuple[str, str]:
    """Run one case in its own process; whole: code is the whole script (not wrapped in PRELUDE)."""
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code if whole else script(code)], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", ""
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode < 0:
        return f"CRASHED (signal {-proc.returncode})", out
    if proc.returncode == 0:
        return "raised", out
    return f"exit {proc.returncode}", out


def gdb_backtrace(env: dict, code: str, timeout: float) -> str:
    gdb = (shutil.which("cuda-gdb") or ("/usr/local/cuda/bin/cuda-gdb" if os.path.exists("/usr/local/cuda/bin/cuda-gdb") else None)
           or shutil.which("gdb"))
    if gdb is None:
        return "(no cuda-gdb or gdb here)"
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "amm_probe_case.py")
    with open(path, "w") as f:
        f.write(script(code))
    # symbols only of the libraries a C++ error passes through. The backtrace comes three times, each
    # with more symbols, so that a gdb stopped while it reads them has printed what it could: first with
    # none (addresses, and the libraries' ranges to place them), then with the small libraries' (ours,
    # c10 and the C++ runtime's: seconds), then with torch's big ones (minutes on some machines).
    small = ["_C.cpython", "libc10.so", "libstdc++", "libgcc_s"]
    big = ["libtorch_python", "libtorch_cpu", "libtorch_cuda"]
    cmd = [gdb, "-q", "-batch", "-ex", "set pagination off", "-ex", "set print thread-events off",
           "-ex", "set auto-solib-add off", "-ex", "handle SIGPIPE nostop noprint", "-ex", "run",
           "-ex", "bt 40", "-ex", "x/4i $pc", "-ex", "info sharedlibrary"]
    for libs in (small, big):
        for lib in libs:
            cmd += ["-ex", f"sharedlibrary {lib}"]
        cmd += ["-ex", "bt 40"]
    cmd += ["--args", sys.executable, path]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
        out, note = proc.stdout + proc.stderr, ""
    except subprocess.TimeoutExpired as exc:
        # what gdb printed before its time ran out (at least the first backtrace, once the crash came)
        out = "".join(_text(part) for part in (exc.stdout, exc.stderr))
        note = f"(cuda-gdb stopped at {timeout:.0f} s; what it printed before:)"
    lines = out.splitlines()
    keep = [ln for ln in lines if ln.startswith(("#", "Thread", "Program", "From", "0x", "=>")) or "SIG" in ln]
    return "\n".join(([note] if note else []) + (keep[-400:] or lines[-40:]))


def _text(data) -> str:
    """A captured stream as text: subprocess's TimeoutExpired holds bytes even under text=True."""
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--gdb-cases", type=int, default=1, help="crashed cases to run again under cuda-gdb")
    parser.add_argument("--gdb-timeout", type=float, default=120.0, help="seconds for each cuda-gdb run")
    parser.add_argument("--build-timeout", type=float, default=120.0,
                        help="seconds for each minimal extension's build and call")
    parser.add_argument("--budget", type=float, default=0.0,
                        help="seconds for the whole probe, counted from its start (0: no limit); "
                             "cuda-gdb gets what is left")
    args = parser.parse_args()
    # --budget counts from here: the part's limit in gpu_session.sh includes torch's import and the
    # toolchain facts (~10-20 s there), so cuda-gdb's deadline must too
    t0 = time.monotonic()
    import torch
    if not torch.cuda.is_available():
        print("probe_errors: no CUDA device")
        return 1
    for line in toolchain_facts():
        print(f"probe_errors: toolchain: {line}", flush=True)
    cases = dict(CASES)
    preload = compiler_runtime_preload()
    if preload:
        env, code = CASES[FORCED_200]
        cases[f"the test, the compiler's runtime preloaded ({preload})"] = ({**env, "LD_PRELOAD": preload}, code)
    # each case is its own process (~5 s, most of it importing torch); the minimal extensions' builds
    # (NOTE [a minimal extension], ~7 s of one core each here) start first and run beside them
    with ThreadPoolExecutor(max_workers=6) as pool:
        minimal = {cxx: pool.submit(run_case, *minimal_case(i, cxx), args.build_timeout, True)
                   for i, cxx in enumerate(compilers())}
        verdicts = list(pool.map(lambda item: run_case(*item[1], args.timeout), cases.items()))
        crashed, ok = [], True
        for (name, (env, code)), (verdict, out) in zip(cases.items(), verdicts):
            if verdict == "raised" and name.startswith(("CUDA", "the test")) and GLUE_ERROR not in out:
                verdict = "raised, but not the glue's error"  # the case's own Python broke before the check
            ok &= verdict == "raised"
            detail = out.splitlines()[-1] if out else ""
            print(f"probe_errors: {name}: {verdict}  | {detail[:220]}", flush=True)
            if verdict.startswith("CRASHED"):
                crashed.append((name, env, code))
        for cxx, future in minimal.items():
            verdict, out = future.result()
            calls = [ln for ln in out.splitlines() if ln.startswith(("RAISED", "NOT RAISED", "CALLING"))]
            detail = "; ".join(calls[-2:]) if calls else (out.splitlines()[-1] if out else "")
            ok &= verdict == "raised"
            print(f"probe_errors: a minimal extension built by {cxx} ({compiler_version(cxx)}): {verdict}  | "
                  f"{detail[:220]}", flush=True)
    for name, env, code in crashed[:args.gdb_cases]:
        # cuda-gdb takes what is left of the part's time (--budget), at most --gdb-timeout
        left = args.budget - (time.monotonic() - t0) - 5 if args.budget else args.gdb_timeout
        if left < 10:
            print(f"probe_errors: no time left for cuda-gdb's backtrace of '{name}'", flush=True)
            break
        print(f"probe_errors: cuda-gdb backtrace of '{name}':", flush=True)
        print(textwrap.indent(gdb_backtrace(env, code, min(left, args.gdb_timeout)), "    "), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
