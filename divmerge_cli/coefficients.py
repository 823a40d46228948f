"""Task-arithmetic coefficients Gamma at task, layer or tensor granularity (the merged model as a
function of Gamma is in taskvectors.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from .layers import group_of


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
