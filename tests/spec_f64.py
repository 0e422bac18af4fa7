"""An independent float64 NumPy implementation of SPEC.md sections 1-3 (AM-SGD, AM-AdamW).

Written from /work/shared/SPEC.md and the paper, not from the package: it must not import
amm_kernels. The tests use it as the oracle the package is compared against.

Parameters are float64 NumPy arrays held by the optimizer (``opt.params[group][tensor]``); a step
takes the gradients explicitly: ``opt.step(grads, loss=None)`` with ``grads[group][tensor]`` an array
or None (a parameter with no gradient is skipped in that step). ``opt.groups[i]["lr"]`` may be changed
between steps. ``opt.beta`` holds the last beta(s): shape () for ``beta_scope="global"``, (n_groups,)
for ``"group"``, (n_tensors,) for ``"tensor"`` (tensors numbered through the groups in order).

Conventions (SPEC.md):
- sums ``<a, b>`` run over every element of every tensor in the beta's scope; each group's sums are
  weighted by its own step size (the multi-group formulas of section 3, used for every scope);
- beta = beta_max on the scope's first step, where the denominator is not > 0, and always when
  ``adaptive=False``;
- AM-SGD: coupled L2 weight decay (``g = grad + wd * x``), ``d = g`` on the scope's first step;
- a tensor whose first gradient arrives after its scope's first step starts from zero state (AM-SGD's
  d = 0, like AM-AdamW's d and v) and takes the scope's step count: SPEC.md keeps step and beta_prod
  per beta (section 3), not per tensor (the package's choice where SPEC.md is silent, README.md);
- AM-AdamW: decoupled weight decay ``x <- (1 - eta mu) x - eta d / p``, bias correction
  ``1 - beta_max * beta_prod`` with ``beta_prod`` the product of the scope's earlier betas and
  ``1 - beta2^t`` with t the number of steps the scope has taken, this one included;
- ``maximize=True`` negates the gradient before anything else (as torch.optim does).
"""

import numpy as np

__all__ = ["AMSGDSpec", "AMAdamWSpec"]

_SCOPES = ("global", "group", "tensor")


def _dot(a, b):
    return float(np.sum(a * b))


class _ScopeState:
    def __init__(self, members, beta_max):
        self.members = members  # list of (group index, tensor index)
        self.step = 0  # steps taken by this scope
        self.beta = beta_max  # last beta
        self.beta_prod = 1.0  # product of the betas of all earlier steps
        self.prev_loss = None  # loss mode only


class _SpecBase:
    def __init__(self, groups, defaults, beta_max, beta_scope, maximize, adaptive):
        if beta_scope not in _SCOPES:
            raise ValueError(f"beta_scope must be one of {_SCOPES}, got {beta_scope!r}")
        self.groups = []
        for g in groups:
            entry = dict(defaults)
            entry.update({k: v for k, v in g.items() if k != "params"})
            entry["params"] = [np.array(p, dtype=np.float64, copy=True) for p in g["params"]]
            entry["prev_lr"] = None
            self.groups.append(entry)
        self.beta_max = float(beta_max)
        self.beta_scope = beta_scope
        self.maximize = bool(maximize)
        self.adaptive = bool(adaptive)
        # per-tensor state, keyed by (group index, tensor index)
        self.state = {}

        members = [(gi, ti) for gi, g in enumerate(self.groups) for ti in range(len(g["params"]))]
        if beta_scope == "global":
            self.scopes = [_ScopeState(members, self.beta_max)]
        elif beta_scope == "group":
            self.scopes = [
                _ScopeState([m for m in members if m[0] == gi], self.beta_max)
                for gi in range(len(self.groups))
            ]
        else:
            self.scopes = [_ScopeState([m], self.beta_max) for m in members]

    @property
    def params(self):
        return [g["params"] for g in self.groups]

    @property
    def beta(self):
        betas = np.array([s.beta for s in self.scopes], dtype=np.float64)
        return betas.reshape(()) if self.beta_scope == "global" else betas

    def _clamped(self, num, den):
        if not den > 0:
            return self.beta_max
        return min(max(num / den, self.beta_min), self.beta_max)

    def step(self, grads, loss=None):
        if len(grads) != len(self.groups):
            raise ValueError("grads must have one entry per group")
        for scope in self.scopes:
            live = [(gi, ti) for gi, ti in scope.members if grads[gi][ti] is not None]
            if not live:
                continue
            g_of = {}
            for gi, ti in live:
                g = np.asarray(grads[gi][ti], dtype=np.float64).reshape(self.groups[gi]["params"][ti].shape)
                g_of[(gi, ti)] = -g if self.maximize else g
            self._scope_step(scope, live, g_of, loss)
            scope.step += 1
        for gi, group in enumerate(self.groups):
            if any(grads[gi][ti] is not None for ti in range(len(group["params"]))):
                group["prev_lr"] = group["lr"]
        return self.beta.copy()


