"""Compile every Triton kernel launch a step makes for NVIDIA GPUs (sm_80, sm_90), without a GPU.

Triton compiles for a named target (triton.compile with a GPUTarget) without a device: its front end
and its bundled ptxas are enough. What to compile is recorded, not written by hand: representative
steps of AMSGD, AMAdamW and RLLC run in the interpreter (TRITON_INTERPRET=1) while every launch's
argument types and constexpr values are recorded; a second process (compiled mode) then builds each
distinct specialization to a cubin. A kernel that the interpreter accepts but the compiler rejects
(an API the compiler lacks, a type error only codegen sees) fails here instead of on the next GPU.

    python tests/_triton_gpu_compile.py record FILE   # TRITON_INTERPRET=1 in the environment
    python tests/_triton_gpu_compile.py compile FILE  # not in interpreter mode
(tests/test_triton_gpu_compile.py runs both.)
"""
from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time

TARGETS = [("cuda", 80, 32), ("cuda", 90, 32)]
_PTR = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int64": "i64",
        "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _type_of(value) -> str | None:
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _PTR[str(value.dtype).replace("torch.", "")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    return None  # None and other values: passed as a constexpr


def _workloads():
    """Small steps covering the launch variants: every optimizer and dtype, grad scaling, found_inf,
    loss mode, maximize, adaptive=False, each beta scope, several groups, an empty tensor, sharded sums."""
    import torch

    from amm_kernels import RLLC, AMAdamW, AMSGD

    def run(make, dtype=torch.float32, steps=2, closure=False, scale=False):
        gen = torch.Generator().manual_seed(0)
        shapes = [(7,), (300,), (0,), (5, 3)]
        params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
        opt = make([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}])
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if scale:
                opt.grad_scale = torch.tensor(8.0)
                opt.found_inf = torch.zeros(())
            opt.step((lambda: torch.tensor(1.0)) if closure else None)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        run(lambda p: AMSGD(p, backend="triton"), dtype)
        run(lambda p: AMAdamW(p, backend="triton"), dtype)
        run(lambda p: RLLC(p, law_lr=0.05, backend="triton"), dtype)
    for k in (5, 8):  # k is a constexpr: the largest tiles (KP2 = 8) and the largest k the kernels take
        memory = "+".join(f"M(0.{9 - i})" for i in range(k))
        run(lambda p: RLLC(p, memory=memory, law_lr=0.05, backend="triton"), steps=2)
    for scope in ("group", "tensor"):
        run(lambda p: AMSGD(p, beta_scope=scope, weight_decay=0.01, backend="triton"))
        run(lambda p: AMAdamW(p, beta_scope=scope, maximize=True, backend="triton"))
    run(lambda p: AMSGD(p, delta_f="loss", backend="triton"), closure=True)
    run(lambda p: AMSGD(p, adaptive=False, backend="triton"), scale=True)
    run(lambda p: AMAdamW(p, backend="triton"), scale=True)
    run(lambda p: RLLC(p, memory="M(0.9)+M(0.8)+M(0.7)", law_lr=0.05, backend="triton"), scale=True)
    # sharded parameters (a process_group): the finalize writes the scope sums (SUMS_OUT), then reads the
    # all-reduced ones (SUMS_IN) in place of pass 1's, as on several GPUs
    import torch.distributed as dist

    if dist.is_available() and dist.is_gloo_available() and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            group = dist.group.WORLD
            run(lambda p: AMSGD(p, process_group=group, backend="triton"))
            run(lambda p: AMAdamW(p, beta_scope="group", process_group=group, backend="triton"), scale=True)
            run(lambda p: RLLC(p, law_lr=0.05, process_group=group, backend="triton"))
        finally:
            dist.destroy_process_group()
    # pass 1 in spans of several blocks (NOTE [pass-1 spans] in triton_kernels/reduce_kernels.py): not the
    # default, but bench/bench_triton_variants.py runs it on the GPU, so it must compile there
    from amm_kernels import triton_backend

    triton_backend.PASS1_ITERS = 4
    try:
        run(lambda p: AMSGD(p, weight_decay=0.01, backend="triton"))
        run(lambda p: AMAdamW(p, backend="triton"))
        triton_backend.PASS1_ITERS, triton_backend.PASS1_STAGES = 8, 3  # NOTE [pass-1 stages]: pipelined spans
        run(lambda p: AMSGD(p, weight_decay=0.01, backend="triton"))
        run(lambda p: AMAdamW(p, backend="triton"))
    finally:
        triton_backend.PASS1_ITERS, triton_backend.PASS1_STAGES = 1, 1


