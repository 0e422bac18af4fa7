"""PyTorch Lightning with the optimizers (README, "PyTorch Lightning"). A Trainer's automatic optimization
calls step(closure), clips inside the closure, saves and restores the optimizer's state in its own
checkpoints, and with a GradScaler calls step() through scaler.step(). Each test runs a Trainer on the CPU
and the same batches in a plain loop, and asks for the same parameters bit for bit. Skipped when lightning
is not installed."""
import functools
import importlib.metadata
import importlib.util
import logging
import warnings

import pytest
import torch

from _helpers import coefficients
from amm_kernels import RLLC, AMAdamW, AMSGD

if importlib.util.find_spec("lightning") is None:
    pytest.skip("lightning is not installed", allow_module_level=True)
if tuple(int(x) for x in importlib.metadata.version("lightning").split(".")[:2]) < (2, 1):
    pytest.skip("lightning older than 2.1 (no MixedPrecision plugin)", allow_module_level=True)

OPTIMIZERS = {
    "AMAdamW": lambda params: AMAdamW(params, lr=1e-2, weight_decay=0.01),
    "AMSGD": lambda params: AMSGD(params, lr=0.1),
    "AMSGD-loss": lambda params: AMSGD(params, lr=0.1, delta_f="loss"),  # reads the losses the closure returns
    "RLLC": lambda params: RLLC(params, lr=1e-2),
}
BATCH, N = 8, 64
# The gradient norms here are 0.7-2.6 (float16 with a scaler: 0.9-2.5), so the clip engages on most steps
# (_plain_loop checks that it does) and AMSGD's loss-mode beta still moves between its bounds.
CLIP = 1.0
TRAINER = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False)


@pytest.fixture(autouse=True)
def _quiet():
    """Lightning's notes on this tiny setup (few workers for the loader, no GPU used) are not under test.
    Imported first: lightning's import sets its logger's level."""
    _lightning()
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        logger.setLevel(level)


def _data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 8, generator=gen), torch.randn(N, 1, generator=gen)
    return x, y


def _loader():
    x, y = _data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(N)), batch_size=BATCH)


@functools.cache
def _lightning():
    """lightning, its MixedPrecision plugin and the test's module class, imported at the first test, not
    at collection: lightning imports triton, which the Triton test modules must import first, in interpreter
    mode (NOTE [import order] in amm_kernels/triton_backend.py; tests/_triton.py)."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Model(L.LightningModule):
        """A small MLP; `seen` records the first row of every batch a training step gets, so that the plain loop
        can replay the Trainer's exact sequence (a resumed fit repeats a batch: see test_resumed_fit...)."""

        def __init__(self, name, seen, clip_in_hook=None):
            super().__init__()
            with torch.random.fork_rng(devices=[]):  # the same weights every time, the global RNG untouched
                torch.manual_seed(1)
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.name, self.seen, self.clip_in_hook = name, seen, clip_in_hook

        def training_step(self, batch, batch_idx):
            x, y, rows = batch
            self.seen.append(int(rows[0]))
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return OPTIMIZERS[self.name](self.parameters())

        def on_before_optimizer_step(self, optimizer):
            # README's recipe for clipping under mixed precision, where Lightning refuses gradient_clip_val
            if self.clip_in_hook is not None:
                scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # None without a GradScaler
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip_in_hook)

    return L, MixedPrecision, Model


def Model(*args, **kwargs):  # noqa: N802 - stands for the class above
    return _lightning()[2](*args, **kwargs)


def _trainer(max_steps, scaler=None, **kwargs):
    """A CPU Trainer; with a GradScaler, in Lightning's "16-mixed" plugin as it makes one on a GPU."""
    L, MixedPrecision, _ = _lightning()
    if scaler is not None:
        kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    return L.Trainer(max_steps=max_steps, **TRAINER, **kwargs)


def _plain_loop(name, seen, clip=None, scaler=None, autocast=None):
    """The batches `seen` (first rows), stepped without Lightning: step(closure), the forward under autocast
    to that dtype if given, or the GradScaler recipe (autocast float16, scale, unscale and clip if asked,
    scaler.step) with a scaler. With a clip, asks that it engaged on at least half of the steps it could."""
    model = Model(name, [])
    norms = []
    opt = model.configure_optimizers()
    x_all, y_all = _data()
    for row in seen:
        x, y = x_all[row:row + BATCH], y_all[row:row + BATCH]
        if scaler is None:
            def closure():
                opt.zero_grad()
                with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                    loss = torch.nn.functional.mse_loss(model.net(x), y)
                loss.backward()
                if clip is not None:
                    norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
                return loss
            opt.step(closure)
        else:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model.net(x), y)
            scaler.scale(loss).backward()
            if clip is not None:
                scaler.unscale_(opt)
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            scaler.step(opt)
            scaler.update()
    finite = [n for n in norms if n == n and n != float("inf")]  # a skipped step's norm is inf or NaN
    assert clip is None or 2 * sum(n > clip for n in finite) >= len(finite) > 0, norms
    return model, opt


