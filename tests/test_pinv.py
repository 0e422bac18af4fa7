"""gram_pinv_apply (amm_kernels/reference/pinv.py): the host-sync-free pinv(G) r behind RLLC's law,
against numpy.linalg.pinv / torch.linalg.pinv on well-conditioned, ill-conditioned and rank-deficient
Gram matrices, k = 1..8 (ill-conditioned ones also for k = 12 to 64)."""
import numpy as np
import pytest
import torch

from amm_kernels.reference.pinv import gram_pinv_apply, jacobi_eigh, sweeps

RCOND = 1e-6
KS = range(1, 9)
# k past 8, up to memory.MAX_UNITS = 64: the sweeps needed grow with k there (pinv.py sweeps)
LARGE_KS = [12, 16, 32, 48, 64]


def _orthogonal(gen, B, k):
    q, r = torch.linalg.qr(torch.randn(B, k, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]


def _spectrum(gen, B, k, eigenvalues):
    Q = _orthogonal(gen, B, k)
    w = torch.as_tensor(eigenvalues, dtype=torch.float64).expand(B, k)
    G = Q @ torch.diag_embed(w) @ Q.transpose(1, 2)
    return 0.5 * (G + G.transpose(1, 2))


def _numpy_pinv_apply(G, r, rcond=RCOND):
    P = np.linalg.pinv(G.numpy(), rcond=rcond, hermitian=True)
    return torch.from_numpy(np.einsum("bij,bj->bi", P, r.numpy()))


def _check(G, r, rtol, what):
    got = gram_pinv_apply(G, r, RCOND)
    assert got.dtype == torch.float64 and got.shape == r.shape
    ref = _numpy_pinv_apply(G, r)
    err = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
    assert err.max() <= rtol, f"{what}: relative error {err.max().item():.2e} > {rtol:.0e}"
    # and torch's own pinv (SVD, a different algorithm) agrees too
    ref_t = (torch.linalg.pinv(G, rtol=RCOND, hermitian=True) @ r[..., None])[..., 0]
    err_t = (got - ref_t).norm(dim=-1) / ref_t.norm(dim=-1).clamp_min(1e-300)
    assert err_t.max() <= rtol, f"{what} vs torch.linalg.pinv: relative error {err_t.max().item():.2e}"


@pytest.mark.parametrize("k", KS)
def test_well_conditioned(k):
    gen = torch.Generator().manual_seed(k)
    A = torch.randn(64, k, 3 * k, generator=gen, dtype=torch.float64)
    G = A @ A.transpose(1, 2)
    r = torch.randn(64, k, generator=gen, dtype=torch.float64)
    _check(G, r, 1e-12, f"k={k} well-conditioned")
    # the result is the solve
    torch.testing.assert_close(gram_pinv_apply(G, r, RCOND), torch.linalg.solve(G, r), rtol=1e-11, atol=0)


@pytest.mark.parametrize("cond", [1e4, 1e5, 1e8])
@pytest.mark.parametrize("k", list(KS) + LARGE_KS)
def test_ill_conditioned(k, cond):
    # eigenvalues spread log-uniformly over [1/cond, 1], none within a factor 3 of the cutoff rcond * max
    # (there the kept / dropped decision is a matter of rounding, in numpy as here)
    gen = torch.Generator().manual_seed(100 + k)
    w = np.logspace(0, -np.log10(cond), k) if k > 1 else np.array([1.0])
    w = np.where(np.abs(np.log10(w / RCOND)) < 0.5, w * 10.0, w)
    scale = 10.0 ** np.random.default_rng(k).uniform(-20, 20)  # any overall scale
    G = scale * _spectrum(gen, 64, k, w)
    r = torch.randn(64, k, generator=gen, dtype=torch.float64)
    # pinv amplifies the rounding of G's entries by up to the kept condition number (<= 1e6)
    kept = w[w > RCOND * w.max()]
    _check(G, r, 1e-15 * kept.max() / kept.min() * 50 + 1e-13, f"k={k} cond={cond:.0e}")


@pytest.mark.parametrize("k", KS)
def test_rank_deficient(k):
    gen = torch.Generator().manual_seed(200 + k)
    B = 32
    # identical columns: rank 1, the minimum-norm solution splits evenly
    M = torch.randn(B, 20, 1, generator=gen, dtype=torch.float64).expand(B, 20, k)
    G = M.transpose(1, 2) @ M
    r = torch.randn(B, k, generator=gen, dtype=torch.float64)
    _check(G, r, 1e-12, f"k={k} identical columns")
    got = gram_pinv_apply(G, (M.transpose(1, 2) @ M[:, :, :1])[..., 0], RCOND)  # g = m: M^T g
    torch.testing.assert_close(got, torch.full_like(got, 1.0 / k), rtol=1e-12, atol=0)  # g = m: L += (1/k, ...)
    # half the columns copies (times 2) of the others
    if k >= 2:
        M = torch.randn(B, 20, k, generator=gen, dtype=torch.float64)
        M[:, :, k // 2:] = 2.0 * M[:, :, : k - k // 2]
        _check(M.transpose(1, 2) @ M, r, 1e-11, f"k={k} duplicated columns")
    # a zero column, and the zero matrix: pinv(0) = 0
    M = torch.randn(B, 20, k, generator=gen, dtype=torch.float64)
    M[:, :, -1] = 0.0
    _check(M.transpose(1, 2) @ M, r, 1e-11, f"k={k} zero column")
    zero = gram_pinv_apply(torch.zeros(B, k, k, dtype=torch.float64), r, RCOND)
    assert torch.equal(zero, torch.zeros_like(r))


@pytest.mark.parametrize("k", KS)
def test_rllc_memory_gram(k):
    # the matrices RLLC builds: units m_a = sum_t beta_a^t g_t of one gradient stream (nearly collinear)
    gen = torch.Generator().manual_seed(300 + k)
    betas = torch.tensor([0.9, 0.0, 0.7, -0.5, 0.4, -0.8, 0.95, -0.95], dtype=torch.float64)[:k]
    g = torch.randn(16, 12, 300, generator=gen, dtype=torch.float64)
    W = betas[None, :] ** torch.arange(12, dtype=torch.float64).flip(0)[:, None]
    M = torch.einsum("btn,tk->bnk", g, W)
    r = M.transpose(1, 2) @ torch.randn(16, 300, 1, generator=gen, dtype=torch.float64)
    G = M.transpose(1, 2) @ M
    # leave out the matrices with an eigenvalue within a factor 3 of the cutoff (kept or dropped by rounding)
    w = np.linalg.eigvalsh(G.numpy())
    clear = ~np.any(np.abs(np.log10(np.abs(w / w[:, -1:]) / RCOND)) < 0.5, axis=1)
    assert clear.sum() >= 8
    clear = torch.from_numpy(clear)
    _check(G[clear], r[clear, :, 0], 1e-9, f"k={k} memory Gram")


@pytest.mark.parametrize("k", [3, 5, 8])
def test_jacobi_diagonalises(k):
    gen = torch.Generator().manual_seed(400 + k)
    A = torch.randn(32, k, k, generator=gen, dtype=torch.float64)
    A = (A + A.transpose(1, 2)) / 2
    A = A / A.abs().amax(dim=(1, 2), keepdim=True)
    w, V = jacobi_eigh(A)
    torch.testing.assert_close(V.transpose(1, 2) @ V, torch.eye(k, dtype=torch.float64).expand(32, k, k),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(V @ torch.diag_embed(w) @ V.transpose(1, 2), A, rtol=0, atol=1e-14)
    torch.testing.assert_close(w.sort(dim=1).values, torch.linalg.eigvalsh(A), rtol=0, atol=1e-14)
    assert sweeps(k) >= min(k, 7) + 2  # 2 more than the measured need (pinv.py sweeps)


def test_nonfinite_input_gives_nan_for_that_matrix_only():
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    G = A @ A.transpose(1, 2)
    r = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    G[1, 0, 2] = G[1, 2, 0] = float("nan")
    G[2, 1, 1] = float("inf")
    r[3, 0] = float("-inf")
    out = gram_pinv_apply(G, r, RCOND)
    assert torch.isnan(out[1:4]).all()
    ok = [0, 4]
    torch.testing.assert_close(out[ok], torch.linalg.solve(G[ok], r[ok]), rtol=1e-11, atol=0)


def test_shapes_dtypes_and_broadcasting():
    gen = torch.Generator().manual_seed(6)
    A = torch.randn(2, 3, 4, 8, generator=gen)
    G = A @ A.transpose(-1, -2)  # float32 in: computed and returned in float64
    r = torch.randn(4, generator=gen)
    out = gram_pinv_apply(G, r, RCOND)
    assert out.shape == (2, 3, 4) and out.dtype == torch.float64
    expected = torch.linalg.solve(G.double(), r.double().expand(2, 3, 4))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="gram must be"):
        gram_pinv_apply(torch.zeros(3, 4), torch.zeros(4), RCOND)


def test_meta_device_runs_without_reading_values():
    # every .item() / bool(tensor) raises on the meta device: the solve is host-sync free
    out = gram_pinv_apply(torch.zeros(3, 5, 5, device="meta"), torch.zeros(3, 5, device="meta"), RCOND)
    assert out.shape == (3, 5) and out.device.type == "meta"


def test_deterministic():
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(16, 6, 9, generator=gen, dtype=torch.float64)
    G, r = A @ A.transpose(1, 2), torch.randn(16, 6, generator=gen, dtype=torch.float64)
    assert torch.equal(gram_pinv_apply(G, r, RCOND), gram_pinv_apply(G.clone(), r.clone(), RCOND))
