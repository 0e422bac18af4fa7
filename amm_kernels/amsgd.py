"""AMSGD: SGD with Adaptive Memory Momentum (SPEC.md section 1)."""
from __future__ import annotations

from ._base import AMOptimizer
from ._hyper import AMSGDHyper


class AMSGD(AMOptimizer):
    r"""SGD whose momentum coefficient beta_t is recomputed every step, in closed form (AM-MSGD).

    .. math::
        \begin{aligned}
        &g_t = \nabla f(x_t) + \mu x_t \quad(\text{negated first if maximize})\\
        &\textbf{first step: } d_0 = g_0,\ \beta_0 = \beta_{max}\\
        &F_t = \sum_{groups} \eta_{t-1} \langle g_t, d_{t-1} \rangle
              \quad\text{or}\quad f(x_{t-1}) - f(x_t) \ (\texttt{delta\_f="loss"})\\
        &\beta_t = \mathrm{clamp}\Big(\frac{(\lambda + 1) F_t - \sum \eta_t \langle d_{t-1} - g_t,\ g_t + \lambda d_{t-1}\rangle}
                                      {\sum \eta_t \lVert d_{t-1} - g_t \rVert^2},\ \beta_{min}, \beta_{max}\Big)
              \quad(\beta_{max} \text{ if the denominator is } 0)\\
        &d_t = \big((\beta_t + \lambda) d_{t-1} + (1 - \beta_t) g_t\big) / (1 + \lambda), \qquad
         x_{t+1} = x_t - \eta_t d_t
        \end{aligned}

    The sums run over every parameter in the beta scope. With ``adaptive=False`` and ``lam=0`` this equals
    ``torch.optim.SGD(momentum=beta_max, dampening=beta_max)`` to float rounding.

    Args:
        params: iterable of parameters or dicts defining param groups (a group may set ``lr`` and
            ``weight_decay``; the other arguments are optimizer-wide).
        lr (float or Tensor, default 1e-3): learning rate eta, >= 0. (The only positional argument after
            params: the ones below are keyword-only, as SGD's second is momentum.)
        lam (float, default 0.1): proximal weight lambda of the two-plane model, >= 0.
        beta_max (float, default 0.9): upper clamp of beta, in [0, 1]; beta on the first step.
        beta_min (float, default 0.0): lower clamp of beta, in [0, beta_max].
        weight_decay (float, default 0.0): coupled L2 penalty mu added to the gradient, >= 0.
        adaptive (bool, default True): False fixes beta = beta_max.
        delta_f (str, default "first_order"): how f(x_{t-1}) - f(x_t) is estimated: "first_order"
            from eta_{t-1} <g_t, d_{t-1}>, or "loss" from the losses the closure returns (the paper's
            deterministic AM-MGD; needs ``step(closure)`` and ``beta_scope="global"``).
        beta_scope (str, default "global"): one beta for all parameters ("global"), one per param
            group ("group") or one per parameter tensor ("tensor").
        maximize (bool, default False): maximize the objective instead of minimizing.
        backend (str, default "auto"): "torch" (the reference), "cpu", "cuda", "triton", or "auto"
            for the fastest available.
        process_group (default None): the torch.distributed group over which beta's sums are
            all-reduced when each rank holds a shard of the parameters (hand-sharded models; the
            shard group under HSDP). None: DTensor parameters (FSDP2 ``fully_shard``) reduce over
            their mesh's shard group, plain parameters (DDP: whole on every rank) are not reduced.
            Every backend reduces (one all_reduce of the per-scope sums per step).
        capturable (bool, default False): the step may be captured in a CUDA graph (parameters on
            the GPU; pass lr as a device tensor to change it between replays).
        state_dtype (torch.dtype or None, default None): the dtype of ``momentum_buffer``. None: the
            parameter's dtype, as torch.optim. ``torch.float32``: float32 state for bfloat16 and float16
            parameters (float32 and float64 parameters keep their own), so that a run in bfloat16
            keeps its momentum to float32 precision; 2 more bytes per state element, in memory and
            in each step's traffic.

    ``optimizer.beta`` is the last beta as a device tensor (0-d for the global scope). State per
    parameter: ``momentum_buffer`` (d). "First step" is the beta scope's: a tensor whose first gradient
    comes later starts from d = 0 (README "Tensors that join late").
    """

    STATE_NAMES = ("momentum_buffer",)
    STEP_OP = "amsgd_step"

    def __init__(
        self,
        params,
        lr=1e-3,
        *,  # by keyword only: torch.optim.SGD's next positional argument is momentum, which AMSGD computes
        lam: float = 0.1,
        beta_max: float = 0.9,
        beta_min: float = 0.0,
        weight_decay: float = 0.0,
        adaptive: bool = True,
        delta_f: str = "first_order",
        beta_scope: str = "global",
        maximize: bool = False,
        backend: str = "auto",
        process_group=None,
        capturable: bool = False,
        state_dtype=None,
    ):
        self._hyper = AMSGDHyper(
            lam=lam, beta_max=beta_max, beta_min=beta_min, adaptive=adaptive, maximize=maximize, delta_f=delta_f
        )
        if delta_f == "loss" and beta_scope != "global":
            raise ValueError(
                f"AMSGD: delta_f='loss' measures one loss for the whole model, so it needs "
                f"beta_scope='global'; got beta_scope={beta_scope!r}"
            )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), beta_scope, backend, process_group, capturable,
                         state_dtype)

    def _wide_args(self):
        hp = self._hyper
        return {**super()._wide_args(), "lam": hp.lam, "beta_max": hp.beta_max, "beta_min": hp.beta_min,
                "adaptive": hp.adaptive, "delta_f": hp.delta_f, "maximize": hp.maximize}

    def _check_closure(self, closure) -> None:
        if self._hyper.delta_f == "loss" and closure is None:
            raise RuntimeError("AMSGD: delta_f='loss' needs step(closure); the closure must return the loss")

    def _uses_loss(self) -> bool:
        return self._hyper.delta_f == "loss"
