"""Shared helpers of the conformance tests: where the SPEC.md vectors live, and the tolerances."""

import inspect
import json
import os
from pathlib import Path

import numpy as np

# The one tolerance table: (rtol, atol) by parameter dtype name. The vectors' parameters are O(1).
# float32's rtol is 1e-5 (~80 ulps), not 1e-6: at 1e-6 the kernel-vs-reference comparisons of
# parameters, states and beta all pass, but beta_prod (a product over steps, 4.7e-6 apart) and loss
# mode's beta against the float64 spec (F = prev_loss - loss cancels in the float32 losses: 3e-6) do not.
TOLERANCES = {
    "float64": (1e-10, 0.0),
    "float32": (1e-5, 1e-6),
    "bfloat16": (1e-2, 1e-2),
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


def state_atol(name, atol, state, *tensors):
    """atol for state tensor `name` after several steps. AMAdamW's second moment (exp_avg_sq) does not
    depend on beta: its atol is scaled by its own largest value alone (no floor of 1: its elements are
    ~1e-4 to 0.1, and the table's atol would cover a 5% error in most of them); the others' as
    scaled_atol."""
    import torch

    if name == "exp_avg_sq":
        finite = state.detach().abs()[torch.isfinite(state)]  # (a non-finite element is compared as such)
        return atol * (float(finite.max()) if finite.numel() else 0.0)
    return scaled_atol(atol, state, *tensors)


def dtype_of(dtype, k):
    """The k-th parameter's dtype: `dtype`, or of a tuple of dtypes (a step of several) the (k mod n)-th."""
    return dtype[k % len(dtype)] if isinstance(dtype, tuple) else dtype


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
def coefficients(opt):
    """What a step's sums decide, as a copy: beta (AMSGD, AMAdamW) or the learning law (RLLC); under
    ZeroRedundancyOptimizer, its rank's optimizer's."""
    from amm_kernels import RLLC

    opt = getattr(opt, "optim", opt)
    return (opt.law if isinstance(opt, RLLC) else opt.beta).clone()


def model_params(seed=0, dtype=None, device="cpu"):
    """Four parameters of mixed shapes, one of them empty."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in [(4, 3), (7,), (1,), (0,)]]


def set_grads(params, seed):
    """Seeded gradients, drawn on the CPU (the same numbers on every device) and put on each p's device."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)


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


def take_steps(opt, params, steps):
    """One opt.step() per seed in `steps`, each on set_grads(params, seed)."""
    for s in steps:
        set_grads(params, s)
        opt.step()


def stepped_once(make_opt, dtype=None):
    """model_params(dtype=dtype) and make_opt(params) after one step on set_grads(params, 0), with the
    gradients set_grads(params, 1) already in place for the next step."""
    params = model_params(dtype=dtype)
    opt = make_opt(params)
    take_steps(opt, params, [0])
    set_grads(params, 1)
    return params, opt


# --------------------------------------------------------------------------------------------------
# behaviour checks shared by AMSGD/AMAdamW (test_optimizer_api.py) and RLLC (test_rllc.py): each takes
# make_opt(params, **kwargs), the optimizer under test with its test's arguments, and returns what the
# caller checks further
def check_a_reset_tensor_restarts_its_scope(make_opt, how, device="cpu"):
    """NOTE [a reset tensor restarts its scope]: make_opt(params) under the tensor scope, adaptive. After 6
    steps one tensor's state is reset (how: "del" opt.state[p]; "clear", opt.state.clear(), then each
    other tensor's entry is put back as it was). From there that tensor moves as it would under a new
    optimizer holding it alone, from where it stands, and the others as if nothing had happened."""
    import torch

    params = model_params(device=device)
    control = [p.detach().clone().requires_grad_() for p in params]
    opt, opt_control = make_opt(params), make_opt(control)
    take_steps(opt, params, range(6))
    take_steps(opt_control, control, range(6))
    k = 2
    alone = params[k].detach().clone().requires_grad_()
    opt_alone = make_opt([alone])
    if how == "del":
        del opt.state[params[k]]
    else:
        kept = {p: opt.state[p] for p in params if p is not params[k]}
        opt.state.clear()
        opt.state.update(kept)
    for seed in range(6, 10):
        set_grads(params, seed)
        set_grads(control, seed)
        alone.grad = params[k].grad.clone()
        opt.step(), opt_control.step(), opt_alone.step()
    torch.testing.assert_close(params[k], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(control[k], alone)  # (the reset changed that tensor's course)
    for i, (p, q) in enumerate(zip(params, control)):
        if i != k:
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def check_groups_rearranged_by_hand(make_opt, how):
    """NOTE [tensor scopes follow their tensors]: the rows kept per param group (prev_lr, a group scope's step
    and beta) follow their group when groups are removed ("remove": the first one, and its tensors' state)
    or reordered ("reverse") by hand, or a group's dict is replaced by a copy ("copy"; "copy-fewer": without
    one of its tensors), as torch.optim's state follows its tensors. make_opt(groups) builds
    the optimizer under test; three groups of different lr take 4 steps, are rearranged, and take 4 more
    (a copy and state_dict taken in between see them where they are). The run must be the one of an
    optimizer that held them so from the start ("remove": groups B and C only; else as they were).
    Before, the rows stayed by position: B took A's step count, beta and prev_lr."""
    import copy

    import torch

    def groups(params):
        return [{"params": params[0:3], "lr": 0.05}, {"params": params[3:6], "lr": 0.02},
                {"params": params[6:], "lr": 0.01}]

    params = model_params(0) + model_params(1)
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = make_opt(groups(params))
    opt_twin = make_opt(groups(twin)[1:] if how == "remove" else groups(twin))
    take_steps(opt, params, range(4))
    take_steps(opt_twin, twin, range(4))
    if how == "remove":
        for p in opt.param_groups[0]["params"]:
            opt.state.pop(p, None)
        del opt.param_groups[0]
        params, twin = params[3:], twin[3:]
    elif how == "copy":
        opt.param_groups[1] = dict(opt.param_groups[1])
    elif how == "copy-fewer":  # a copy with one tensor taken out, against the same taken out in place
        opt.state.pop(opt.param_groups[1]["params"][-1])  # (torch.optim's state_dict wants no entry without
        opt_twin.state.pop(opt_twin.param_groups[1]["params"][-1])  # its tensor in param_groups)
        opt.param_groups[1] = {**opt.param_groups[1], "params": opt.param_groups[1]["params"][:-1]}
        opt_twin.param_groups[1]["params"] = opt_twin.param_groups[1]["params"][:-1]
    else:
        opt.param_groups.reverse()
    copied = copy.deepcopy(opt)
    saved = copy.deepcopy(opt.state_dict())
    # the rows themselves, where they are now (a beta at its clamp would hide a row in the wrong place)
    twin_lrs = [g["lr"] for g in opt_twin.param_groups]
    twin_of = {id(p): q for p, q in zip(params, twin)}
    twin_order = [id(q) for g in opt_twin.param_groups for q in g["params"]]
    rows_of = {"group": [twin_lrs.index(g["lr"]) for g in opt.param_groups],  # (each group's lr is its own)
               "tensor": [twin_order.index(id(twin_of[id(p)])) for g in opt.param_groups for p in g["params"]]}
    mine, theirs = saved["amm"]["scopes"], opt_twin.state_dict()["amm"]["scopes"]
    scope = saved["amm"].get("beta_scope", saved["amm"].get("scope"))  # (RLLC saves it as "scope")
    for name, rows in theirs.items():
        if name == "prev_lr":
            rows = rows[rows_of["group"]]
        elif name != "prev_loss" and scope in rows_of:
            rows = rows[rows_of[scope]]
        torch.testing.assert_close(mine[name], rows, rtol=1e-6, atol=0, msg=name)
    loaded = make_opt([{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]}
                       for g in opt.param_groups])
    loaded.load_state_dict(saved)
    copied_params = [p for g in copied.param_groups for p in g["params"]]
    loaded_params = [p for g in loaded.param_groups for p in g["params"]]
    order = [p for g in opt.param_groups for p in g["params"]]
    for seed in range(4, 8):
        set_grads(params, seed)
        set_grads(twin, seed)
        for mine, theirs in ((copied_params, order), (loaded_params, order)):
            for a, b in zip(mine, theirs):
                a.grad = b.grad.clone()
        opt.step(), opt_twin.step(), copied.step(), loaded.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for other in (copied_params, loaded_params):
        for a, b in zip(other, order):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def check_sparse_gradient_raises_before_any_state_changes(make_opt):
    import pytest

    params, opt = stepped_once(make_opt)
    before = snapshot(opt, params)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_same_state(before, snapshot(opt, params))


def check_float64_grads_are_read_as_float32(make_opt, dtype=None, steps=3, device="cpu"):
    """Gradients in float64 (a dtype no kernel reads) on float32 / bfloat16 parameters: every backend
    reads them as float32, so the run is bit-identical to one given the float32-rounded gradients."""
    import pytest
    import torch

    if not hasattr(torch.Tensor, "grad_dtype"):  # (torch 2.10): before it, torch refuses such a gradient
        pytest.skip(f"torch {torch.__version__} refuses a gradient whose dtype differs from its parameter's")
    runs = []
    for grad_dtype in (torch.float64, torch.float32):
        params = model_params(dtype=dtype, device=device)
        opt = make_opt(params)
        for seed in range(steps):
            gen = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad_dtype = grad_dtype  # lets a gradient's dtype differ from its parameter's
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=grad_dtype)
            opt.step()
        runs.append(snapshot(opt, params))
    assert_same_state(*runs)