class AMSGDSpec(_SpecBase):
    """SPEC.md section 1 with the multi-group formula of section 3."""

    def __init__(self, groups, lr=1e-3, lam=0.1, beta_max=0.9, beta_min=0.0, weight_decay=0.0,
                 adaptive=True, delta_f="first_order", beta_scope="global", maximize=False):
        if delta_f not in ("first_order", "loss"):
            raise ValueError(f"delta_f must be 'first_order' or 'loss', got {delta_f!r}")
        if delta_f == "loss" and beta_scope != "global":
            raise ValueError("delta_f='loss' needs beta_scope='global'")
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay}, beta_max, beta_scope,
                         maximize, adaptive)
        self.lam = float(lam)
        self.beta_min = float(beta_min)
        self.delta_f = delta_f

    def step(self, grads, loss=None):
        if self.delta_f == "loss" and loss is None:
            raise ValueError("delta_f='loss' needs the loss of this step")
        return super().step(grads, loss)

    def _scope_step(self, scope, live, g_of, loss):
        lam = self.lam
        # coupled L2 weight decay, as torch.optim.SGD
        for gi, ti in live:
            wd = self.groups[gi]["weight_decay"]
            if wd > 0:
                g_of[(gi, ti)] = g_of[(gi, ti)] + wd * self.groups[gi]["params"][ti]

        if scope.step == 0:
            beta = self.beta_max
            for m in live:
                self.state[m] = {"d": g_of[m].copy()}
            for gi, ti in live:
                self.groups[gi]["params"][ti] -= self.groups[gi]["lr"] * self.state[(gi, ti)]["d"]
        else:
            for m in live:  # a tensor whose first gradient arrives late starts with d = 0
                if m not in self.state:
                    self.state[m] = {"d": np.zeros_like(g_of[m])}
            if self.adaptive:
                f_first_order = 0.0
                sum_b = 0.0
                sum_d = 0.0
                for gi, ti in live:
                    g = g_of[(gi, ti)]
                    d = self.state[(gi, ti)]["d"]
                    eta = self.groups[gi]["lr"]
                    eta_prev = self.groups[gi]["prev_lr"]
                    diff = d - g
                    f_first_order += eta_prev * _dot(g, d)
                    sum_b += eta * _dot(diff, g + lam * d)
                    sum_d += eta * _dot(diff, diff)
                if self.delta_f == "loss":
                    # F = f(x_{t-1}) - f(x_t) of the objective being minimised (-loss under maximize)
                    delta = float(scope.prev_loss) - float(loss)
                    f_val = -delta if self.maximize else delta
                else:
                    f_val = f_first_order
                beta = self._clamped((lam + 1.0) * f_val - sum_b, sum_d)
            else:
                beta = self.beta_max
            for gi, ti in live:
                st = self.state[(gi, ti)]
                st["d"] = ((beta + lam) * st["d"] + (1.0 - beta) * g_of[(gi, ti)]) / (1.0 + lam)
                self.groups[gi]["params"][ti] -= self.groups[gi]["lr"] * st["d"]
        if loss is not None:
            scope.prev_loss = float(loss)
        scope.beta = beta
        scope.beta_prod *= beta


class AMAdamWSpec(_SpecBase):
    """SPEC.md section 2 with the multi-group formula of section 3."""

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), lam=0.1, eps=1e-8, weight_decay=1e-2,
                 beta_min=0.0, adaptive=True, beta_scope="global", maximize=False):
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay}, betas[0], beta_scope,
                         maximize, adaptive)
        self.beta2 = float(betas[1])
        self.lam = float(lam)
        self.eps = float(eps)
        self.beta_min = float(beta_min)

    def _scope_step(self, scope, live, g_of, loss):
        lam, beta2, eps = self.lam, self.beta2, self.eps
        t = scope.step + 1
        bias1 = 1.0 - self.beta_max * scope.beta_prod
        bias2 = 1.0 - beta2 ** t
        p_of = {}
        for m in live:
            st = self.state.setdefault(m, {"d": np.zeros_like(g_of[m]), "v": np.zeros_like(g_of[m])})
            g = g_of[m]
            st["v"] = beta2 * st["v"] + (1.0 - beta2) * g * g
            p_of[m] = bias1 * (eps + np.sqrt(st["v"] / bias2))

        if t == 1 or not self.adaptive:
            beta = self.beta_max
        else:
            num = 0.0
            den = 0.0
            for gi, ti in live:
                m = (gi, ti)
                g, p, x = g_of[m], p_of[m], self.groups[gi]["params"][ti]
                d = self.state[m]["d"]
                w = 1.0 / ((1.0 + lam * p) * p)
                mu = self.groups[gi]["weight_decay"]
                eta = self.groups[gi]["lr"]
                eta_prev = self.groups[gi]["prev_lr"]
                c = eta / (1.0 + mu * eta)
                diff = d - g
                a_g = _dot(g, mu * x + d / p)
                b_g = _dot(w * diff, g + lam * p * d)
                c_g = _dot(diff, x)
                d_g = _dot(w * diff, diff)
                num += eta_prev * a_g - c * (b_g + mu * c_g)
                den += c * d_g
            beta = self._clamped(num, den)

        for gi, ti in live:
            m = (gi, ti)
            st = self.state[m]
            g, p = g_of[m], p_of[m]
            st["d"] = (beta * st["d"] + lam * p * st["d"] + (1.0 - beta) * g) / (1.0 + lam * p)
            eta = self.groups[gi]["lr"]
            mu = self.groups[gi]["weight_decay"]
            x = self.groups[gi]["params"][ti]
            x *= 1.0 - eta * mu
            x -= eta * st["d"] / p
        scope.beta = beta
        scope.beta_prod *= beta

