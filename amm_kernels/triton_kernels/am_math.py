"""The per-element math of SPEC.md as @triton.jit functions, once, for every Triton kernel.

Mirrors csrc/amm_math.h function by function (same names, same operation order) so that the Triton,
C++ and CUDA kernels round the same way. All arithmetic is float32; the caller converts loads.

NOTE [IEEE division]: compiled, Triton's float32 `a / b` is div.full.f32 (up to 2 ulp off) and tl.sqrt
is sqrt.approx.ftz.f32 (approximate, subnormals flushed), where torch, the C++ and CUDA kernels (nvcc's
default -prec-div -prec-sqrt) and the interpreter round exactly. So every float32 division here is
tl.div_rn and every square root tl.sqrt_rn (div.rn.f32, sqrt.rn.f32); float64 `/` is already div.rn.f64.
tests/test_triton_gpu_compile.py fails on any approximate division, square root or reciprocal in the PTX.

NOTE [negation]: triton before 3.9 builds unary minus on floats as `0 - x` (its semantic.minus), compiled
and interpreted, which gives +0 for x = +0, where torch, C++ and CUDA give -0 (the reference keeps the
signs of zeros: tests/_helpers.py check_signed_zeros_as_the_reference failed with triton 3.5.1's
interpreter, and triton 3.6 compiles `-x` to `sub.f32 0, x`). So a negation here is `x * -1.0`, exact
for every x (PTX: a flip of the sign bit); the PTX test fails on any subtraction from zero.
"""
import triton
import triton.language as tl

# Slots of the per-block sums (as AmsgdSum / AdamwSum in amm_math.h).
SGD_GD, SGD_B, SGD_D, AMSGD_SUMS = 0, 1, 2, 3
ADAM_A, ADAM_B, ADAM_C, ADAM_D, AMADAMW_SUMS = 0, 1, 2, 3, 4


@triton.jit
def effective_grad(grad, x, grad_scale, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, coupled_wd):
    """grad / grad_scale, negated if maximize, plus coupled L2 (AMSGD; AMAdamW passes 0). The L2 term
    only where there is decay, as the reference adds it: an inf x with no decay must not give NaN."""
    g = grad
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)  # a division, as the reference (not a multiply by 1 / grad_scale)
    if MAXIMIZE:
        g = g * -1.0  # NOTE [negation]
    return tl.where(coupled_wd != 0.0, g + coupled_wd * x, g)


# ---------------------------------------------------------------------------------------------
# AM-SGD (SPEC.md section 1)
@triton.jit
def amsgd_terms(g, d, lam):
    """<g, d>, <d - g, g + lam d>, <d - g, d - g> per element (D as a square, never expanded)."""
    diff = d - g
    return g * d, diff * (g + lam * d), diff * diff


@triton.jit
def amsgd_momentum(g, d, beta, lam, first_step):
    return tl.where(first_step, g, tl.div_rn((beta + lam) * d + (1.0 - beta) * g, 1.0 + lam))


@triton.jit
def sgd_param(x, d_new, lr):
    return x - lr * d_new


@triton.jit
def amsgd_weighted(gd, b, dd, lr, prev_lr, lam, FIRST_ORDER: tl.constexpr):
    """Per-tensor weighting (float64): num = (lam + 1) eta_prev <g,d> - eta B, den = eta D."""
    num = (lr * -1.0) * b  # NOTE [negation]
    if FIRST_ORDER:
        num = (lam + 1.0) * prev_lr * gd + num
    return num, lr * dd


# ---------------------------------------------------------------------------------------------
# AM-AdamW (SPEC.md section 2); bias1, bias2 are float32 values formed in float64 by the driver.
@triton.jit
def adamw_second_moment(g, v, beta2, one_minus_beta2):
    # NOTE [1 - beta2] (csrc/amm_math.h): formed by the caller in double and rounded once; 1.0 - beta2
    # from a float32 beta2 = 0.999 is 1.3e-5 off 0.001.
    return beta2 * v + one_minus_beta2 * g * g


@triton.jit
def adamw_precond(v_new, bias1, bias2, eps):
    return bias1 * (eps + tl.sqrt_rn(tl.div_rn(v_new, bias2)))


@triton.jit
def amadamw_terms(g, d, x, p, lam, mu):
    """<g, mu x + d/p>, <w (d-g), g + lam p d>, <d - g, x>, <w (d-g), d-g> per element."""
    w = tl.div_rn(1.0, (1.0 + lam * p) * p)
    diff = d - g
    return g * (mu * x + tl.div_rn(d, p)), w * diff * (g + lam * p * d), diff * x, w * diff * diff


@triton.jit
def amadamw_momentum(g, d, p, beta, lam):
    return tl.div_rn(beta * d + lam * p * d + (1.0 - beta) * g, 1.0 + lam * p)


@triton.jit
def adamw_param(x, d_new, p, lr, mu):
    return (1.0 - lr * mu) * x - tl.div_rn(lr * d_new, p)


@triton.jit
def amadamw_weighted(a, b, c, dd, lr, prev_lr, mu):
    """Per-tensor weighting (float64): num = eta_prev A - c (B + mu C), den = c D, c = eta / (1 + mu eta)."""
    cw = lr / (1.0 + mu * lr)
    return prev_lr * a - cw * (b + mu * c), cw * dd


# ---------------------------------------------------------------------------------------------
@triton.jit
def is_finite(x):
    """x is neither inf nor NaN (written without isinf/isnan so every Triton version accepts it)."""
    return (x == x) & (tl.abs(x) <= 1.7976931348623157e308)


@triton.jit
def scope_beta(num, den, beta_min, beta_max, first_step, ADAPTIVE: tl.constexpr):
    """Beta of one scope from its float64 sums (amm_math.h scope_beta): NaN for non-finite sums,
    beta_max where den is not > 0, on the first step, and when adaptive=False."""
    if ADAPTIVE:
        ratio = num / tl.where(den > 0.0, den, 1.0)
        ratio = tl.where(ratio < beta_min, beta_min, ratio)  # NaN-propagating clamp
        ratio = tl.where(ratio > beta_max, beta_max, ratio)
        beta = tl.where(den > 0.0, ratio, beta_max)
        beta = tl.where(is_finite(num) & is_finite(den), beta, float("nan"))
        beta = tl.where(first_step, beta_max, beta)
    else:
        beta = tl.where(first_step, beta_max, beta_max + 0.0 * num)
    return beta