def check_exp_avg_sq_alone_is_cast(make_opt, dtype, device="cpu"):
    """AMAdamW's exp_avg_sq alone put in place by hand in another dtype (`dtype`) than its parameter's
    state has is cast at the next step (_match_state_dtypes), as exp_avg would be: the run is the one
    whose exp_avg_sq was cast back by hand, to the bit. Before, only exp_avg's dtype was looked at: the
    reference went on computing in float16 / float64, cpu refused the step, triton took float16 and
    failed on float64 (a KeyError)."""
    import torch

    def run(cast_back):
        params = model_params(device=device)
        opt = make_opt(params)
        take_steps(opt, params, [0])
        for p in params:
            other = opt.state[p]["exp_avg_sq"].to(dtype)
            opt.state[p]["exp_avg_sq"] = other.float() if cast_back else other
        take_steps(opt, params, [1, 2])
        assert all(st["exp_avg_sq"].dtype == torch.float32 for st in opt.state.values())
        return snapshot(opt, params)

    assert_same_state(run(cast_back=False), run(cast_back=True))


def step_on_a_nan_gradient(make_opt):
    """stepped_once, then a step with a NaN in the first gradient, which must reach the parameter;
    returns (params, opt)."""
    import torch

    params, opt = stepped_once(make_opt)
    params[0].grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(params[0]).any()
    return params, opt