# record's exit status where this triton's interpreter has no InterpretedFunction.run to hook (triton 3.5
# makes it per function): the callers skip, naming the version; the kernels still run there.
CANNOT_RECORD = 3


def record(path: str) -> None:
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    if not callable(getattr(interpreter.InterpretedFunction, "run", None)):
        print(f"cannot record launches with triton {triton.__version__}: its interpreter has no "
              "InterpretedFunction.run to hook (triton 3.6 and newer have one)")
        sys.exit(CANNOT_RECORD)
    from amm_kernels import triton_backend

    seen: dict[str, list] = {}
    original = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for p in params:
            value = bound.get(p.name, p.default)
            kind = None if p.annotation is tl.constexpr or "constexpr" in str(p.annotation) else _type_of(value)
            if kind is None:
                signature[p.name] = "constexpr"
                constexprs[p.name] = value
            else:
                signature[p.name] = kind
        # launch options (the interpreter is given none: the GPU launches pass COMPILED_OPTIONS)
        options = dict(triton_backend.KERNEL_OPTIONS.get(self.fn.__name__, triton_backend.COMPILED_OPTIONS))
        options.update({k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")})
        entry = [self.fn.__module__, self.fn.__name__, signature, constexprs, options]
        seen[json.dumps(entry, sort_keys=True)] = entry
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    # The interpreter's BLOCK is larger than a GPU's (triton_backend.BLOCK); record what a GPU compiles.
    # At the interpreter's 4096 every AM-AdamW and RLLC kernel took 255 registers and spilled.
    triton_backend.BLOCK = triton_backend.COMPILED_BLOCK
    _workloads()
    with open(path, "w") as fh:
        json.dump(sorted(seen.values(), key=json.dumps), fh, indent=0)
    print(f"recorded {len(seen)} distinct launches")


def _resources(cubin: bytes, cuobjdump: str | None) -> tuple[int, int] | None:
    """(registers, stack-frame bytes) of the one kernel in `cubin`, read by the cuobjdump that Triton's
    NVIDIA backend carries; None without it."""
    import subprocess
    import tempfile

    if cuobjdump is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


# float32 division and square root as Triton compiles `/` and tl.sqrt (div.full: 2 ulp; sqrt.approx.ftz),
# and any approximate float32 reciprocal: none may remain (NOTE [IEEE division] in triton_kernels/am_math.py).
# (float64 ones are left out: the math library seeds exact float64 algorithms with rcp.approx.ftz.f64.)
INEXACT = re.compile(r"\b(?:div\.full|div\.approx|sqrt\.approx|rcp\.approx|rsqrt\.approx)(?:\.ftz)?\.f32\b")
# A float negation compiled as a subtraction from +0 (`0 - x`: triton before 3.9 builds unary minus so),
# which gives +0 where -x is -0 (NOTE [negation] in triton_kernels/am_math.py): the zero as an immediate
# or as a register set to it.
ZERO_REGISTER = re.compile(r"\bmov\.b(?:32|64)\s+(%\w+),\s*0[fd]0+;")
SUBTRACTION = re.compile(r"\bsub(?:\.rn)?\.f(?:32|64)\s+%\w+,\s*(%\w+|0[fd]0+)\s*,")


def subtractions_from_zero(ptx: str) -> int:
    zeros = set(ZERO_REGISTER.findall(ptx))
    return sum(1 for first in SUBTRACTION.findall(ptx) if first in zeros or not first.startswith("%"))


def compile_all(path: str) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    entries = json.load(open(path))
    failures = 0
    start = time.time()
    vectors = {}  # kernel name -> 16-byte global loads / stores in its float32 sm_90 PTX (NOTE [vector access])
    fmas = {}  # kernel name -> fused multiply-adds in its PTX, every target and specialization (NOTE [no fused multiply-add])
    inexact = {}  # kernel name -> approximate divisions / square roots / reciprocals in its PTX (NOTE [IEEE division])
    from_zero = {}  # kernel name -> float subtractions from zero in its PTX (NOTE [negation])
    pipelined = {}  # "name STAGES=s" -> cp.async instructions in its sm_90 PTX (NOTE [pass-1 stages])
    resources = {}  # "name" or "name K=k" -> the most registers and stack-frame bytes of its sm_90 cubins
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.access(cuobjdump, os.X_OK) else None
    for module, name, signature, constexprs, options in entries:
        fn = getattr(importlib.import_module(module), name)
        for backend, arch, warp in TARGETS:
            try:
                kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(backend, arch, warp),
                                        options=options)
                assert kernel.asm.get("cubin"), "no cubin"
            except Exception as err:  # noqa: BLE001 - report every failure, then fail
                failures += 1
                print(f"FAILED sm_{arch} {name} {constexprs}: {str(err).splitlines()[0][:300]}")
                continue
            fmas[name] = fmas.get(name, 0) + kernel.asm["ptx"].count("fma.rn.f")
            inexact[name] = inexact.get(name, 0) + len(INEXACT.findall(kernel.asm["ptx"]))
            from_zero[name] = from_zero.get(name, 0) + subtractions_from_zero(kernel.asm["ptx"])
            if arch == 90 and "STAGES" in constexprs:
                key = f"{name} STAGES={constexprs['STAGES']}"
                pipelined[key] = pipelined.get(key, 0) + kernel.asm["ptx"].count("cp.async")
            if arch == 90 and all(v == 0 for k, v in constexprs.items() if k.endswith("_CODE")):
                ptx = kernel.asm["ptx"]
                vectors[name] = [ptx.count("ld.global.v4"), ptx.count("st.global.v4")]
            used = _resources(kernel.asm["cubin"], cuobjdump) if arch == 90 else None
            if used is not None:
                key = name + (f" K={constexprs['K']}" if "K" in constexprs else "")
                old_regs, old_stack = resources.get(key, (0, 0))
                resources[key] = [max(old_regs, used[0]), max(old_stack, used[1])]
    print(f"compiled {len(entries)} launches x {len(TARGETS)} targets in {time.time() - start:.0f} s, "
          f"{failures} failures (triton {triton.__version__})")
    print("vector accesses " + json.dumps(vectors, sort_keys=True))
    print("fused multiply-adds " + json.dumps(fmas, sort_keys=True))
    print("inexact divisions " + json.dumps(inexact, sort_keys=True))
    print("subtractions from zero " + json.dumps(from_zero, sort_keys=True))
    print("registers and stack " + json.dumps(resources, sort_keys=True))
    print("pipelined loads " + json.dumps(pipelined, sort_keys=True))
    return failures


if __name__ == "__main__":
    what, file = sys.argv[1], sys.argv[2]
    if what == "record":
        record(file)
        # The workloads made (and destroyed) a gloo group: NOTE [gloo teardown] (tests/test_examples.py), torch's
        # threads may abort or hang at interpreter exit; what was asked is written, so leave without them.
        sys.stdout.flush()
        os._exit(0)
    else:
        sys.exit(1 if compile_all(file) else 0)
