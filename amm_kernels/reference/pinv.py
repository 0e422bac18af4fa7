"""pinv(G) r for small batched symmetric positive semi-definite matrices, on the device, without a host sync.

RLLC's law correction needs the minimum-norm least-squares solution pinv(M^T M) (M^T g) of a k x k
Gram matrix per scope (SPEC.md section 4). torch.linalg.eigh would do, but on CUDA it reads its
error status back to the host (a sync inside step()), and it raises on NaN input. This module
computes the same thing with a fixed number of cyclic Jacobi sweeps in plain torch ops: no `.item()`,
no Python branch on a device value, the same op sequence whatever the data (so it also runs on the
meta device and can be captured in a CUDA graph once its constant tables exist).

NOTE [parallel Jacobi]: one sweep rotates every off-diagonal pair (p, q) once. The pairs are visited
in round-robin (tournament) order: each of the k - 1 (k even) or k (k odd) rounds holds floor(k/2)
disjoint pairs, whose rotations commute, so a round is one rotation matrix J (built from the round's
cos/sin by a constant 0/1 matrix product, exact) and one update A <- J^T A J, V <- V J. The angle of
pair (p, q) is theta = atan(2 a_pq / (a_qq - a_pp)) / 2, |theta| <= pi / 4 (the inner rotation of
Golub & Van Loan, Alg. 8.4.2), which zeroes a_pq; theta = 0 where a_pq = 0. Cyclic Jacobi converges
quadratically (also for repeated eigenvalues, as in a rank-deficient Gram matrix), so a fixed
`sweeps(k)` reaches float64 rounding for every input; tests/test_pinv.py checks that bound against
numpy.linalg.pinv on well-conditioned, ill-conditioned (cond up to 1e8) and rank-deficient matrices.

The matrix is divided by its largest |entry| first (pinv(G) = pinv(G / s) / s), so the iteration sees
entries of order 1 whatever the scale of the sums. Eigenvalues w <= rcond * max(w) are dropped (as
numpy.linalg.pinv(..., hermitian=True) and the previous eigh code did), which gives the
minimum-norm solution for a rank-deficient G; an all-zero G gives 0. A non-finite entry of G or r
gives a NaN result for that matrix (and only that one), never an exception.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["gram_pinv_apply", "sweeps", "jacobi_eigh"]

def sweeps(k: int) -> int:
    """Jacobi sweeps for a k x k matrix: a host function of k alone. k = 1 needs none, k = 2 one
    rotation (a second one cleans up its rounding). Measured on the matrices of tests/test_pinv.py
    (cond up to 1e8, rank-deficient, clustered, RLLC-memory Gram matrices), pinv reaches its float64
    accuracy after k sweeps for k = 3..7 and 7 for k = 8. Past 8 the need grows with log2(k) and varies
    with the matrix (two random sets, cond 1e4 and 1e8): up to 9, 10, 11, 14, 14, 15, 14 sweeps for
    k = 12, 16, 24, 32, 48, 56, 64 (memory.MAX_UNITS). Each bound here adds at least 2 (past 8,
    ceil(1.5 log2(k)) + 8: 14, 14, 15, 16, 17, 17, 17 for those k)."""
    if k <= 1:
        return 0
    if k == 2:
        return 2
    if k <= 8:
        return min(k, 7) + 2
    return math.ceil(1.5 * math.log2(k)) + 8


def _rounds(k: int) -> list[list[tuple[int, int]]]:
    """Round-robin schedule: rounds of disjoint pairs (p < q) covering every pair once."""
    n = k + (k % 2)  # an odd k gets a dummy player n - 1 = k; its pairs are dropped
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = []
        for i in range(n // 2):
            p, q = players[i], players[n - 1 - i]
            if p < k and q < k:
                pairs.append((min(p, q), max(p, q)))
        rounds.append(pairs)
        players = [players[0], players[-1]] + players[1:-1]  # fix player 0, rotate the others
    return rounds


_TABLES: dict = {}


def _tables(k: int, device: torch.device):
    """Per round, two constant float64 matrices: `pick` [k*k, 2n] maps the flattened matrix to
    (2 a_pq, a_qq - a_pp) of its n pairs, and `place` [2n, k*k] puts (cos, sin) into the rotation J
    (with `base`, the identity of an unpaired index). Every output entry is one nonzero product plus
    exact zeros, so both products are exact. Built once per (k, device) and cached: a warm call copies
    nothing to the device."""
    key = (k, str(device))
    cached = _TABLES.get(key)
    if cached is not None:
        return cached
    out = []
    for pairs in _rounds(k):
        n = len(pairs)
        pick = torch.zeros(k * k, 2 * n, dtype=torch.float64)
        place = torch.zeros(2 * n, k * k, dtype=torch.float64)  # rows: cos of each pair, then sin
        base = torch.eye(k, dtype=torch.float64)
        for i, (p, q) in enumerate(pairs):
            pick[p * k + q, i] = 2.0
            pick[q * k + q, n + i] = 1.0
            pick[p * k + p, n + i] = -1.0
            place[i, p * k + p] = place[i, q * k + q] = 1.0
            place[n + i, p * k + q] = 1.0
            place[n + i, q * k + p] = -1.0
            base[p, p] = base[q, q] = 0.0
        out.append((pick.to(device), place.to(device), base.reshape(1, k * k).to(device)))
    _TABLES[key] = out
    return out


def jacobi_eigh(A: Tensor, n_sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues w [B, k] (unordered) and eigenvectors V [B, k, k] (columns) of symmetric finite
    float64 matrices A [B, k, k], by `n_sweeps` (default sweeps(k)) cyclic Jacobi sweeps."""
    B, k, _ = A.shape
    V = torch.eye(k, dtype=A.dtype, device=A.device).expand(B, k, k).clone()
    if k == 1:
        return A.reshape(B, 1).clone(), V
    tables = _tables(k, A.device)
    for _ in range(sweeps(k) if n_sweeps is None else n_sweeps):
        for pick, place, base in tables:
            num, diff = (A.reshape(B, k * k) @ pick).chunk(2, dim=1)  # 2 a_pq, a_qq - a_pp
            # theta = atan(2 a_pq / (a_qq - a_pp)) / 2: +-pi/4 where a_qq = a_pp, and 0 where a_pq = 0
            # (the denominator is then replaced by 1, which also keeps 0 / 0 out)
            theta = 0.5 * torch.atan(num / torch.where(num == 0, 1.0, diff))
            J = torch.addmm(base, torch.cat([torch.cos(theta), torch.sin(theta)], dim=1), place).reshape(B, k, k)
            A = J.transpose(1, 2) @ A @ J
            V = V @ J
    return A.diagonal(dim1=1, dim2=2), V


