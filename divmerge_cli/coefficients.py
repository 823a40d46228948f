"""Task-arithmetic coefficients Gamma at task, layer or tensor granularity, and the merged
parameters theta0 + sum_t Gamma[t, group] * tau_t as a differentiable function of Gamma."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checkpoint import Checkpoint
from .merge import group_of

GRANULARITIES = ("task", "layer", "tensor")


def groups_for(names: list[str], granularity: str) -> tuple[list[str], list[int]]:
    """(group names, group index of each tensor). Layer level: 'embeddings', one per transformer
    block (in model order), 'head' (everything after the last block)."""
    if granularity == "task":
        return ["all"], [0] * len(names)
    if granularity == "tensor":
        return list(names), list(range(len(names)))
    keys = {group_of(n) for n in names}

    def order(g: str) -> tuple:
        if g == "embeddings":
            return (0, "", 0)
        if g == "head":
            return (2, "", 0)
        prefix, _, idx = g.rpartition(".")
        return (1, prefix, int(idx))

    groups = sorted(keys, key=order)
    where = {g: i for i, g in enumerate(groups)}
    return groups, [where[group_of(n)] for n in names]


def initial_gamma(init: float | str, n_tasks: int, n_groups: int) -> Tensor:
    value = 1.0 / n_tasks if init == "uniform" else float(init)
    return torch.full((n_tasks, n_groups), value, dtype=torch.float32)


@dataclass
class TaskVectors:
    """theta0 (compute dtype) and tau_t = theta_t - theta0 stacked per tensor, [n, *shape] in the
    checkpoint's dtype: one copy of each expert's difference, never an fp32 copy of every expert."""

    names: list[str]
    base: dict[str, Tensor]
    taus: dict[str, Tensor]
    group_index: list[int]

    @classmethod
    def load(
        cls,
        base: Checkpoint,
        experts: list[Checkpoint],
        names: list[str],
        group_index: list[int],
        device: str = "cpu",
    ) -> TaskVectors:
        b, t = {}, {}
        for n in names:
            theta0 = base.get(n)
            if not theta0.dtype.is_floating_point:
                continue
            b[n] = theta0.to(device, torch.float32)
            t[n] = torch.stack(
                [(e.get(n).to(device, torch.float32) - b[n]).to(theta0.dtype) for e in experts]
            )
        keep = [i for i, n in enumerate(names) if n in b]
        return cls([names[i] for i in keep], b, t, [group_index[i] for i in keep])

    def merged(self, gamma: Tensor) -> dict[str, Tensor]:
        """theta0 + sum_t gamma[t, g(name)] tau_t for every tensor (differentiable in gamma)."""
        return {n: self.tensor(n, gamma, g) for n, g in zip(self.names, self.group_index)}

    def tensor(self, name: str, gamma: Tensor, group: int | None = None) -> Tensor:
        g = self.group_index[self.names.index(name)] if group is None else group
        return _Combine.apply(gamma[:, g], self.base[name], self.taus[name])


class _Combine(torch.autograd.Function):
    """theta0 + sum_t c_t tau_t in float32, with tau in its storage dtype. Plain autograd would
    keep an fp32 copy of every tau for the backward pass and make a temporary per task; here a
    float32 tau is one BLAS addmv forward and one gemv backward, and a bf16/fp16 tau is upcast
    one task at a time."""

    @staticmethod
    def forward(ctx, coeff: Tensor, base: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(coeff, tau)
        flat = tau.reshape(tau.shape[0], -1)
        if tau.dtype == torch.float32:
            return torch.addmv(base.reshape(-1), flat.t(), coeff).view(base.shape)
        out = base.clone()
        for t in range(tau.shape[0]):
            out.add_(tau[t].float(), alpha=float(coeff[t]))
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        coeff, tau = ctx.saved_tensors
        flat, g = tau.reshape(tau.shape[0], -1), grad.reshape(-1)
        if tau.dtype == torch.float32:
            dc = torch.mv(flat, g)
        else:
            dc = torch.stack([torch.dot(flat[t].float(), g) for t in range(tau.shape[0])])
        return dc.to(coeff.dtype), None, None