def _assert_same(model, other, opt=None, other_opt=None):
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    if opt is not None:
        assert torch.equal(coefficients(opt), coefficients(other_opt))


def _moved(model):
    """The training changed the parameters (so that equality with the plain loop says something)."""
    return not all(torch.equal(a, b) for a, b in zip(model.parameters(), Model("AMAdamW", []).parameters()))


@pytest.mark.parametrize("clip", [None, "gradient_clip_val", "clip-in-hook"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_trainer_steps_as_a_plain_loop(name, clip):
    """Full precision; clipping by Lightning's gradient_clip_val or by README's hook (no scaler here)."""
    seen = []
    model = Model(name, seen, clip_in_hook=CLIP if clip == "clip-in-hook" else None)
    trainer = _trainer(12, gradient_clip_val=CLIP if clip == "gradient_clip_val" else None)
    trainer.fit(model, _loader())
    assert len(seen) == 12 and _moved(model)
    plain, plain_opt = _plain_loop(name, seen, clip=None if clip is None else CLIP)
    _assert_same(model, plain, trainer.optimizers[0], plain_opt)


@pytest.mark.parametrize("clip_in_hook", [None, CLIP], ids=["no-clip", "clip-in-hook"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_mixed_steps_as_a_plain_loop(name, clip_in_hook):
    """precision="bf16-mixed": autocast, no scaler, so step(closure) as in full precision (loss mode works);
    clipping in on_before_optimizer_step, as Lightning refuses gradient_clip_val here."""
    seen = []
    model = Model(name, seen, clip_in_hook=clip_in_hook)
    trainer = _trainer(12, precision="bf16-mixed")
    trainer.fit(model, _loader())
    assert len(seen) == 12 and _moved(model)
    plain, plain_opt = _plain_loop(name, seen, clip=clip_in_hook, autocast=torch.bfloat16)
    _assert_same(model, plain, trainer.optimizers[0], plain_opt)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resumed_fit_steps_as_a_plain_loop(name, tmp_path):
    """8 steps, Lightning's checkpoint, then a new Trainer and model resumed from it to 16 steps: the optimizer's
    state (moments, the scope state, RLLC's law, AMSGD's previous loss) goes through Lightning's checkpoint.
    Lightning 2.6, resuming at an epoch's end, fed the first batch twice; the plain loop replays what the
    training steps saw."""
    seen = []
    first = _trainer(8)
    first.fit(Model(name, seen), _loader())
    first.save_checkpoint(tmp_path / "8.ckpt")
    resumed = Model(name, seen)
    trainer = _trainer(16)
    trainer.fit(resumed, _loader(), ckpt_path=tmp_path / "8.ckpt")
    assert trainer.global_step == 16 and len(seen) == 16
    plain, plain_opt = _plain_loop(name, seen)
    _assert_same(resumed, plain, trainer.optimizers[0], plain_opt)


@pytest.mark.parametrize("clip_in_hook", [None, CLIP], ids=["no-clip", "clip-in-hook"])
@pytest.mark.parametrize("name", ["AMAdamW", "AMSGD", "RLLC"])
def test_grad_scaler_through_lightning_as_a_plain_loop(name, clip_in_hook):
    """precision="16-mixed" on a GPU: Lightning's MixedPrecision plugin with a GradScaler (built here for the
    CPU). The scale starts high enough that the first steps overflow and are skipped through found_inf."""
    init = 2.0 ** 20
    seen = []
    model = Model(name, seen, clip_in_hook=clip_in_hook)
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    trainer = _trainer(12, scaler=scaler)
    trainer.fit(model, _loader())
    assert scaler.get_scale() < init and _moved(model)  # some steps were skipped, the others taken
    plain, plain_opt = _plain_loop(name, seen, clip=clip_in_hook, scaler=torch.amp.GradScaler("cpu", init_scale=init))
    _assert_same(model, plain, trainer.optimizers[0], plain_opt)


def test_grad_scaler_through_lightning_refuses_loss_mode():
    """With a GradScaler, Lightning runs the closure itself and calls step() without it, so there is no loss
    for delta_f="loss" (Lightning refuses LBFGS there for the same reason): a clear error, no step taken."""
    model = Model("AMSGD-loss", [])
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu")
    trainer = _trainer(2, scaler=scaler)
    with pytest.raises(RuntimeError, match="delta_f='loss' needs step\\(closure\\)"):
        trainer.fit(model, _loader())
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)