def gram_pinv_apply(gram: Tensor, rhs: Tensor, rcond: float) -> Tensor:
    """pinv(gram) @ rhs for symmetric PSD gram [..., k, k] and rhs [..., k], in float64 (the result's
    dtype), with eigenvalues <= rcond * the largest dropped (the minimum-norm least-squares solution).

    Host-sync free and data-independent (NOTE [parallel Jacobi]); a non-finite entry in a matrix or
    its right-hand side gives NaN for that matrix's result."""
    k = gram.shape[-1]
    if gram.shape[-2:] != (k, k) or rhs.shape[-1] != k:
        raise ValueError(f"gram_pinv_apply: gram must be [..., k, k] and rhs [..., k]; got {tuple(gram.shape)} "
                         f"and {tuple(rhs.shape)}")
    batch = torch.broadcast_shapes(gram.shape[:-2], rhs.shape[:-1])
    G = gram.to(torch.float64).expand(*batch, k, k).reshape(-1, k, k)
    r = rhs.to(torch.float64).expand(*batch, k).reshape(-1, k)
    finite = torch.isfinite(G).all(dim=(1, 2)) & torch.isfinite(r).all(dim=1)  # [B]
    G = torch.where(finite[:, None, None], G, 0.0)
    scale = G.abs().amax(dim=(1, 2))
    scale = torch.where(scale > 0, scale, 1.0)
    G = 0.5 * (G + G.transpose(1, 2)) / scale[:, None, None]  # symmetric exactly, entries <= 1
    w, V = jacobi_eigh(G)
    cutoff = rcond * w.amax(dim=1, keepdim=True)
    keep = w > cutoff
    inv_w = torch.where(keep, 1.0 / torch.where(keep, w, 1.0), 0.0)
    y = V @ (inv_w[:, :, None] * (V.transpose(1, 2) @ r[:, :, None]))  # V diag(1/w) V^T r
    out = torch.where(finite[:, None], y[:, :, 0] / scale[:, None], float("nan"))
    return out.reshape(*batch, k)
