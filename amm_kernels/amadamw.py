"""AMAdamW: AdamW with Adaptive Memory Momentum (SPEC.md section 2)."""
from __future__ import annotations

import warnings

from torch import Tensor

from ._base import AMOptimizer
from ._hyper import AMAdamWHyper


class AMAdamW(AMOptimizer):
    r"""AdamW whose first-moment coefficient beta_t is recomputed every step, in closed form.

    .. math::
        \begin{aligned}
        &v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
         p_t = (1 - \beta_{max} \textstyle\prod_{s<t} \beta_s)\,(\epsilon + \sqrt{v_t / (1 - \beta_2^t)}), \qquad
         w_t = 1 / ((1 + \lambda p_t) p_t)\\
        &\beta_t = \mathrm{clamp}\Big(\frac{\sum \eta_{t-1} \langle g_t, \mu x_t + d_{t-1}/p_t\rangle
              - \sum c\,(\langle w_t (d_{t-1} - g_t), g_t + \lambda p_t d_{t-1}\rangle + \mu \langle d_{t-1} - g_t, x_t\rangle)}
              {\sum c\,\langle w_t (d_{t-1} - g_t), d_{t-1} - g_t\rangle},\ \beta_{min}, \beta_{max}\Big),
              \quad c = \frac{\eta_t}{1 + \mu \eta_t}\\
        &d_t = \frac{\beta_t d_{t-1} + \lambda p_t d_{t-1} + (1 - \beta_t) g_t}{1 + \lambda p_t}, \qquad
         x_{t+1} = (1 - \eta_t \mu) x_t - \eta_t d_t / p_t
        \end{aligned}

    beta = beta_max on the first step and where the denominator is 0. The sums run over every
    parameter in the beta scope. With ``adaptive=False`` and ``lam=0`` this equals
    ``torch.optim.AdamW`` with the same lr, betas, eps and weight_decay, to float rounding.

    Args:
        params: iterable of parameters or dicts defining param groups (a group may set ``lr`` and
            ``weight_decay``; the other arguments are optimizer-wide).
        lr (float or Tensor, default 1e-3): learning rate eta, >= 0.
        betas (tuple, default (0.9, 0.999)): (beta_max, beta2). beta_max in [0, 1) plays Adam's beta1
            (the clamp's upper end and the first step's beta); beta2 in [0, 1) is the second-moment decay.
        eps (float, default 1e-8): added to sqrt(v_hat), > 0 (outside the square root, as AdamW); with
            adaptive=True at least float32's smallest normal / (1 - beta_max), ~1.2e-37 at beta_max 0.9.
        weight_decay (float, default 1e-2): decoupled weight decay mu, >= 0.
        (Positionally, lr to weight_decay come in torch.optim.AdamW's order; the arguments below are
        keyword-only.)
        lam (float, default 0.1): proximal weight lambda, >= 0.
        beta_min (float, default 0.0): lower clamp of beta, in [0, beta_max].
        adaptive (bool, default True): False fixes beta = beta_max.
        beta_scope (str, default "tensor"): one beta per parameter tensor ("tensor"), per param
            group ("group"), or one for all parameters ("global": the paper's AMAdamW; see AMSGD).
            The default is measured, not the paper's: on bench/conv_lm.py's language model the
            tensor scope gave a lower validation loss than the global one in 20 of 21 seeds over
            five settings (bench/README.md). Unlike AMSGD's default, which stays "global".
        maximize (bool, default False): maximize the objective instead of minimizing.
        backend (str, default "auto"): "torch" (the reference), "cpu", "cuda", "triton", or "auto".
        process_group (default None): the torch.distributed group over which beta's sums are
            all-reduced when each rank holds a shard of the parameters (hand-sharded models; the
            shard group under HSDP). None: DTensor parameters (FSDP2 ``fully_shard``) reduce over
            their mesh's shard group, plain parameters (DDP: whole on every rank) are not reduced.
            Every backend reduces (one all_reduce of the per-scope sums per step).
        capturable (bool, default False): the step may be captured in a CUDA graph (parameters on
            the GPU; pass lr as a device tensor to change it between replays).
        state_dtype (torch.dtype or None, default None): the dtype of ``exp_avg`` and ``exp_avg_sq``. None: the
            parameter's dtype, as torch.optim. ``torch.float32``: float32 state for bfloat16 and float16
            parameters (float32 and float64 parameters keep their own), so that a run in bfloat16
            keeps its momentum to float32 precision; 2 more bytes per state element, in memory and
            in each step's traffic.

    ``optimizer.beta`` is the last beta as a device tensor (one per parameter tensor by default). State
    per parameter: ``exp_avg`` (d) and ``exp_avg_sq`` (v). Bias corrections count the steps of the beta
    scope: a tensor whose first gradient comes after its scope's first step starts from zero moments
    under the scope's corrections, so its first updates are larger than AdamW's (a warning says so;
    README "Tensors that join late"). With ``beta_scope="tensor"`` each tensor counts its own steps.
    """

    STATE_NAMES = ("exp_avg", "exp_avg_sq")
    _BIAS_CORRECTED = True  # beta_prod, the bias correction of the first moment
    STEP_OP = "amadamw_step"

    def __init__(
        self,
        params,
        lr=1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,  # (torch.optim.AdamW's positional order up to here; the rest by keyword only)
        lam: float = 0.1,
        beta_min: float = 0.0,
        adaptive: bool = True,
        beta_scope: str = "tensor",
        maximize: bool = False,
        backend: str = "auto",
        process_group=None,
        capturable: bool = False,
        state_dtype=None,
    ):
        if (isinstance(betas, Tensor) or type(betas).__module__ == "numpy") and getattr(betas, "ndim", 0) == 1:
            betas = tuple(betas)  # a pair as an array or a 1-d tensor, as torch.optim.AdamW takes it
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"AMAdamW: betas must be a pair (beta_max, beta2), got {betas!r}")
        self._hyper = AMAdamWHyper(
            lam=lam, beta_max=betas[0], beta_min=beta_min, beta2=betas[1], eps=eps,
            adaptive=adaptive, maximize=maximize,
        )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay), beta_scope, backend, process_group, capturable,
                         state_dtype)

    def _wide_args(self):
        hp = self._hyper
        return {**super()._wide_args(), "betas": (hp.beta_max, hp.beta2), "lam": hp.lam, "eps": hp.eps,
                "beta_min": hp.beta_min, "adaptive": hp.adaptive, "maximize": hp.maximize}

    def _watches_late_tensors(self) -> bool:
        # NOTE [late tensors] in _base.py. For AMAdamW this matters: zero moments under the scope's bias
        # corrections make such a tensor's first updates several times AdamW's (about 5x ten steps after
        # it joins at step 1000 with beta2 = 0.999: bench/README.md). Said once per optimizer. (Under the
        # tensor scope only a reset tensor under a process_group joins late, NOTE [a reset tensor restarts
        # its scope]; the host's look, _late_in_scope, finds none there, the device's count does.)
        return not getattr(self, "_warned_late_state", False)

    def _warn_late(self, n_late: int) -> None:
        self._warned_late_state = True
        hint = ("beta_scope='tensor' (the default) counts steps per tensor." if self.beta_scope != "tensor" else
                "Under a process_group a tensor whose state was reset keeps its scope's step count.")
        warnings.warn(
            f"AMAdamW: {n_late} parameter tensor(s) got their first gradient (or had their state reset) after "
            f"their beta scope (beta_scope={self.beta_scope!r}) had taken steps. They start from zero moments "
            "with the scope's bias corrections (steps are counted per scope), so their first updates are larger "
            f"than torch.optim.AdamW's (up to about 5x over the first ~1/(1 - beta2) steps). {hint} (Shown once.)",
            stacklevel=6,  # _warn_late, its caller, step, no_grad, torch.optim hooks, the caller of step
        )