def resume_from_state_dict(build, dtype=None):
    """Eight steps straight through, and four steps, a torch.save/torch.load of the state_dict into a
    fresh build(params) and four more: the two runs must be bit-identical. Returns (ref, resumed)."""
    import io

    import torch

    ref_params = model_params(dtype=dtype)
    ref = build(ref_params)
    take_steps(ref, ref_params, range(8))

    params = model_params(dtype=dtype)
    opt = build(params)
    take_steps(opt, params, range(4))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = build(resumed_params)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    take_steps(resumed, resumed_params, range(4, 8))
    assert_same_state(snapshot(ref, ref_params), snapshot(resumed, resumed_params))
    return ref, resumed


def check_found_inf_skips_the_step(make_opt):
    """A step with found_inf = 1 (and an inf gradient) changes no state; with found_inf = 0 a step on
    gradients scaled by grad_scale equals an unscaled step of a twin. Returns (opt, twin)."""
    import copy

    import torch

    params = model_params()
    opt = make_opt(params)
    take_steps(opt, params, range(3))
    before = snapshot(opt, params)
    set_grads(params, 9)
    params[0].grad[0, 0] = float("inf")
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
    opt.step()
    assert_same_state(before, snapshot(opt, params))
    # and with found_inf = 0 the scaled step equals an unscaled one
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = make_opt(twin_params)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads(params, 10)
    set_grads(twin_params, 10)
    for p in params:
        p.grad *= 1024.0
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    twin.step()
    for a, b in zip(params, twin_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return opt, twin


def check_inf_parameter_without_decay(cls, backend, device="cpu"):
    """x enters beta only through weight-decay terms (AMSGD's coupled L2, AMAdamW's mu x and
    mu <d - g, x>: NOTE [x in pass 1] in amadamw_reference.py), so in a group without decay an inf
    parameter leaves beta, the state and the other parameters finite and equal to the reference's
    (the kernels do not even read x in pass 1 there)."""
    import torch

    def run(name, weight_decay):
        params = [p.detach().to(device).requires_grad_() for p in model_params()]
        with torch.no_grad():
            params[0][1, 2] = float("inf")
        opt = cls(params, backend=name, weight_decay=weight_decay)
        betas = []
        for seed in range(4):
            set_grads(params, seed)
            opt.step()
            betas.append(opt.beta.detach().cpu().clone())
        state = [t.cpu() for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
        return betas, [p.detach().cpu().clone() for p in params], state

    betas, params, state = run(backend, 0.0)
    ref_betas, ref_params, ref_state = run("torch", 0.0)
    assert all(torch.isfinite(b).all() for b in betas)
    for a, b in zip(betas + params + state, ref_betas + ref_params + ref_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isinf(params[0][1, 2]) and torch.isfinite(params[0]).sum() == params[0].numel() - 1
    assert all(torch.isfinite(t).all() for t in state)
    # With decay x does enter beta: the reference then gives NaN (so this check tells the two apart).
    # (The inf parameter is tensor 0: its scope is the first, under every beta scope.)
    assert torch.isnan(run("torch", 0.01)[0][-1].reshape(-1)[0])


def check_signed_zeros_as_the_reference(cls, backend, device="cpu"):
    """Zeros keep their sign as in the reference (and torch.optim): without weight decay the effective
    gradient is the gradient itself (not g + 0 * x, which turns -0 into +0), with maximize its negation
    (RLLC has no maximize)."""
    import torch

    def run(name, maximize):
        x = torch.tensor([-0.0, 0.0, 1.0, -0.0, 2.0, 0.0, -0.0, 3.0], device=device, requires_grad=True)
        grad = torch.tensor([-0.0, -0.0, -0.0, 0.0, 1.0, 0.0, 0.0, -0.0], device=device)
        opt = cls([x], lr=0.1, backend=name, **({"maximize": True} if maximize else {}))
        for _ in range(2):
            x.grad = grad.clone()
            opt.step()
        return [x.detach().cpu()] + [t.cpu() for t in opt.state[x].values() if torch.is_tensor(t)]

    for maximize in (False, True) if "maximize" in inspect.signature(cls).parameters else (False,):
        ours, ref = run(backend, maximize), run("torch", maximize)
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            zero = b == 0
            assert torch.equal(a[zero].signbit(), b[zero].signbit()), f"maximize={maximize}: {a} where {b}"


def check_grad_scaler_skips_inf_steps(make_opt, good_steps):
    """`good_steps` GradScaler steps on a Linear model, then one with an inf loss: it changes no state
    and halves the scale."""
    import torch

    model = torch.nn.Linear(5, 3)
    opt = make_opt(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(16, 5)
    for _ in range(good_steps):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    before = snapshot(opt, list(model.parameters()))
    opt.zero_grad()
    scaler.scale(model(x).square().mean() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert_same_state(before, snapshot(opt, list(model.parameters())))
    assert scaler.get_scale() == 2.0**7


def check_scheduler_closure_and_add_param_group(make_opt):
    """A small MLP trained through step(closure) under StepLR, with its last layer added as a param
    group after three steps: the lr decays, the loss falls, the new layer gets state. Returns (model, opt)."""
    import pytest
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = make_opt(model[0].parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = []
    for _ in range(3):
        losses.append(opt.step(closure).item())
        sched.step()
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.02})
    for _ in range(5):
        losses.append(opt.step(closure).item())
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert model[2].weight in opt.state
    return model, opt


def check_low_precision_params_keep_dtype(make_opt, dtype, steps):
    """`steps` steps on model_params(dtype=dtype): the parameters keep their dtype and stay finite.
    Returns (params, opt)."""
    import torch

    params = model_params(dtype=dtype)
    opt = make_opt(params)
    take_steps(opt, params, range(steps))
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p).all()
    return params, opt


# --------------------------------------------------------------------------------------------------
# replaying a conformance vector through the package (test_vectors.py, test_rllc.py)
def vector_tensors(vec, dtype, device):
    """The vector's initial parameters as tensors: [[tensor, ...] per group]."""
    import torch

    return [[torch.tensor(x, dtype=dtype, device=device) for x in group] for group in vector_initial_params(vec)]


def set_vector_grads(params, rec, dtype, device):
    """The gradients of one step record, in the parameters' shapes."""
    import torch

    for ps, gs in zip(params, rec["grads"]):
        for p, g in zip(ps, gs):
            p.grad = torch.tensor(g, dtype=dtype, device=device).reshape(p.shape)


def assert_params_after(params, rec, dtype, rtol, atol, where):
    """Every parameter has `dtype` and matches the step record's params_after."""
    import torch

    for gi, group in enumerate(rec["params_after"]):
        for ti, expected in enumerate(group):
            p = params[gi][ti]
            assert p.dtype == dtype
            np.testing.assert_allclose(p.detach().cpu().to(torch.float64).reshape(-1).numpy(), expected,
                                       rtol=rtol, atol=atol, err_msg=f"{where}: param [{gi}][{ti}]")
