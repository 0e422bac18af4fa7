"""Shared helpers of the conformance tests: where the SPEC.md vectors live, and the tolerances."""

import json
import os
from pathlib import Path

import numpy as np

# The one tolerance table: (rtol, atol) by parameter dtype name. The vectors' parameters are O(1).
TOLERANCES = {
    "float64": (1e-10, 0.0),
    "float32": (1e-5, 1e-6),
    "bfloat16": (2e-2, 2e-2),
    "float16": (5e-3, 5e-3),
}


def scaled_atol(atol, *tensors):
    """atol for comparing a whole state tensor after several steps: the table's atol times
    max(1, the largest |value| among `tensors` (the reference result and the gradients that made it)).
    A kernel's beta differs from the reference's by a few float32 ulps (its float32 partial sums are
    added in another order), and an element formed as beta * d + (1 - beta) * g then differs by about
    ulp * |d - g|, however small the element itself is (alternating gradients give a small d and a
    large g)."""
    scale = max([1.0] + [float(t.detach().abs().max()) for t in tensors if t.numel()])
    return atol * scale


def tolerance(dtype):
    """(rtol, atol) for a torch dtype, a NumPy dtype or a dtype name such as "float32"."""
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in TOLERANCES:
        name = np.dtype(dtype).name
    return TOLERANCES[name]


def vectors_dir():
    """/work/shared/vectors (the repo is /work/main), or $AMM_VECTORS_DIR."""
    env = os.environ.get("AMM_VECTORS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "vectors"


class MissingVectors(Exception):
    pass


def vector_files(prefix="am"):
    """The vector files named ``{prefix}*.json``, sorted; MissingVectors if there are none."""
    folder = vectors_dir()
    if not folder.is_dir():
        raise MissingVectors(
            f"conformance vectors folder {folder} does not exist; set AMM_VECTORS_DIR to the folder "
            "holding SPEC.md's vectors (amsgd_*.json, amadamw_*.json)"
        )
    files = sorted(folder.glob(f"{prefix}*.json"))
    if not files:
        raise MissingVectors(f"no {prefix}*.json conformance vectors in {folder}")
    return files


def vector_params(prefix="am"):
    """pytest parameters: one per vector file, or a single one that fails when the folder is missing
    (an empty parametrization would only skip, and a missing oracle must not pass silently)."""
    import pytest

    try:
        return [pytest.param(f, id=f.stem) for f in vector_files(prefix)]
    except MissingVectors as exc:
        return [pytest.param(exc, id="vectors-missing")]


def load_vector(path_or_error):
    """The JSON of one vector file; fails the test with the reason when the vectors are missing."""
    if isinstance(path_or_error, Exception):
        import pytest

        pytest.fail(str(path_or_error), pytrace=False)
    with open(path_or_error) as fh:
        return json.load(fh)


def vector_spec_kwargs(vec):
    """Constructor keyword arguments (API names) of a vector's optimizer, less lr and weight decay."""
    h = vec["hyper"]
    if vec["optimizer"] == "AMSGD":
        return dict(lam=h["lam"], beta_max=h["beta_max"], beta_min=h["beta_min"],
                    delta_f=h.get("delta_f", "first_order"), beta_scope=h["beta_scope"])
    if vec["optimizer"] == "AMAdamW":
        return dict(lam=h["lam"], betas=(h["beta_max"], h["beta2"]), eps=h["eps"],
                    beta_min=h["beta_min"], beta_scope=h["beta_scope"])
    raise ValueError(f"not an AM optimizer: {vec['optimizer']}")


def vector_initial_params(vec):
    """[[np.ndarray float64 of its shape, ...] per group]."""
    out = []
    for group in vec["groups"]:
        shapes = group.get("shapes") or [[len(p)] for p in group["params"]]
        out.append([np.asarray(p, dtype=np.float64).reshape(s) for p, s in zip(group["params"], shapes)])
    return out


# --------------------------------------------------------------------------------------------------
# optimizer state helpers shared by the behaviour tests (test_optimizer_api.py, test_rllc.py, ...)
def model_params(seed=0, dtype=None):
    """Four parameters of mixed shapes, one of them empty."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in [(4, 3), (7,), (1,), (0,)]]


def set_grads(params, seed):
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def snapshot(opt, params):
    """The parameters and a deep copy of the optimizer's state_dict (torch shares tensors otherwise)."""
    import copy

    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_same_state(a, b):
    """Two snapshots are bit-identical: parameters, per-parameter state and the scope state."""
    import torch

    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert sa["state"].keys() == sb["state"].keys()
    for key in sa["state"]:
        for name, t in sa["state"][key].items():
            assert torch.equal(t, sb["state"][key][name]), name
    if sa["amm"]["scopes"] is not None:
        for name, t in sa["amm"]["scopes"].items():
            assert torch.equal(t, sb["amm"]["scopes"][name]), name
