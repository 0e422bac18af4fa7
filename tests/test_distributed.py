"""Data parallelism: beta's sums cover the whole model, not one rank's shard (SPEC.md section 3).

Two processes on CPU with the gloo backend (localhost only), started once for the whole module. Each
case runs 5 steps and must give the betas and the parameters of a single-process run on the full
model (float32 tolerance):
- hand-sharded parameters (each rank holds a dim-0 slice of every tensor) with process_group=;
- the same with one param group's tensors whole on the last rank and absent from the other (the
  global and group scopes: the reduced sums must stay aligned by scope, NOTE [sums by scope]);
- FSDP2 fully_shard (DTensor parameters; the group comes from the mesh);
- DDP (whole parameters on every rank, gradients averaged: nothing to reduce);
- torch's ZeroRedundancyOptimizer over DDP (each rank steps whole tensors: the global and group
  scopes reduce over process_group=, the tensor scope needs nothing; ZeRO hands every group all the
  arguments, and with two groups leaves rank 0 none of the second's tensors);
each on every backend that runs on CPU here: "torch", "cpu" (the extension), "triton" (in Triton's
interpreter, set up in the workers), "cuda_sim" (the CUDA backend's code on the CUDA-on-CPU simulator,
tests/_cuda_sim.py: its split step around the all_reduce) and "auto". A backend a worker cannot run
is skipped. Where a GPU is present, the hand-sharded cases also run with the parameters on it, on the
"cuda" and "triton" backends: both ranks share the one GPU and gloo all-reduces the CUDA sums tensor
(NCCL refuses two ranks on one device; tests/_dist.py's one-rank NCCL group covers NCCL itself).
"""
import faulthandler
import functools
import importlib.util
import os
import socket
import sys
import tempfile
import time
import warnings

import _cuda_sim
import pytest
import torch
import torch.distributed as dist

from _helpers import coefficients, tolerance
from amm_kernels import RLLC, AMAdamW, AMSGD, available_backends

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")

STEPS = 5
WORKER_TIMEOUT_S = 600 if torch.cuda.is_available() else 300  # on a GPU: Triton compiles its kernels too
BACKENDS = ["torch", "auto", "cpu", "triton", "cuda_sim"]
GPU_BACKENDS = ["cuda", "triton"]  # hand-sharded cases with the parameters on the GPU, where there is one
SHAPES = [(6, 4), (5,), (3, 3), (1,)]  # (1,) leaves rank 1 an empty shard
CASES = {  # name: (optimizer class, constructor kwargs)
    "AMSGD": (AMSGD, dict(lr=0.05, weight_decay=1e-3)),
    "AMSGD-tensor": (AMSGD, dict(lr=0.05, beta_scope="tensor")),
    "AMSGD-loss": (AMSGD, dict(lr=0.05, delta_f="loss")),
    "AMAdamW": (AMAdamW, dict(lr=0.01)),
    "AMAdamW-group": (AMAdamW, dict(lr=0.01, beta_scope="group")),
    "RLLC": (RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0.5)")),
    "RLLC-tensor": (RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0)+J(0.5,2)", scope="tensor")),
    "RLLC-group": (RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0.5)", scope="group")),
}
# The cases run again with group 1's tensors whole on the last rank and absent from the others (as
# ZeroRedundancyOptimizer may leave a rank none of a group's tensors): the global and group scopes.
OWNED_CASES = ["AMSGD", "AMSGD-loss", "AMAdamW-group", "RLLC", "RLLC-group"]
# AMAdamW warns of tensors that join a shared scope late (NOTE [late tensors]); not in the tensor scope.
LATE_CASES = ["AMAdamW", "AMAdamW-group"]
MODEL_OPTS = {  # FSDP2 / DDP runs: class and kwargs
    "AMSGD": (AMSGD, dict(lr=0.05)),
    "AMAdamW": (AMAdamW, dict(lr=0.01)),
    "RLLC": (RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0.5)")),
    # two param groups (one per Linear), a beta per group: under ZeRO rank 0 holds none of group 1's
    # tensors (it gets the 8x16 weight, rank 1 the other three: ZeRO fills the emptiest rank first)
    "AMAdamW-group": (AMAdamW, dict(lr=0.01, beta_scope="group")),
    # a bfloat16 model with float32 state (state_dtype; RLLC's memory is a DTensor of its own under FSDP2)
    "AMAdamW-bf16": (AMAdamW, dict(lr=0.01, state_dtype=torch.float32)),
    "RLLC-bf16": (RLLC, dict(lr=0.05, law_lr=0.05, memory="M(0.9)+M(0.5)", state_dtype=torch.float32)),
}


