"""The per-element math of RLLC (SPEC.md section 4) as @triton.jit functions, in the style of am_math.py.

The memory of a tensor is k units m_0 .. m_{k-1} (its state tensor, shape (k, *param.shape), unit a at
element offset a * numel). The kernels hold the units of a block as a 2-D [KP2, BLOCK] tile (KP2 = the
next power of two >= k; rows >= k are masked to 0). Same operations in the same order as the reference
(amm_kernels/reference/rllc_reference.py): float32 arithmetic, float64 only for the Gram sums.
"""
import triton
import triton.language as tl


@triton.jit
def rllc_grad(grad, grad_scale, HAS_GRAD_SCALE: tl.constexpr):
    """grad / grad_scale (a division, as the reference); RLLC has no maximize or weight decay."""
    g = grad
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    return g


@triton.jit
def gram_first_slot(a, K: tl.constexpr):
    """Slot of the Gram entry (a, a) in gram_pairs order ((0,0), (0,1), .., (0,K-1), (1,1), ..);
    entry (a, b), b >= a, is at gram_first_slot(a, K) + b - a."""
    return a * K - (a * (a - 1)) // 2


@triton.jit
def unit_dots(m2, v):
    """<m_b, v> for every unit b of the tile, float64 (products of float32 values are exact in it)."""
    return tl.sum(m2 * v[None, :], axis=1)


@triton.jit
def memory_input(g, b_rows):
    """The g b^T term of M U + g b^T: row a is b_a g."""
    return b_rows[:, None] * g[None, :]


@triton.jit
def memory_propagate(acc, m_c, u_row):
    """Adds unit c of the previous memory: row a gets U[c][a] m_c (u_row = row c of U)."""
    return acc + u_row[:, None] * m_c[None, :]


@triton.jit
def law_direction(m_new, law_rows):
    """M L = sum_a L_a m_a (rows past k are zero in both)."""
    return tl.sum(law_rows[:, None] * m_new, axis=0)


@triton.jit
def rllc_param(x, direction, lr):
    return x - lr * direction
