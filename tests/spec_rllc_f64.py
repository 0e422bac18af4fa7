"""An independent float64 NumPy implementation of SPEC.md section 4 (RLLC with a linear memory).

Written from /work/shared/SPEC.md, not from the package: it must not import amm_kernels. The tests
use it as the oracle the package is compared against.

``RLLCSpec(groups, U, b, law_lr, law_init, scope)``: ``groups`` is a list of dicts with ``params``
(float64 arrays, copied) and ``lr``; ``opt.groups[i]["lr"]`` may be changed between steps.
``opt.step(grads)`` takes ``grads[group][tensor]`` (an array, or None to skip that tensor this step).
``opt.law`` is the law: shape (k,) for ``scope="global"``, (n_groups, k) for ``"group"``,
(n_tensors, k) for ``"tensor"``.

Conventions (SPEC.md section 4):
- the memory of a tensor is an (n x k) matrix M whose columns are the units; it starts at 0;
- not on a scope's first step, L <- L + law_lr * pinv(M^T M) M^T g with M and g the concatenation of
  every tensor of the scope (the memory before this step's update); pinv drops eigenvalues below
  1e-6 times the largest;
- then M <- M U + g b^T and theta <- theta - lr * M L (lr of the tensor's group, L the new law).
"""

import math
import re

import numpy as np

__all__ = ["RLLCSpec", "memory_matrices", "RCOND"]

RCOND = 1e-6
_SCOPES = ("global", "group", "tensor")


def memory_matrices(text):
    """(U, b) of a memory string of SPEC.md section 4, as float64 arrays (block diagonal U)."""
    blocks = []
    for kind, args in re.findall(r"([MJC])\(([^)]*)\)", text.replace(" ", "")):
        vals = [float(a) for a in args.split(",")]
        if kind == "M":
            (beta,) = vals
            blocks.append((np.array([[beta]]), np.array([1.0])))
        elif kind == "J":
            beta, j = vals[0], int(vals[1])
            # m_1 <- beta m_1 + g, m_i <- beta m_i + m_{i-1}; as M <- M U: new column i = sum_c U[c, i] m_c
            U = beta * np.eye(j) + np.eye(j, k=1)
            b = np.zeros(j)
            b[0] = 1.0
            blocks.append((U, b))
        else:
            r, phi = vals
            # new m_1 = r cos m_1 - r sin m_2 ; new m_2 = r sin m_1 + r cos m_2
            U = np.array([[r * math.cos(phi), r * math.sin(phi)], [-r * math.sin(phi), r * math.cos(phi)]])
            blocks.append((U, np.array([1.0, 0.0])))
    k = sum(len(b) for _, b in blocks)
    U, b, at = np.zeros((k, k)), np.zeros(k), 0
    for Ub, bb in blocks:
        n = len(bb)
        U[at:at + n, at:at + n] = Ub
        b[at:at + n] = bb
        at += n
    return U, b


class RLLCSpec:
    def __init__(self, groups, U, b, law_lr, law_init=None, scope="global"):
        if scope not in _SCOPES:
            raise ValueError(scope)
        self.U = np.array(U, dtype=np.float64)
        self.b = np.array(b, dtype=np.float64)
        self.k = len(self.b)
        self.law_lr = float(law_lr)
        init = np.zeros(self.k)
        init[0] = 1.0
        self.law_init = init if law_init is None else np.array(law_init, dtype=np.float64)
        self.scope = scope
        self.groups = [{"lr": g["lr"], "params": [np.array(p, dtype=np.float64, copy=True) for p in g["params"]]}
                       for g in groups]
        self.memory = {}  # (group, tensor) -> (size x k)
        ids = [(gi, ti) for gi, g in enumerate(self.groups) for ti in range(len(g["params"]))]
        if scope == "global":
            self.scope_of = {key: 0 for key in ids}
        elif scope == "group":
            self.scope_of = {key: key[0] for key in ids}
        else:
            self.scope_of = {key: n for n, key in enumerate(ids)}
        n_scopes = max(self.scope_of.values()) + 1
        self.laws = [self.law_init.copy() for _ in range(n_scopes)]
        self.steps = [0] * n_scopes

    @property
    def law(self):
        return self.laws[0].copy() if self.scope == "global" else np.stack(self.laws)

    def step(self, grads):
        present = {}
        for gi, g in enumerate(self.groups):
            for ti, p in enumerate(g["params"]):
                if grads[gi][ti] is None:
                    continue
                present.setdefault(self.scope_of[(gi, ti)], []).append((gi, ti))
        for s, members in present.items():
            Ms, gs = [], []
            for gi, ti in members:
                p = self.groups[gi]["params"][ti]
                Ms.append(self.memory.setdefault((gi, ti), np.zeros((p.size, self.k))))
                gs.append(np.asarray(grads[gi][ti], dtype=np.float64).reshape(-1))
            M, g = np.concatenate(Ms, axis=0), np.concatenate(gs)
            if self.steps[s] > 0:
                pinv = np.linalg.pinv(M.T @ M, rcond=RCOND, hermitian=True)
                self.laws[s] = self.laws[s] + self.law_lr * (pinv @ (M.T @ g))
            self.steps[s] += 1
            L = self.laws[s]
            for (gi, ti), gt in zip(members, gs):
                p = self.groups[gi]["params"][ti]
                M_t = self.memory[(gi, ti)] @ self.U + np.outer(gt, self.b)
                self.memory[(gi, ti)] = M_t
                p -= self.groups[gi]["lr"] * (M_t @ L).reshape(p.shape)