# --------------------------------------------------------------------------------------------------
# the runs (the same code runs single-process, world = 1, and on each rank)
def full_params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def full_grads(step):
    """A gradient that flips sign every step, plus noise: beta moves off its clamp (beta_max)."""
    base = [torch.randn(s, generator=torch.Generator().manual_seed(7)) for s in SHAPES]
    gen = torch.Generator().manual_seed(100 + step)
    return [(-1) ** step * b + 0.3 * torch.randn(s, generator=gen) for b, s in zip(base, SHAPES)]


def shard(t, rank, world):
    return torch.tensor_split(t, world, dim=0)[rank].clone()


def run_late_join(name, backend, rank=0, world=2, group=None, device="cpu"):
    """Every tensor sliced across the ranks; the first rank's slices get no gradient at steps 0 and 1,
    so they get their state at step 2, after their scope stepped on the other rank. Returns the steps
    at which this rank warned of tensors joining late (NOTE [late tensors, sharded] in _base.py)."""
    cls, kwargs = CASES[name]
    params = [shard(t, rank, world).to(device).requires_grad_() for t in full_params()]
    groups = [dict(params=params[:2]), dict(params=params[2:], lr=kwargs["lr"] * 0.5)]
    opt = cls(groups, backend=backend, process_group=group, **kwargs)
    warned = []
    for t in range(STEPS):
        grads = full_grads(t)
        for p, g in zip(params, grads):
            p.grad = None if (rank == 0 and t < 2) else shard(g, rank, world).to(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if any("first gradient" in str(w.message) for w in caught):
            warned.append(t)
    return warned


def run_hand_sharded(name, backend, rank=0, world=1, group=None, device="cpu", layout="sharded"):
    """Each rank holds a dim-0 slice of every tensor ("sharded"); or group 1's tensors (2 and 3) whole
    on the last rank and none of them on the others ("owned"); or every tensor whole on the last rank,
    the others holding only a frozen tensor that never gets a gradient ("idle": a rank that steps
    with no gradient; the one process of world = 1 holds it too); or tensors 0 and 1 whole on the
    first rank, 2 and 3 on the last, and 0 and 1 without a gradient at step 2 ("gap": the first rank
    sits one step out, then steps again); or every tensor whole on the last rank and no tensor at all on
    the others ("empty": as ZeroRedundancyOptimizer leaves a rank when there are more ranks than
    tensors); or sharded, with a GradScaler-like found_inf on every step
    that is 1 at step 2 on the first rank only ("inf": one rank's inf skips the step everywhere, as
    one process skips it). Returns the betas (or laws) of the 5 steps and the rank's tensors (None
    for one it does not hold)."""
    cls, kwargs = CASES[name]
    last = rank == world - 1

    def whole(i):
        return layout in ("idle", "gap", "empty") or (layout == "owned" and i >= 2)

    def local(t, i):  # this rank's part of tensor i
        return (t.clone() if whole(i) else shard(t, rank, world)).to(device)

    def holds(i):
        if layout == "gap":
            return (rank == 0) if i < 2 else last
        return last or not whole(i)

    held = [i for i in range(len(SHAPES)) if holds(i)]
    full = full_params()
    params = {i: local(full[i], i).requires_grad_() for i in held}
    frozen = [torch.ones(3, device=device, requires_grad=True)] if layout == "idle" and (world == 1 or not last) else []
    groups = [dict(params=[params[i] for i in held if i < 2] + frozen),
              dict(params=[params[i] for i in held if i >= 2], lr=kwargs["lr"] * 0.5)]
    opt = cls(groups, backend=backend, process_group=group, **kwargs)
    betas = []
    for t in range(STEPS):
        def closure(t=t):
            grads = full_grads(t)
            for i, p in params.items():
                p.grad = None if (layout == "gap" and t == 2 and i < 2) else local(grads[i], i)
            return torch.tensor(1.0 / (t + 1), device=device)  # the global loss: the same on every rank
        if layout == "inf":  # as torch.amp.GradScaler hands it to the step, from this rank's gradients
            opt.found_inf = torch.tensor(1.0 if (t == 2 and rank == 0) else 0.0, device=device)
        if kwargs.get("delta_f") == "loss":
            opt.step(closure)
        else:
            closure()
            opt.step()
        if layout == "inf":
            del opt.found_inf
        betas.append(coefficients(opt))
    return torch.stack(betas).cpu(), [params[i].detach().cpu() if i in params else None for i in range(len(SHAPES))]


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batch(step):
    gen = torch.Generator().manual_seed(200 + step)
    return torch.randn(8, 8, generator=gen), torch.randn(8, 3, generator=gen)


def train(model, opt, rank=0, world=1, steps=range(STEPS)):
    """5 steps on a batch of 8; each rank takes its half (its mean loss; DDP/FSDP average the grads)."""
    betas = []
    dtype = next(iter(model.parameters())).dtype
    for t in steps:
        x, y = (shard(u, rank, world).to(dtype) for u in batch(t))
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        betas.append(coefficients(opt))
    return torch.stack(betas)


def build_model(kind, cls_name, world, backend):
    """The model and its optimizer of run_model's `kind`."""
    cls, kwargs = MODEL_OPTS[cls_name]
    model = make_model()
    if cls_name.endswith("-bf16"):
        model = model.to(torch.bfloat16)
    layers = (model[0], model[2])
    if kind.startswith("fsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif kind in ("ddp", "zero"):
        model = torch.nn.parallel.DistributedDataParallel(model)
    params = model.parameters()
    if cls_name.endswith("-group"):
        # lists, not generators: ZeroRedundancyOptimizer reads a group's params twice
        params = [dict(params=list(layers[0].parameters())), dict(params=list(layers[1].parameters()), lr=kwargs["lr"] * 0.5)]
    if kind == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # AMAdamW: the tensor scope, nothing to reduce (and betas, lam repeated in every group by ZeRO);
        # AMSGD, RLLC: one global scope over tensors split between the ranks, so reduced over the world.
        # AMAdamW-group: a beta per group over tensors split between the ranks, reduced over the world.
        # ZeRO takes process_group= for itself: ours goes in through the class.
        local_scope = kwargs.get("beta_scope", "tensor" if cls is AMAdamW else "global")
        local_cls = cls if local_scope == "tensor" else functools.partial(cls, process_group=dist.group.WORLD)
        extra = dict(betas=(0.9, 0.999), lam=0.1) if cls is AMAdamW else {}
        opt = ZeroRedundancyOptimizer(params, optimizer_class=local_cls, backend=backend, **kwargs, **extra)
    else:
        opt = cls(params, backend=backend, **kwargs)
    return model, opt


def resumed_from_checkpoint(kind, cls_name, world, backend, model, opt, folder):
    """A fresh model and optimizer of `kind` loaded from a checkpoint of (model, opt), as each kind's
    users checkpoint: FSDP2 through torch.distributed.checkpoint (get_state_dict, dcp.save, dcp.load,
    set_state_dict), "fsdp-flat" with flatten_optimizer_state_dict=True (as torchtitan does);
    ZeroRedundancyOptimizer through consolidate_state_dict on rank 0, the whole dict handed to every
    rank (its load_state_dict takes each rank's share). NOTE [checkpoint carriers] in _checkpoint.py: none
    keeps more of an optimizer's state_dict than its "state" and "param_groups", and the flattened one
    only the keys the live optimizer has."""
    new_model, new_opt = build_model(kind, cls_name, world, backend)
    if kind.startswith("fsdp"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(flatten_optimizer_state_dict=kind == "fsdp-flat")
        saved_model, saved_optim = get_state_dict(model, opt, options=options)
        path = os.path.join(folder, f"dcp-{kind}-{cls_name}-{backend}")
        dcp.save({"model": saved_model, "optim": saved_optim}, checkpoint_id=path)
        # (DCP steps new_opt with zero grads first)
        template_model, template_optim = get_state_dict(new_model, new_opt, options=options)
        loaded = {"model": template_model, "optim": template_optim}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(new_model, new_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                       options=options)
    else:
        opt.consolidate_state_dict(to=0)
        whole = [opt.state_dict() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(whole, src=0)
        new_model.load_state_dict(model.state_dict())
        new_opt.load_state_dict(whole[0])
    return new_model, new_opt


def run_model(kind, cls_name, rank=0, world=1, backend="torch", resume_at=None, folder=None):
    """Five training steps of the model under `kind` ("single", "fsdp", "ddp", "zero"); with resume_at,
    the last ones by a fresh model and optimizer loaded from a checkpoint taken after step resume_at
    (resumed_from_checkpoint). Returns the betas, the full parameters, which param groups this rank
    steps and the dtypes of its optimizer state."""
    model, opt = build_model(kind, cls_name, world, backend)
    if resume_at is not None:
        first = train(model, opt, rank, world, range(resume_at))
        model, opt = resumed_from_checkpoint(kind, cls_name, world, backend, model, opt, folder)
        betas = torch.cat([first, train(model, opt, rank, world, range(resume_at, STEPS))])
    else:
        betas = train(model, opt, rank, world)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    local = getattr(opt, "optim", opt)
    held = [bool(g["params"]) for g in local.param_groups]  # the groups this rank steps
    state_dtypes = {str(getattr(t, "_local_tensor", t).dtype) for st in local.state.values() for t in st.values()}
    return betas, [p.detach().clone() for p in params], held, state_dtypes


RESUME_CASES = ["AMSGD", "AMAdamW", "RLLC", "AMAdamW-group"]  # checkpointed after step 3 (fsdp, zero)


def worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import in this process
    torch.set_num_threads(1)
    # A collective that never completes (ranks handing all_reduce different shapes: gloo then waits
    # past its own timeout) ends the worker with every thread's stack, and the test fails, instead of
    # hanging the run. The whole worker takes ~25 s on 2 idle cores (CPU cases only).
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True)
    _cuda_sim.register()  # built by the parent; where it cannot be, its cases skip
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        group = dist.new_group(list(range(world)))
        runnable = [b for b in BACKENDS if b == "auto" or b in available_backends("cpu")]
        for backend in runnable:
            for name in CASES:
                results[("hand", name, backend)] = run_hand_sharded(name, backend, rank, world, group)
            for name in CASES:
                results[("inf", name, backend)] = run_hand_sharded(name, backend, rank, world, group, layout="inf")
            for name in OWNED_CASES:
                for layout in ("owned", "idle", "gap", "empty"):
                    results[(layout, name, backend)] = run_hand_sharded(name, backend, rank, world, group, layout=layout)
            for name in LATE_CASES:
                results[("late", name, backend)] = run_late_join(name, backend, rank, world, group)
            for kind in ("fsdp", "fsdp-flat", "zero"):
                for cls_name in RESUME_CASES:
                    results[(f"{kind}-resumed", cls_name, backend)] = run_model(
                        kind, cls_name, rank, world, backend, resume_at=3, folder=os.path.dirname(out_path))
            for kind in ("fsdp", "ddp", "zero"):
                for cls_name in MODEL_OPTS:
                    results[(kind, cls_name, backend)] = run_model(kind, cls_name, rank, world, backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # both ranks: one GPU
            for backend in [b for b in GPU_BACKENDS if b in available_backends("cuda")]:
                for name in CASES:
                    results[("hand", name, f"{backend}@cuda")] = run_hand_sharded(name, backend, rank, world, group, "cuda")
                for name in LATE_CASES:
                    results[("late", name, f"{backend}@cuda")] = run_late_join(name, backend, rank, world, group, "cuda")
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()
    # NOTE [gloo teardown] (tests/test_examples.py): a rank that has finished may still abort or hang in
    # torch's C++ destructors at interpreter exit, after faulthandler's timer above is gone; the results
    # are saved, so the worker leaves without them (a failure above still raises, through mp's own path).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(out: str) -> None:
    """Runs worker() on two ranks, which saves every case's results on each rank at out."""
    import torch.multiprocessing as mp

    _cuda_sim.register()  # build the simulator library once, before the workers load it
    procs = mp.start_processes(worker, args=(2, free_port(), out), nprocs=2, join=False, start_method="spawn")
    # Bounded (NOTE [test watchdog] in tests/conftest.py): mp.spawn's join waits for ever on a rank that
    # neither finishes nor fails; each rank's own timer ends it after WORKER_TIMEOUT_S, this one backs it.
    deadline = time.monotonic() + WORKER_TIMEOUT_S + 120
    while not procs.join(timeout=5):  # raises, with the rank's error, when one fails
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
                proc.join(5)
            pytest.fail(f"the two ranks ran past {WORKER_TIMEOUT_S + 120} s; exit codes "
                        f"{[proc.exitcode for proc in procs.processes]}, results saved: {os.path.exists(out)}")


# NOTE [one spawn a run]: the module fixture below is set up by every pytest-xdist worker that runs a test
# of this module. Both did, concurrently: 109 s and 97 s of setup in CI's 13 minutes (2026-12-01). (The
# xdist_group mark does not keep a module on one worker with pytest 9: pytest-xdist 3.8 renames
# item._nodeid, which pytest 9 no longer reads.) So under xdist the first worker spawns the ranks and
# saves their results in the run's shared temporary folder, under a lock; another worker waits for the
# lock and reads them, or fails at once with the first one's error. The folder is named by the run's id
# (workers started elsewhere share a basetemp parent across runs), and each spawn works in a folder of its
# own: the ranks of a worker killed mid-spawn outlive it, and must not write where the next spawn does.
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every case on each of the two ranks (one spawn for the whole run)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.pt")
            spawn_ranks(out)
            return torch.load(out, weights_only=False)
    import fcntl

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "run")
    folder = tmp_path_factory.getbasetemp().parent / f"two_ranks-{run}"  # the workers' basetemps share this parent
    folder.mkdir(exist_ok=True)
    done, failed = folder / "done.txt", folder / "failed.txt"  # the results' path; the first spawn's error
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():
            pytest.fail(f"the two ranks failed in another worker: {failed.read_text()}")
        if not done.exists():
            out = os.path.join(tempfile.mkdtemp(dir=folder, prefix="spawn-"), "results.pt")
            try:
                spawn_ranks(out)
            except BaseException as e:
                failed.write_text(f"{os.environ['PYTEST_XDIST_WORKER']}: {type(e).__name__}: {e}"[:4000])
                raise
            done.write_text(out)
        out = done.read_text()
    return torch.load(out, weights_only=False)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def assert_model_close(cls_name, actual, expected):
    """assert_close; for the bfloat16 models, to bfloat16's tolerance (the ranks average bfloat16
    gradients, which a single process computes whole: they differ by bfloat16 rounding)."""
    if cls_name.endswith("-bf16"):
        rtol, atol = tolerance(torch.bfloat16)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)
    else:
        assert_close(actual, expected)


# --------------------------------------------------------------------------------------------------
def results_of(ranks, key):
    if key not in ranks[0]:
        where = "on the GPU (none here)" if key[-1].endswith("@cuda") else "on CPU"
        pytest.skip(f"backend {key[-1]!r} does not run {where} in the workers")
    return [r[key] for r in ranks]


@pytest.mark.parametrize("backend", BACKENDS + [f"{b}@cuda" for b in GPU_BACKENDS])
@pytest.mark.parametrize("name", list(CASES))
def test_hand_sharded_matches_single_process(ranks, name, backend):
    got = results_of(ranks, ("hand", name, backend))
    betas, params = run_hand_sharded(name, "torch")  # one process, the whole model, on the CPU
    for rank_betas, _ in got:
        assert_close(rank_betas, betas)  # every rank has the whole-model beta
    for i, full in enumerate(params):
        assert_close(torch.cat([rank_params[i] for _, rank_params in got]), full)
    assert not torch.all(betas[1:] == betas[0]), "beta / law should move: the test would not see a wrong reduction"


@pytest.mark.parametrize("layout", ["idle", "empty"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OWNED_CASES)
def test_a_rank_without_gradients_joins_the_reduce_and_the_others_match_single_process(ranks, name, backend, layout):
    """NOTE [a rank without gradients] (_base.py): rank 0 holds only a frozen tensor ("idle"), or no
    tensor at all ("empty", as ZeroRedundancyOptimizer leaves a rank); without it joining the
    all_reduce, the last rank would wait forever (the worker's timeout ends the run; an empty rank's
    step returned without it until bdd9ac8, and gloo aborted). Its beta and step counts follow the
    steps taken elsewhere (NOTE [scopes stepped elsewhere])."""
    got = results_of(ranks, (layout, name, backend))
    betas, params = run_hand_sharded(name, "torch", layout=layout)
    for rank_betas, _ in got:
        assert_close(rank_betas, betas)
    for i, full in enumerate(params):
        assert_close(got[-1][1][i], full)
        assert all(rank_params[i] is None for _, rank_params in got[:-1])
    assert not torch.all(betas[1:] == betas[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_an_inf_on_one_rank_skips_the_step_on_every_rank(ranks, name, backend):
    """found_inf is 1 on the first rank only at step 2 (a plain GradScaler sees its rank's gradients):
    it travels in the reduced vector (StepBatch.all_reduce_sums), so every rank skips that step, as
    one process with the inf would."""
    got = results_of(ranks, ("inf", name, backend))
    betas, params = run_hand_sharded(name, "torch", layout="inf")
    assert torch.equal(betas[2], betas[1]), "the single process skips step 2"
    for rank_betas, _ in got:
        assert_close(rank_betas, betas)
    for i, full in enumerate(params):
        assert_close(torch.cat([rank_params[i] for _, rank_params in got]), full)


@pytest.mark.parametrize("backend", BACKENDS + [f"{b}@cuda" for b in GPU_BACKENDS])
@pytest.mark.parametrize("name", LATE_CASES)
def test_a_rank_whose_tensors_join_late_warns(ranks, name, backend):
    """The first rank's tensors get their first gradient at step 2, after their scope stepped on the
    other rank: that rank warns (its own state alone could not tell it: NOTE [late tensors, sharded]); on
    the GPU the warning comes at a later step, when the count's copy has landed. So under the tensor scope
    ("AMAdamW"): each tensor's scope is shared by its shards, and the first rank's shards start from zero
    moments after their tensors' scopes stepped on the other rank."""
    (first, last) = results_of(ranks, ("late", name, backend))
    assert last == []
    if backend.endswith("@cuda"):
        assert len(first) == 1 and first[0] >= 2, first
    else:
        assert first == [2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OWNED_CASES)
def test_a_rank_that_sits_one_step_out_matches_single_process(ranks, name, backend):
    """Each tensor whole on one rank; the first rank's get no gradient at step 2. It counts that step
    and records its lr and beta as the last rank does (NOTE [scopes stepped elsewhere]), so when its
    tensors step again their terms are weighted and their scope counted as in one process."""
    got = results_of(ranks, ("gap", name, backend))
    betas, params = run_hand_sharded(name, "torch", layout="gap")
    for rank_betas, _ in got:
        assert_close(rank_betas, betas)
    for i, full in enumerate(params):
        owner = 0 if i < 2 else len(got) - 1
        assert_close(got[owner][1][i], full)
    assert not torch.all(betas[1:] == betas[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OWNED_CASES)
def test_a_rank_without_a_groups_tensors_matches_single_process(ranks, name, backend):
    """Group 1's tensors all on the last rank: the reduced sums stay aligned by scope (a rank adds
    zeros for a scope it holds no tensor of, NOTE [sums by scope]), every tensor ends as in one
    process, and every rank has every scope's beta, group 1's too (NOTE [scopes stepped elsewhere])."""
    got = results_of(ranks, ("owned", name, backend))
    betas, params = run_hand_sharded(name, "torch", layout="owned")
    for rank_betas, _ in got:
        assert_close(rank_betas, betas)
    for i, full in enumerate(params):
        held = [rank_params[i] for _, rank_params in got]
        assert_close(torch.cat(held) if i < 2 else held[-1], full)
        if i >= 2:
            assert all(t is None for t in held[:-1])
    assert not torch.all(betas[1:] == betas[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name", list(MODEL_OPTS))
@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_fsdp2_and_ddp_match_single_process(ranks, kind, cls_name, backend):
    got = results_of(ranks, (kind, cls_name, backend))
    betas, params, _, state_dtypes = run_model("single", cls_name)
    assert state_dtypes == ({"torch.float32"} if cls_name.endswith("-bf16") else {str(params[0].dtype)})
    for got_betas, got_params, _, got_dtypes in got:
        assert_model_close(cls_name, got_betas, betas)
        for a, b in zip(got_params, params):
            assert_model_close(cls_name, a, b)
        assert got_dtypes == state_dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name", RESUME_CASES)
@pytest.mark.parametrize("kind", ["fsdp", "fsdp-flat", "zero"])
def test_a_checkpoint_resumes_as_the_run_without_one(ranks, kind, cls_name, backend):
    """FSDP2 through torch.distributed.checkpoint (also with flatten_optimizer_state_dict=True),
    ZeroRedundancyOptimizer through its consolidated state_dict, each after step 3 into a fresh model
    and optimizer: the betas and parameters are the single process's (a lost step count or beta would change them: AMSGD's first-step rule, AMAdamW's
    bias corrections)."""
    got = results_of(ranks, (f"{kind}-resumed", cls_name, backend))
    betas, params, _, _ = run_model("single", cls_name)
    for got_betas, got_params, held, _ in got:
        if kind.startswith("fsdp"):
            assert_model_close(cls_name, got_betas, betas)
        elif cls_name != "AMAdamW":  # (under ZeRO AMAdamW's per-tensor betas are each rank's own tensors')
            # a rank that ZeRO left none of a group's tensors has no state to carry that group's step
            # count and lr through the checkpoint (README): its beta of that group is not compared
            if got_betas.dim() == 2:  # one beta per group
                cols = [i for i, h in enumerate(held) if h]
                got_betas, betas_held = got_betas[:, cols], betas[:, cols]
            else:
                betas_held = betas
            assert_model_close(cls_name, got_betas, betas_held)
        for a, b in zip(got_params, params):
            assert_model_close(cls_name, a, b)
    if kind == "zero" and cls_name == "AMAdamW-group":  # the case the comment above is about
        assert not all(all(held) for _, _, held, _ in got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_name", list(MODEL_OPTS))
def test_zero_redundancy_optimizer_matches_single_process(ranks, cls_name, backend):
    got = results_of(ranks, ("zero", cls_name, backend))
    betas, params, _, state_dtypes = run_model("single", cls_name)
    for got_betas, got_params, held, got_dtypes in got:
        if not cls_name.startswith("AMAdamW") or cls_name == "AMAdamW-group":
            # (AMAdamW's per-tensor betas are each rank's own tensors')
            assert_model_close(cls_name, got_betas, betas)  # a group's beta too on a rank without its tensors
        for a, b in zip(got_params, params):
            assert_model_close(cls_name, a, b)
        assert got_dtypes <= state_dtypes
    if cls_name.endswith("-group"):  # the case the test is for: ZeRO left a rank none of a group's tensors
        assert not all(all(held) for _, _, held, _ in got)


@pytest.mark.parametrize("name", ["AMSGD", "AMAdamW", "RLLC"])
def test_sharded_beta_differs_from_a_local_beta(name):
    """Guard: without the reduction a shard's beta is not the model's (so the tests above can fail)."""
    full_betas, _ = run_hand_sharded(name, "torch")
    local_betas, _ = run_hand_sharded(name, "torch", rank=0, world=2, group=None)
    assert not torch.allclose(full_betas[1:], local_betas[1:], rtol=1e-4, atol=1e-5)


LATE_DTENSOR = """
import sys
import torch
import amm_kernels
from amm_kernels import RLLC, AMAdamW, AMSGD
assert "torch.distributed.tensor" not in sys.modules, "import amm_kernels loaded torch.distributed.tensor"
import torch.distributed as dist
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
mesh = init_device_mesh("cpu", (1,))
for cls in (AMSGD, AMAdamW, RLLC):
    gen = torch.Generator().manual_seed(0)
    x, grads = torch.randn(6, 5, generator=gen), [torch.randn(6, 5, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(distribute_tensor(x.clone(), mesh, [Shard(0)]))
    q = torch.nn.Parameter(x.clone())
    sharded, plain = cls([p], lr=0.1, backend="torch"), cls([q], lr=0.1, backend="torch")
    assert sharded._reduce_group([p]) is not None and plain._reduce_group([q]) is None, cls.__name__
    for g in grads:
        p.grad, q.grad = distribute_tensor(g, mesh, [Shard(0)]), g.clone()
        sharded.step()
        plain.step()
    assert torch.equal(p.to_local(), q.detach()), cls.__name__
    if cls is RLLC:
        assert isinstance(sharded.state[p]["memory"], DTensor)
dist.destroy_process_group()
print("ok")
"""


def test_import_leaves_dtensor_unloaded_and_a_dtensor_made_later_is_one(tmp_path):
    """NOTE [DTensor, looked up where loaded] (amm_kernels/_step.py): `import amm_kernels` does not import
    torch.distributed.tensor (~0.6 s, nearly all of the package's import time), and DTensor parameters
    made after it, with that module imported later, are still seen as sharded: each optimizer reduces
    over their mesh's group, RLLC's memory is a DTensor, and one rank's sharded run is the plain one.
    In a fresh interpreter: this one has long imported the module."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", LATE_DTENSOR], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]
