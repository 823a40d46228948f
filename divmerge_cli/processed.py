"""Processed task vectors for the learned merges (the paper's Remark 3).

Eq. 4 can fit the coefficients of any differentiable merge of the task vectors. TIES, DARE and the
other sparsified methods of mergekit are task arithmetic on processed task vectors, so e.g.
DivMerge-TIES learns Gamma in theta0 + sum_t Gamma_t (m_t * tau'_t), where, once, before learning:
- tau'_t is tau_t sparsified as the base method does it: TIES keeps the top density fraction of
  |tau_t|; DARE drops entries at random (rescaled), Breadcrumbs drops the smallest and the gamma
  fraction of largest, DELLA drops at random by magnitude rank (rescaled), SCE keeps the entries
  whose values vary most across the experts; task arithmetic keeps tau_t;
- m_t keeps the entries that agree with the sign elected from the unweighted sum of the tau'
  (ties, dare_ties, breadcrumbs_ties, della, sce), else m_t = 1.
There is no division by the agreeing weights, nor SCE's weights: Gamma learns the scale.
TSV-M (`tsv`) yields one vector per expert too: on each 2-D tensor the expert's orthogonalised
singular components U_t diag(S_t) V_t (they sum to TSV-M's merge), elsewhere tau_t / n (they sum to
its mean); its scaling_factor is what Gamma learns. The
processed vectors are computed tensor by tensor and written to disk, then read like any expert's
task vectors (held in memory or streamed per block).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import Checkpoint, ShardWriter, not_finite_input
from .errors import UserError
from .methods import (
    METHODS,
    breadcrumbs_drop,
    dare_drop,
    della_drop,
    magnitude_threshold,
    sce_select,
    sparsify,
)
from .svd_methods import tsv_components
from .taskvectors import dense_tau

# how each base method sparsifies one task vector (ties and sce work on the stack: see below)
DROPS = {
    "dare_linear": dare_drop,
    "dare_ties": dare_drop,
    "breadcrumbs": breadcrumbs_drop,
    "breadcrumbs_ties": breadcrumbs_drop,
    "della": della_drop,
    "della_linear": della_drop,
}
ELECTS = ("ties", "dare_ties", "breadcrumbs_ties", "della", "sce")  # a sign election follows
DONE = "processed.done"


class StoredExpert:
    """An expert whose processed task vectors were written to a folder: tau is read from it."""

    def __init__(self, folder: Path, where: str):
        self.ckpt = Checkpoint(folder, where)
        self.path, self.where = folder, where

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.dtype(name)

    def tau_is_dense(self, name: str) -> bool | None:
        return name in self.ckpt.index

    def tau(self, name: str, base) -> torch.Tensor | None:
        return self.ckpt.get(name).float() if name in self.ckpt.index else None


def process_tensor(
    t: torch.Tensor, base_method: str, per_model: list[dict], glob: dict, rng: torch.Generator
) -> torch.Tensor:
    """The processed task vectors m_t * tau'_t of one tensor, in place of the stacked tau [n, ...]:
    beside it only a few temporaries of one expert's size (|tau|, the elected sign, a mask), where
    a copy of the stack would double the n experts' largest tensors."""
    if base_method in DROPS:
        for tau, m in zip(t, per_model):  # the data-free method's order: same masks for one seed
            sparsify(tau, m, glob["rescale"], rng, DROPS[base_method])
    if base_method == "sce":
        sce_select(t, glob["select_topk"])
    if base_method == "ties":
        zero = torch.zeros((), dtype=t.dtype).expand(t.shape[1:])
        for tau, m in zip(t, per_model):
            thr = magnitude_threshold(tau, zero, m["density"])
            if thr >= 0:
                tau.masked_fill_(tau.abs() < thr, 0.0)
    if base_method == "tsv":  # whole matrices: the SVDs need every expert's tau at once
        t.copy_(tsv_components(t))
    if base_method in ELECTS:
        sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)  # elected once, from the unweighted sum
        for tau in t:
            tau.masked_fill_(tau * sign <= 0, 0.0)
    return t


def process(
    plan,
    experts: list,
    base_method: str,
    folder: Path,
    seed: int,
    generator: Callable[[int, str], torch.Generator],
    params: Callable,
) -> list[StoredExpert]:
    """Write every expert's processed task vectors to folder/e<t>/ (reused when complete).
    `params(plan, name)` resolves the base method's parameters exactly as the data-free merge."""
    dirs = [folder / f"e{t}" for t in range(len(experts))]
    if (folder / DONE).is_file():
        stored = _stored(dirs, base_method, plan)
        if stored is not None:
            return stored
        shutil.rmtree(folder)  # damaged (a killed disk, a truncated file): computed again below
    if not (folder / DONE).is_file():
        mplan = dataclasses.replace(plan, method=METHODS[base_method])
        base = plan.base
        names = [n for n in plan.names if base.dtype(n).is_floating_point]
        specs = {n: (base.shape(n), torch.float32) for n in names}
        writers = []
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text("{}")
            writers.append(ShardWriter(d, specs, 1 << 62))
        for name in names:
            taus = torch.zeros((len(experts), *base.shape(name)))
            for tau_t, e in zip(taus, experts):
                tau = dense_tau(e, name, base)
                if tau is not None:
                    assert tau.shape == tau_t.shape, name  # copy_ would broadcast silently
                    tau_t.copy_(tau)
                del tau
            per_model, glob = params(mplan, name)
            try:
                out = process_tensor(taus, base_method, per_model, glob, generator(seed, name))
            except UserError as e:  # an SVD that does not converge: say which tensor
                raise UserError(f"tensor {name}: {e}") from None
            except FloatingPointError:  # an SVD of NaN or Inf: say whose
                raise not_finite_input((e, name) for e in experts) or UserError(
                    f"tensor {name}: NaN or Inf in the {base_method}-processed task vectors"
                ) from None
            for w, tau in zip(writers, out):
                w.write(name, tau)
        for w in writers:
            w.close()
        (folder / DONE).write_text(base_method + "\n")
    stored = _stored(dirs, base_method, plan)
    assert stored is not None, folder  # just written whole
    return stored


def _stored(dirs: list[Path], base_method: str, plan) -> list[StoredExpert] | None:
    """The processed experts written to DIRS, each holding every floating-point tensor of the
    base with its shape; None when a file is missing, truncated or otherwise damaged."""
    want = {n: plan.base.shape(n) for n in plan.names if plan.base.dtype(n).is_floating_point}
    try:
        stored = [StoredExpert(d, f"{base_method} task vector {t}") for t, d in enumerate(dirs)]
    except UserError:
        return None
    ok = all({n: s.ckpt.shape(n) for n in s.ckpt.names} == want for s in stored)
    return stored if ok else None
