"""Triton kernels of the two-pass step (SPEC.md): per-block sums, per-tensor terms and a finalize kernel
that forms beta per scope on the device, and the fused elementwise update. Driven by
amm_kernels/triton_backend.py.

NOTE [package location]: this lives inside amm_kernels (amm_kernels.triton_kernels), not as a top-level
`triton_kernels` package, because Triton's own repository ships a top-level `triton_kernels` package
(pip `triton-kernels`); a second one of that name would shadow it or be shadowed.

Import this package only after TRITON_INTERPRET has its final value: @triton.jit picks the interpreter
or the compiler when the kernels are decorated, i.e. at import.
"""
