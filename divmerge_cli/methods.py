"""Data-free merge methods as pure per-tensor functions, and METHODS, the one table of them.

Semantics follow mergekit 0.1.5 for the same YAML keys (see README "Methods").

The contract of a merge function `fn(base, xs, p, glob, rng, prep=None) -> Tensor`, which
merge.tensor_stages relies on:
- `base` is theta0 in float32, or None when the method's `uses_base` is False (linear,
  multislerp without a base). `xs` holds one tensor per merged model, each of base's shape: float32
  when the whole tensor is passed, the checkpoint's storage dtype when a row chunk is, so a
  function upcasts as it reads them (`_taus`). Neither is ever written to.
- `p` is one dict per model of its `model_params` (weight, density), `glob` the dict of
  `global_params` (normalize, lambda, t, ...), both plain floats already resolved for this tensor
  (lists interpolated at its layer position, filters matched on its name: merge._params).
- `rng` is a torch.Generator seeded from the run's seed and the tensor's name, so a random mask
  does not depend on the order in which tensors are merged.
- The result is a new float32 tensor of base's shape; the writer casts it to the output dtype.
- `elementwise=True` (the default): the function may be called on row chunks [a:b] of a tensor,
  and the chunks' results, stacked, must equal the result on the whole tensor. A statistic of the
  whole tensor (TIES's magnitude threshold) cannot come from a chunk: `prepare(base, xs, p, step)`
  computes it once from the whole tensors (streamed as merge.Rows, `step` rows at a time), as
  Stages so worker threads share it, and every chunk gets it as `prep`. Only chunked calls get a
  `prep`; given None, a function computes it from what it holds.
- `elementwise=False`: one call with the whole tensor. DARE's mask is per element, but its rescale
  keeps each task vector's L1 norm (a whole-tensor sum) and its random stream must not depend on
  how the tensor is cut; SLERP and Multi-SLERP use whole-tensor norms and angles.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .svd_methods import iso_c, iso_cts, tsv, wudi

# the checks below take a recipe.Recipe (recipe.py imports this table, so it is named here only)
Recipe = Any
T = TypeVar("T")
# Work that can run on several threads, as a generator of stages: it yields a list of jobs
# (argument-free callables, independent of each other), receives their results in the same order,
# and returns its value. Results never depend on which thread ran a job, so a pool's output is
# bit-identical to run_stages' on one thread.
Stages = Generator[list[Callable[[], Any]], list[Any], T]

SAMPLE = 1 << 14  # |tau| entries sampled to bracket a k-th magnitude...
SAMPLE_BLOCKS = 16  # ...as this many blocks of whole rows at random places
Z = 4.0  # bracket half-width in standard errors: a miss costs an exact select, never exactness
EXACT_BELOW = 1 << 18  # smaller tensors are selected exactly at once


def _weights(p: list[dict], like: Tensor) -> Tensor:
    """Per-model weights shaped to broadcast against a stack of tensors."""
    w = torch.tensor([m["weight"] for m in p], dtype=like.dtype)
    return w.view(-1, *([1] * like.dim()))


def linear(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Weighted average of the models: sum w_i theta_i / sum w_i."""
    stacked = torch.stack(xs).float()  # row chunks arrive in the storage dtype
    w = _weights(p, stacked[0])
    out = (stacked * w).sum(0)
    if glob["normalize"]:
        out /= w.sum()
    return out


def _taus(base: Tensor, xs: list[Tensor]) -> Tensor:
    """The task vectors tau_i = x_i - base in float32, stacked into one fresh tensor (worked on in
    place); the models may arrive in their storage dtype, upcast on the way."""
    t = torch.empty((len(xs), *base.shape), dtype=torch.float32, device=base.device)
    for i, x in enumerate(xs):
        sub_upcast(x, base, t[i])
    return t


def sub_upcast(x: Tensor, base: Tensor, out: Tensor) -> Tensor:
    """out = x - base in float32 (out and base float32, x as stored). A 16-bit x is converted into
    out first, then base subtracted in place: the same values as torch's mixed-dtype subtraction
    (the upcast is exact), ~3x faster on CPU."""
    if x.dtype in (torch.bfloat16, torch.float16) and base.dtype == out.dtype == torch.float32:
        return out.copy_(x).sub_(base)
    return torch.sub(x, base, out=out)


def _sum0(t: Tensor) -> Tensor:
    """t[0] + t[1] + ... in that order: ~3x faster than t.sum(0) for a few models on CPU."""
    if len(t) == 1:
        return t[0].clone()
    out = t[0] + t[1]
    for x in t[2:]:
        out += x
    return out


def task_arithmetic(base, xs, p, glob, rng, prep=None) -> Tensor:
    """theta0 + lambda * sum w_i tau_i (Ilharco et al., 2022)."""
    return _disjoint_merge(base, _taus(base, xs), p, glob, elect=False)


def ties(base, xs, p, glob, rng, prep=None) -> Tensor:
    """TIES (Yadav et al., 2023): trim to the top-density magnitudes, elect signs, disjoint merge."""
    prep = prep or ties_prepare(base, xs, p)
    t = _taus(base, xs)
    for tau, thr in zip(t, prep["thresholds"]):
        _trim(tau, thr)
    return _disjoint_merge(base, t, p, glob, elect=True)


def dare_linear(base, xs, p, glob, rng, prep=None) -> Tensor:
    """DARE (Yu et al., 2024): drop each delta entry with prob 1-density, rescale the survivors."""
    return _sparse_merge(base, xs, p, glob, rng, dare_drop, elect=False)


def dare_ties(base, xs, p, glob, rng, prep=None) -> Tensor:
    """DARE's random drop, then TIES's sign election and disjoint merge."""
    return _sparse_merge(base, xs, p, glob, rng, dare_drop, elect=True)


def _sparse_merge(base, xs, p, glob, rng, drop, elect: bool) -> Tensor:
    """mergekit's generalized task arithmetic: sparsify each task vector with `drop` (rescaled
    with glob["rescale"]), then sum them (elect=False) or elect signs first (elect=True)."""
    t = _taus(base, xs)
    for tau, m in zip(t, p):
        sparsify(tau, m, glob["rescale"], rng, drop)
    return _disjoint_merge(base, t, p, glob, elect)


def run_stages(stages: Stages[T]) -> T:
    """Run a stage generator on this thread: each stage's jobs in order, results sent back."""
    try:
        jobs = next(stages)
        while True:
            jobs = stages.send([job() for job in jobs])
    except StopIteration as done:
        return done.value


def ties_prepare(base, xs, p, step: int | None = None) -> dict:
    """Whole-tensor statistics TIES needs before it can run on row chunks: each model's threshold.
    Takes tensors in any dtype or merge.Rows; `step` rows per chunk (default: ~1M entries)."""
    return run_stages(ties_prepare_stages(base, xs, p, step))


def ties_prepare_stages(base, xs, p, step: int | None = None) -> Stages[dict]:
    """ties_prepare as stages (see Stages): each model's k-th largest |x - base|
    (kth_largest_stages)."""
    n = xs[0].numel()
    ks = [_top_k(n, m["density"]) for m in p]
    live = [i for i, k in enumerate(ks) if k is not None]
    vals = yield from kth_largest_stages([xs[i] for i in live], base, [ks[i] for i in live], step)
    thresholds = [-1.0] * len(xs)  # -1: keep everything
    for i, v in zip(live, vals):
        thresholds[i] = v
    return {"thresholds": thresholds}


def kth_largest_stages(xs, base, ks: list[int], step: int | None = None) -> Stages[list[float]]:
    """The ks[i]-th largest |xs[i] - base| for each i, as stages: bracket each from a sample of
    rows, one pass over the row chunks counting entries above each bracket and keeping those
    inside it, then a select inside the bracket (an exact select of the whole tensor when it
    missed). Takes tensors in any dtype or merge.Rows; `step` rows per chunk (default: ~1M
    entries)."""
    if not xs:
        return []
    n = xs[0].numel()
    if n <= EXACT_BELOW:
        return (yield [partial(_kth_exact, x, base, k) for x, k in zip(xs, ks)])
    rows = xs[0].shape[0]
    step = step or max(1, (1 << 20) // (n // rows))
    (brackets,) = yield [partial(_brackets, xs, base, ks)]
    parts = yield [
        partial(_count_in_brackets, xs, base, brackets, r, r + step) for r in range(0, rows, step)
    ]
    return (
        yield [
            partial(_select, x, base, k, brackets[j], [part[j] for part in parts])
            for j, (x, k) in enumerate(zip(xs, ks))
        ]
    )


def _kth_largest_abs(x: Tensor, ks: list[int]) -> list[float]:
    """The ks[i]-th largest |x| (1 <= k <= x.numel()) for each i, exactly: a sample brackets each
    value, so one pass counts and a select runs on the few entries inside the bracket."""
    zero = torch.zeros((), dtype=torch.float32).expand(x.shape)
    return run_stages(kth_largest_stages([x] * len(ks), zero, ks))


def magnitude_threshold(x, base, density: float) -> float:
    """The k-th largest |x - base|, k = max(1, int(density * numel)) as in mergekit: TIES keeps
    every entry at least that large (entries tied with it too); -1 when everything is kept."""
    return ties_prepare(base, [x], [{"density": density}])["thresholds"][0]


def _top_k(n: int, density: float) -> int | None:
    k = max(1, int(density * n))  # mergekit keeps at least one entry
    return None if density >= 1 or k >= n else k


def _kth_exact(x, base, k: int) -> float:
    """The k-th largest |x - base| by a full select (numpy's introselect is ~25x faster than
    torch.kthvalue on CPU)."""
    a = _abs_delta(x, base)
    a.partition(a.size - k)
    return float(a[a.size - k])


def _brackets(xs, base, ks: list[int]) -> list[tuple[np.float32, np.float32]]:
    """For each x, a value range [lo, hi] that holds the k-th largest |x - base| with high
    probability, estimated from SAMPLE_BLOCKS blocks of whole rows at random places (one read per
    block and checkpoint; the base's blocks are read once for every model)."""
    rows, n = xs[0].shape[0], xs[0].numel()
    b = max(1, -(-SAMPLE // (SAMPLE_BLOCKS * (n // rows))))  # rows per block
    rng = torch.Generator().manual_seed(n)
    starts = (torch.randperm(rows // b, generator=rng)[:SAMPLE_BLOCKS] * b).sort().values.tolist()
    bases = [base[r : r + b].float() for r in starts]
    out = []
    for x, k in zip(xs, ks):
        s = [torch.sub(x[r : r + b], y).float().abs_().reshape(-1) for r, y in zip(starts, bases)]
        out.append(_bracket(torch.stack(s).numpy(), k / n))
    return out


def _bracket(s: np.ndarray, f: float) -> tuple[np.float32, np.float32]:
    """[lo, hi] around the value with a fraction f of entries at least as large, from a sample s
    (blocks x entries). The half-width is Z standard errors of the sampled fraction, the larger
    of the iid error and the error between blocks (entries of one row are alike: an embedding row
    that barely moved)."""
    flat, m = s.reshape(-1).copy(), s.size
    e = min(m - 1, max(0, m - round(f * m)))
    flat.partition(e)
    se_iid = (f * (1 - f) / m) ** 0.5
    se_blocks = (s >= flat[e]).mean(1).std(ddof=1) / len(s) ** 0.5 if len(s) > 1 else 0.0
    d = Z * max(se_iid, float(se_blocks)) + 1 / m
    lo_i, hi_i = int((1 - f - d) * m) - 1, int(np.ceil((1 - f + d) * m))
    flat.partition([i for i in (lo_i, hi_i) if 0 <= i < m] or [e])
    lo = flat[lo_i] if lo_i >= 0 else -np.inf
    hi = flat[hi_i] if hi_i < m else np.inf
    return np.float32(lo), np.float32(hi)


def _count_in_brackets(xs, base, brackets, r0: int, r1: int) -> list[tuple[int, np.ndarray]]:
    """For rows r0..r1-1 of each x: how many |x - base| lie above its bracket, and those inside
    it (only their number when the bracket is one value: bf16 weights tie a lot)."""
    b = base[r0:r1].float()
    buf = torch.empty(b.shape, dtype=torch.float32)
    out = []
    for x, (lo, hi) in zip(xs, brackets):
        a = torch.sub(x[r0:r1], b, out=buf).abs_().numpy().reshape(-1)
        above = int(np.count_nonzero(a > hi))  # numpy: ~20x faster than torch's comparisons here
        if lo == hi:
            out.append((above, np.broadcast_to(lo, np.count_nonzero(a == lo))))  # no copy
            continue
        inside = a >= lo
        inside &= a <= hi
        out.append((above, a[np.flatnonzero(inside)]))
    return out


def _select(x, base, k: int, bracket, parts: list[tuple[int, np.ndarray]]) -> float:
    """The k-th largest magnitude from the chunks' counts and bracket contents; an exact select
    over the whole tensor when the bracket missed it."""
    above, n_inside = sum(c for c, _ in parts), sum(a.size for _, a in parts)
    if not above < k <= above + n_inside:
        return _kth_exact(x, base, k)
    if bracket[0] == bracket[1]:
        return float(bracket[0])
    inside = np.concatenate([a for _, a in parts])
    j = inside.size - (k - above)
    inside.partition(j)
    return float(inside[j])


def _abs_delta(x, base, chunk: int = 1 << 20) -> np.ndarray:
    """|x - base| as a flat float32 array, filled by row chunks (x and base may be tensors or
    merge.Rows read from disk), so no other full-size copy exists."""
    rows = x.shape[0] if len(x.shape) else 1
    per_row = x.numel() // max(rows, 1)
    out = torch.empty(x.numel(), dtype=torch.float32)
    step = max(1, chunk // max(per_row, 1))
    for i in range(0, rows, step):
        o = out[i * per_row : (i + step) * per_row].view(-1)
        # as _taus computes tau: x in its dtype minus the float32 base, rounded once to float32
        torch.sub(x[i : i + step].reshape(-1), base[i : i + step].float().reshape(-1), out=o)
    return out.abs_().numpy()


def _trim(tau: Tensor, thr: float) -> Tensor:
    """Zero, in place, every entry whose magnitude is below the threshold: hardshrink zeroes
    |v| <= lambd, and the float32 just below thr makes that |v| < thr (one pass, no mask)."""
    if thr > 0:
        torch.hardshrink(tau, float(np.nextafter(np.float32(thr), np.float32(0))), out=tau)
    return tau


def sparsify(tau: Tensor, m: dict, rescale: bool, rng: torch.Generator, drop) -> Tensor:
    """In place: `drop(tau, m, rng)` zeroes entries of one task vector (nothing when density is 1,
    as in mergekit); with `rescale` the survivors are scaled back to the vector's L1 norm (as
    mergekit 0.1.5; for DARE about 1/density on large tensors, as in its paper)."""
    if m["density"] >= 1:
        return tau
    before = tau.abs().sum() if rescale else None
    drop(tau, m, rng)
    if rescale:
        after = tau.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            tau.mul_(before / after)
    return tau


def dare_drop(tau: Tensor, m: dict, rng: torch.Generator) -> None:
    tau.mul_(torch.rand(tau.shape, generator=rng) < m["density"])


def _disjoint_merge(base: Tensor, t: Tensor, p: list[dict], glob: dict, elect: bool) -> Tensor:
    """theta0 + lambda * sum(w_i tau_i [agree_i]) / sum(w_i [agree_i]) (divisor 0 -> 1), from the
    stacked task vectors `t` (modified in place). No boolean masks: torch's comparisons are slow
    on CPU, and w_i tau_i * sign clamped at 0 is |w_i tau_i| where it agrees with sign, else 0."""
    w = _weights(p, t[0])
    unit = all(m["weight"] == 1 for m in p)
    if not unit:
        t.mul_(w)
    if elect:
        # elect the sign of the weighted sum (a zero sum counts as +); zero entries never agree
        sign = torch.copysign(torch.ones((), dtype=t.dtype), _sum0(t))
        t.mul_(sign).clamp_(min=0)
    mixed = _sum0(t)
    if elect:
        mixed.mul_(sign)  # exact: the sum of the agreeing entries, each negated, is negated
    if glob["normalize"]:
        if elect:
            agree = t.sign_()  # 1 where model i agrees, else 0
            div = _sum0(agree if unit else agree.mul_(w))
            if unit:
                div.clamp_(min=1)  # agreeing counts: 0 -> 1
            else:
                div.masked_fill_(div == 0, 1.0)
        else:
            div = w.sum()
            div = div if div.abs() >= 1e-8 else torch.ones_like(div)
        mixed /= div
    if glob["lambda"] != 1:
        mixed *= glob["lambda"]
    return mixed.add_(base)


def _normalize(v: Tensor, eps: float) -> Tensor:
    n = torch.linalg.vector_norm(v)
    return v / n if n > eps else v


def slerp(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Spherical interpolation between the base (t=0) and the other model (t=1)."""
    v0, v1, t = base, xs[0], glob["t"]
    dot = float((_normalize(v0, 1e-8) * _normalize(v1, 1e-8)).sum().clamp(-1.0, 1.0))
    if abs(dot) > 0.9995:  # nearly colinear: slerp degenerates, lerp is exact enough
        return (1 - t) * v0 + t * v1
    omega = np.arccos(dot)  # the angle between the two tensors
    s0 = np.sin(omega - omega * t) / np.sin(omega)
    s1 = np.sin(omega * t) / np.sin(omega)
    return float(s0) * v0 + float(s1) * v1


def multislerp(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Multi-SLERP as mergekit 0.1.5 computes it: the weighted mean direction of the (task) vectors,
    moved along the weighted mean of their tangent components at it, scaled to the weighted mean
    norm. Task vectors when a base is given."""
    if len(xs) == 1:
        return xs[0].to(torch.float32, copy=True)
    eps = glob["eps"]
    w = torch.tensor([m["weight"] for m in p], dtype=torch.float32)
    if glob["normalize_weights"]:
        w = w / w.sum()
    # the (task) vectors written straight into one stack, then scaled to units in place: one
    # stack of memory, and the same float32 values as stacking copies
    # (upcast on the way: the models may come in their stored dtype, the base is float32)
    unit = torch.empty((len(xs), xs[0].numel()), dtype=torch.float32, device=xs[0].device)
    for x, row in zip(xs, unit):
        if base is None:
            row.copy_(x.reshape(-1))
        else:
            sub_upcast(x.reshape(-1), base.reshape(-1), row)
    norms = torch.linalg.vector_norm(unit, dim=1)
    unit.div_(norms[:, None] + eps)
    raw = w @ unit  # products with w, never a stack-sized temporary
    if not norms.any():  # a tensor no model changed: the weighted mean norm, so the merge, is 0
        out = torch.zeros_like(unit[0])
    elif torch.linalg.vector_norm(raw) < eps:
        if len(xs) != 2:
            raise UserError(
                "multislerp: the task vectors cancel out (their weighted mean direction is zero), "
                "so the merge is undefined; change the models' weights or use task_arithmetic"
            )
        v = [(x - base if base is not None else x.float()).reshape(-1) for x in xs]  # again
        out = w[0] * v[0] + w[1] * v[1]
    else:
        mean = raw / torch.linalg.vector_norm(raw)
        # r = sum_t w_t (unit_t - (unit_t . mean) mean), the weighted tangent at the mean direction
        # (sum_t w_t unit_t is raw: the same product, so reused); unit's rows are free after its
        # products with mean, so the temporaries go there and the steps work in place
        along = float(w @ (unit @ mean))
        r = raw.sub_(torch.mul(mean, along, out=unit[0]))
        s = torch.linalg.vector_norm(r) + eps
        out = mean.mul_(torch.cos(s)).add_(r.mul_(torch.sin(s) / s)).mul_((norms * w).sum())
    out = out.reshape(xs[0].shape)
    return out.add_(base) if base is not None else out


# --- mergekit's other methods -----------------------------------------------------------------


def breadcrumbs(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2024): in each task vector drop the gamma fraction
    of largest magnitudes (outliers) and the smallest ones, keeping a density fraction; add up."""
    return _sparse_merge(base, xs, p, glob, rng, breadcrumbs_drop, elect=False)


def breadcrumbs_ties(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Breadcrumbs' outlier and small-magnitude cut, then TIES's sign election."""
    return _sparse_merge(base, xs, p, glob, rng, breadcrumbs_drop, elect=True)


def breadcrumbs_drop(tau: Tensor, m: dict, rng=None) -> None:
    """Keep the entries of ascending magnitude rank n_bot+1 .. n_bot+keep, with keep =
    int(density n), n_top = int(gamma n) and n_bot = max(0, n - keep - n_top) as mergekit: when
    density + gamma > 1 fewer outliers go. Cut by value: entries tied with a cut are all kept."""
    n = tau.numel()
    keep = int(m["density"] * n)
    if keep == 0:
        tau.zero_()
        return
    top = n - keep - max(0, n - keep - int(m["gamma"] * n))  # outliers dropped
    ks = [keep + top] + ([top + 1] if top else [])  # k-th largest at the low and high cut
    cuts = _kth_largest_abs(tau.view(-1), ks)
    lo = cuts[0] if keep + top < n else -1.0
    hi = cuts[1] if top else float("inf")
    v = tau.numpy()  # numpy's comparisons: ~3x faster than torch's masked fill here
    a = np.abs(v)
    inside = a >= lo
    inside &= a <= hi
    v *= inside


def _kth_largest(a: np.ndarray, ks: list[int]) -> list[float]:
    """The k-th largest values of a (1 <= k <= a.size) for each k; `a` is reordered in place."""
    idx = [a.size - k for k in ks]
    a.partition(sorted(set(idx)))
    return [float(a[i]) for i in idx]


def della(base, xs, p, glob, rng, prep=None) -> Tensor:
    """DELLA (Deep et al., 2024): MagPrune, a random drop whose keep probability grows with the
    entry's magnitude rank (density - epsilon .. density + epsilon), rescaled; then TIES's sign
    election and disjoint merge."""
    return _sparse_merge(base, xs, p, glob, rng, della_drop, elect=True)


def della_linear(base, xs, p, glob, rng, prep=None) -> Tensor:
    """DELLA's MagPrune drop, then task arithmetic (no sign election)."""
    return _sparse_merge(base, xs, p, glob, rng, della_drop, elect=False)


def della_drop(tau: Tensor, m: dict, rng: torch.Generator) -> None:
    """Keep each entry with probability density - epsilon + 2 epsilon r, r its magnitude rank in
    [0, 1] along dimension 1 (a row of a matrix; a vector is one row), as mergekit 0.1.5 ranks
    (entries of equal magnitude ranked by position)."""
    d, eps = m["density"], m["epsilon"]
    v = tau if tau.dim() >= 2 else tau.view(1, -1)
    cols = v.shape[1]
    rank = _row_ranks(v.abs()) if v.dim() == 2 else _row_ranks_sort(v.abs())
    frac = rank.div_(cols - 1) if cols > 1 else rank.fill_(0.5)  # one column: no ranking
    v.mul_(torch.rand(v.shape, generator=rng) < frac.mul_(2 * eps).add_(d - eps))


def _row_ranks(a: Tensor, chunk: int = 1 << 20) -> Tensor:
    """Each entry's rank 0 .. cols-1 within its row of a (rows, cols) tensor of magnitudes (>= 0),
    ties by column, as float32. A float >= 0 orders as its bits read as an integer, so one int64
    key (the bits, then the column) per entry sorts by numpy's vectorised integer sort, ~10x
    faster than two torch argsorts; the sorted keys' low halves are the columns in rank order.
    By chunks of rows: the keys of ~`chunk` entries at a time."""
    rows, cols = a.shape
    if sys.byteorder != "little" or not rows or not cols:
        return _row_ranks_sort(a)
    a = a.contiguous().view(torch.int32)
    rank = torch.empty((rows, cols), dtype=torch.float32)
    step = max(1, chunk // cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        key = torch.empty((n, cols), dtype=torch.int64)
        halves = key.view(torch.int32).view(n, cols, 2)  # [..., 0] the low 32 bits
        halves[..., 1] = a[r : r + n]
        halves[..., 0] = torch.arange(cols, dtype=torch.int32)
        key.numpy().sort(axis=1)
        halves[..., 1] = 0  # what is left is each rank's column
        order = torch.arange(cols, dtype=torch.float32).expand(n, cols)
        rank[r : r + n].scatter_(1, key, order)
    return rank


def _row_ranks_sort(a: Tensor) -> Tensor:
    """_row_ranks along dimension 1 of a tensor of any shape, by two stable argsorts."""
    return a.argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()


def della_bounds(per_model: list[dict], glob: dict) -> list[tuple[int, str]]:
    """DELLA's keep probabilities density +/- epsilon must be probabilities: (model, problem)."""
    return [
        (
            i,
            f"della keeps entries with probabilities density - epsilon .. density + epsilon, "
            f"which must lie in (0, 1); density {m['density']:g} and epsilon {m['epsilon']:g} "
            f"give {m['density'] - m['epsilon']:g} .. {m['density'] + m['epsilon']:g}",
        )
        for i, m in enumerate(per_model)
        if m["density"] < 1
        and not (m["density"] - m["epsilon"] > 0 and m["density"] + m["epsilon"] < 1)
    ]


def sce(base, xs, p, glob, rng, prep=None) -> Tensor:
    """SCE (Wan et al., 2024, FuseChat): Select the select_topk fraction of entries where the task
    vectors vary most across models, Calculate each model's weight as its mean squared task vector
    (normalised), Erase the entries whose sign disagrees with the elected sign of their sum."""
    t = sce_select(_taus(base, xs), glob["select_topk"])
    w = torch.stack([tau.square().mean() for tau in t])
    total = float(w.sum())
    w = torch.full_like(w, 1 / len(w)) if abs(total) < 1e-6 else w / total
    sign = torch.copysign(torch.ones(()), _sum0(t))
    num = den = None
    for tau, wi in zip(t, w):  # model by model, in place: as mergekit's sums over the stack
        e = torch.mul(tau, sign).gt_(0).mul_(wi)  # the model's weight where its sign agrees
        tau.mul_(e)
        num = tau if num is None else num.add_(tau)
        den = e if den is None else den.add_(e)
    return num.div_(den.clamp_(min=1e-6)).add_(base)


def sce_select(t: Tensor, topk: float) -> Tensor:
    """In place: zero the stacked task vectors except at the topk fraction of entries of largest
    variance across models (of those that vary at all); entries tied with the cut are kept."""
    if topk < 1:
        var = _var0(t)
        k = int(int(torch.count_nonzero(var)) * topk)
        if k == 0:
            return t.zero_()
        t.mul_(var >= _kth_largest_abs(var, [k])[0])
    return t


def _var0(t: Tensor, chunk: int = 1 << 18) -> Tensor:
    """t.var(0, unbiased=False) to the same float32 values (torch computes it in float64), by
    chunks of entries in float64: ~4x faster than torch's strided reduction on CPU."""
    flat = t.reshape(len(t), -1)
    out = torch.empty(flat.shape[1], dtype=t.dtype)
    for a in range(0, flat.shape[1], chunk):
        c = flat[:, a : a + chunk].double()
        c -= c.mean(0)
        out[a : a + chunk] = c.square_().mean(0)
    return out.view(t.shape[1:])


def model_stock(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Model Stock (Jang et al., 2024): interpolate from the base toward the models' average by
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors: over the
    whole tensor, or per row with filter_wise (the base where 1 + (N - 1) cos is ~0)."""
    n = len(xs)
    shape = (n, -1, base.shape[-1]) if glob["filter_wise"] and base.dim() else (n, 1, -1)
    t = _taus(base, xs).view(shape)
    norms = [torch.linalg.vector_norm(tau, dim=-1) for tau in t]
    buf = torch.empty_like(t[0])  # each pair's products, summed along the row (as mergekit)
    cos = [
        (torch.mul(t[i], t[j], out=buf).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(
            -1, 1
        )
        for i in range(n)
        for j in range(i + 1, n)
    ]
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    den = 1 + (n - 1) * c
    w = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den))
    # the models' average, as mergekit sums it (upcast as added), into buf; the base's share into
    # t[0]: both free now, so no fresh tensor besides the task vectors and buf
    out = buf.copy_(xs[0].reshape(buf.shape))
    for x in xs[1:]:  # each upcast into t[0] first: faster than a mixed-dtype sum, same values
        out += t[0].copy_(x.reshape(buf.shape))
    share = torch.mul(base.reshape(buf.shape), 1 - w, out=t[0])
    out.div_(n).mul_(w).add_(share)
    return out.view(base.shape)


def nuslerp(base, xs, p, glob, rng, prep=None) -> Tensor:
    """NuSLERP (mergekit): SLERP between two models (their task vectors when a base is given) at
    t = w2 / (w1 + w2): over the whole tensor (nuslerp_flatten), else per row, or per column with
    nuslerp_row_wise (mergekit's names)."""
    w0, w1 = (m["weight"] for m in p)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = ((x - base) if base is not None else x for x in xs)
    if glob["nuslerp_flatten"]:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif glob["nuslerp_row_wise"]:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    out = _slerp_rows(v0, v1, t)
    if not glob["nuslerp_flatten"] and glob["nuslerp_row_wise"]:
        out = out.transpose(0, -1)
    out = out.reshape(xs[0].shape)
    return out.add_(base) if base is not None else out


def _slerp_rows(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """SLERP of each vector along the last dimension; linear where the two are colinear. A fresh
    tensor; each branch is computed only where some row takes it."""
    u = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u.mul_(v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7))
    cos = u.sum(-1, keepdim=True).clamp(-1, 1)
    del u
    colinear = (1 - cos.square()) <= 1e-16
    if bool(colinear.all()):
        return (1 - t) * v0 + t * v1
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    out = torch.mul(v0, torch.sin((1 - t) * theta)).add_(v1 * torch.sin(t * theta))
    out.div_(torch.sin(theta))
    return torch.where(colinear, (1 - t) * v0 + t * v1, out) if bool(colinear.any()) else out


def karcher(base, xs, p, glob, rng, prep=None) -> Tensor:
    """The Karcher (Riemannian) mean of the models' directions on the unit sphere, by at most
    max_iter steps of gradient descent (stopping below tol), scaled to their mean norm; equal
    weights, as mergekit 0.1.5. Its float32 steps, rounded as mergekit rounds them (each product
    and sum in its order), written into reused buffers instead of ~5 fresh tensors per model and
    step. (Fine-tunes of one base are nearly parallel, and float32 arccos is coarse there: on
    SmolLM2 with 1% noise experts these steps end 3.7e-4 from the float64 mean.) The models may
    come in their stored dtype: each is upcast once, into the buffer its unit vector becomes."""
    if len(xs) == 1:
        return xs[0].to(torch.float32, copy=True)
    tol = glob["tol"]
    flat = [x.reshape(-1).to(torch.float32, copy=True) for x in xs]
    norms = [torch.linalg.vector_norm(f) for f in flat]
    units = [f.div_(nrm) for f, nrm in zip(flat, norms) if float(nrm) > tol]
    del flat
    scale = sum(norms) / len(xs)
    if not units:
        return torch.zeros(xs[0].shape, dtype=torch.float32, device=xs[0].device)
    a = 1 / len(units)
    buf = torch.empty_like(units[0])
    mean = torch.mul(units[0], a)
    for u in units[1:]:
        mean += torch.mul(u, a, out=buf)
    mnorm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mnorm) < tol else mean.div_(mnorm)
    tangent = None
    for _ in range(int(glob["max_iter"])):
        pulls = []  # (unit, dot, a * theta / sin theta) of the units away from the mean
        for u in units:
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:  # a unit at the mean pulls nowhere
                pulls.append((u, dot, a * (theta / torch.sin(theta))))
        if not pulls:  # a zero tangent: below tol, the descent stops
            break
        if tangent is None:
            tangent = torch.empty_like(mean)
        tangent.zero_()
        for u, dot, c in pulls:
            # a * (theta / sin theta) * (u - dot * mean), rounded step by step
            torch.sub(u, torch.mul(mean, dot, out=buf), out=buf)
            tangent += buf.mul_(c)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean.mul_(torch.cos(tn)).add_(tangent.div_(tn).mul_(torch.sin(tn)))  # the exponential map
        if float(un := torch.linalg.vector_norm(mean)) > tol:
            mean.div_(un)
    return mean.mul_(scale).reshape(xs[0].shape)


def arcee_fusion(base, xs, p, glob, rng, prep=None) -> Tensor:
    """Arcee Fusion (Arcee AI, mergekit): take the model's entries whose importance |x - base| times
    the row's KL(softmax x || softmax base) is at least median + 1.5 IQR of all importances; the
    base's elsewhere. Exact quantiles (mergekit samples 1M entries of larger tensors)."""
    x = xs[0]
    pr, q = torch.softmax(x, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (x - base).abs() * (pr * (pr / q).log()).sum(-1, keepdim=True)
    n = importance.numel()  # mergekit's quantile f: the (floor(f (n - 1)) + 1)-th smallest
    ks = [n - int(f * (n - 1)) for f in (0.25, 0.5, 0.75)]
    q1, med, q3 = _kth_largest(importance.reshape(-1).numpy().copy(), ks)
    return base + (x - base) * (importance >= med + 1.5 * (q3 - q1))


def nearswap(base, xs, p, glob, rng, prep=None) -> Tensor:
    """NearSwap (mergekit): move each base entry to the model's by min(1, t / |base - x|), so
    entries closer than t are swapped in whole and distant ones barely move."""
    x = xs[0].float()
    w = (glob["t"] / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base


def ram(base, xs, p, glob, rng, prep=None) -> Tensor:
    """RAM (Reinforced Agent Merging): each entry's task-vector values larger than epsilon in
    magnitude are averaged over the models that have them (one model's value is kept whole)."""
    t, _, count, _ = _ram_terms(base, xs, glob["epsilon"])
    return base + _sum0(t) / count.clamp_(min=1)


def ramplus_tl(base, xs, p, glob, rng, prep=None) -> Tensor:
    """RAM+ (tensor-local): as ram, with each model's unique entries scaled by
    1 + r min(alpha, rho), rho = its shared / unique entry counts in this tensor."""
    t, nz, count, buf = _ram_terms(base, xs, glob["epsilon"])
    unique = count == 1
    count.clamp_(min=1)
    out = base.clone()
    own = torch.empty_like(unique)
    for tau, z in zip(t, nz):
        torch.logical_and(z, unique, out=own)
        n_own = int(own.sum())
        rho = (int(z.sum()) - n_own) / max(n_own, glob["epsilon"])
        lam = 1 + glob["r"] * min(max(rho, 0.0), glob["alpha"])
        # own entries tau * lam, shared ones tau / count, in tau's own memory
        torch.where(own, torch.mul(tau, lam, out=buf), tau.div_(count), out=tau)
        out += tau
    return out


def _ram_terms(base, xs, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Task vectors zeroed where |tau| <= eps, the mask of the others, their count per entry (in
    float32: exact, and what the division upcasts it to) and a free float32 buffer of tau's shape.
    Buffers, not temporaries: a fresh tensor's pages fault in, which cost RAM+ more than its
    arithmetic (2.2M page faults a SmolLM2 merge)."""
    t = _taus(base, xs)
    nz = torch.empty(t.shape, dtype=torch.bool, device=t.device)
    buf = torch.empty_like(t[0])
    for tau, z in zip(t, nz):
        torch.gt(torch.abs(tau, out=buf), eps, out=z)
    t.mul_(nz)
    return t, nz, nz.sum(0, dtype=torch.float32), buf


def passthrough(base, xs, p, glob, rng, prep=None) -> Tensor:
    """One model's tensors, each times its `scale` (mergekit's passthrough; with `slices:` it
    copies each slice's layers, stacking them into a deeper model)."""
    return xs[0].float() * p[0]["scale"]  # at scale 1 the merge copies instead (Method.copies)


# --- the table ------------------------------------------------------------------------------

_unit = (lambda v: v > 0, lambda v: v <= 1, "(0, 1]")
_t = (lambda v: v >= 0, lambda v: v <= 1, "[0, 1]")


def _needs_base(name: str):
    def check(recipe: Recipe) -> None:
        if not recipe.base_model:
            raise ValueError(
                f"base_model: {name} needs a base model (task vectors are theta_t - theta0)"
            )

    return check


def _slerp_check(recipe: Recipe) -> None:
    others = [m for m in recipe.models if m.model != recipe.base_model]
    if not recipe.base_model:
        raise ValueError(
            "base_model: slerp needs a base_model (the t=0 end) and exactly one other model"
        )
    if len(others) != 1:
        raise ValueError(
            f"models: slerp interpolates exactly two models (base_model and one other), got {len(others)} "
            "besides the base; use multislerp for more"
        )


def _inputs(name: str, base: bool, fewest: int, most: int | None = None):
    """mergekit's input contract: a base_model if `base`, and between `fewest` and `most` models
    besides it."""

    def check(recipe: Recipe) -> None:
        if base and not recipe.base_model:
            raise ValueError(f"base_model: {name} needs a base model")
        n = sum(m.model != recipe.base_model for m in recipe.models)
        if n < fewest or (most is not None and n > most):
            many = (
                "exactly" if fewest == most else "at least" if most is None else f"at most {most},"
            )
            raise ValueError(
                f"models: {name} merges {many} {fewest} model{'s' * (fewest > 1)} besides the "
                f"base_model, got {n}"
            )

    return check


def _nearswap_check(recipe: Recipe) -> None:
    _inputs("nearswap", True, 1, 1)(recipe)
    if "t" not in recipe.parameters:
        raise ValueError(
            "parameters.t: nearswap needs t, the distance |base - model| below which an entry is "
            "taken whole from the model (mergekit has no default; e.g. t: 0.0001)"
        )


def _passthrough_check(recipe: Recipe) -> None:
    base = recipe.base_model
    if len(recipe.models) != 1 or (base and Path(base) != Path(recipe.models[0].model)):
        raise ValueError(
            "models: passthrough copies one model (list one model, and no other base_model); "
            "to stack layer ranges of several models, give each its slice under `slices:`"
        )


def _ok(recipe: Recipe) -> None:
    pass


_whole = (lambda v: v >= 0, lambda v: v == int(v), "whole numbers >= 0")
_positive = (lambda v: v >= 0, lambda v: True, "[0, inf)")
_above0 = (lambda v: v > 0, lambda v: True, "(0, inf), e.g. 1e-8")  # multislerp divides by eps
# Ranges of per-model and global parameters, by name, shared by every method that has them.
RANGES = {
    "density": _unit,
    "t": _t,
    "gamma": _t,
    "epsilon": (lambda v: v >= 0, lambda v: v < 1, "[0, 1)"),
    "select_topk": _unit,
    "max_iter": _whole,
    "tol": _positive,
    "eps": _above0,
    "scaling_factor": _positive,
    "common_space_fraction": _t,
    "iterations": _whole,
}


@dataclass(frozen=True, kw_only=True)
class Method:
    fn: Callable[..., Tensor] | None  # None: optimized, see optimize.py
    paper: str
    model_params: dict[str, float] = field(default_factory=dict)  # per model, with defaults
    # a bool default makes a switch: YAML may say true/false or 1/0, the function gets a bool
    global_params: dict[str, float | bool | None] = field(default_factory=dict)  # None: required
    ranges: dict = field(default_factory=lambda: RANGES)
    check: Callable[[Recipe], None] = _ok
    uses_base: bool = True  # the base tensor is read (and passed as `base`)
    base_as_input: bool = False  # linear: a base_model not listed in models joins them (mergekit)
    elementwise: bool = True  # may be applied to row-chunks (and gets the models' rows in their
    # stored dtype, upcasting them as it computes)
    upcasts: bool = False  # whole tensors too: fn takes the models in their stored dtype
    # (per-model, global parameters) -> whether the merge is the one model's tensor unchanged, so
    # that the merge copies it as stored instead of calling fn (passthrough at scale 1)
    copies: Callable[[list[dict], dict], bool] | None = None
    prepare: Callable | None = None  # stages of whole-tensor statistics for chunked runs
    # (model index, problem) for parameter values resolved for one tensor that do not go together
    check_values: Callable[[list[dict], dict], list[tuple[int, str]]] | None = None
    # fn computes on its inputs' device: the merge engine gives it tensors on --device. The others
    # are memory-bound (and use numpy on CPU for speed): they run on the CPU whatever the device.
    on_device: bool = False
    optimized: bool = False  # learns coefficients from data (divmerge, adamerging)
    # fn's merge of a weight matrix depends on which side is the layer's input (Iso-CTS's
    # projections, WUDI's Gram matrix): the engine gives it Conv1D weights (GPT-2), stored
    # [in, out], as nn.Linear's [out, in] (merge.MergePlan.in_out)
    oriented: bool = False
    # optimized methods: the objectives.OBJECTIVES entry minimized; None = `parameters.divergence`
    objective: str | None = None


_gta = {"lambda": 1.0, "int8_mask": False}  # int8_mask only changes mergekit's mask dtype


def _sparse(fn, paper: str, normalize: bool, rescale: bool, extra: dict | None = None) -> Method:
    """A method of mergekit's generalized task arithmetic that sparsifies each task vector at
    random or over its whole tensor (_sparse_merge), so it is called on whole tensors."""
    return Method(
        fn=fn,
        paper=paper,
        model_params={"weight": 1.0, "density": 1.0, **(extra or {})},
        global_params={"normalize": normalize, "rescale": rescale, **_gta},
        check=_needs_base(fn.__name__),
        elementwise=False,
        check_values=della_bounds if "epsilon" in (extra or {}) else None,
    )


_eps = {"epsilon": 0.15}


def _svd_method(fn, paper: str, ranges: dict = RANGES, oriented: bool = False, **params) -> Method:
    """A singular-value method of svd_methods.py: whole 2-D tensors, scaling_factor 1 (the
    papers' and FusionBench's default), the paper's other defaults."""
    return Method(
        fn=fn,
        paper=paper,
        global_params={"scaling_factor": 1.0, **params},
        ranges=ranges,
        check=_needs_base(fn.__name__),
        elementwise=False,
        on_device=True,
        oriented=oriented,
    )


METHODS: dict[str, Method] = {
    "linear": Method(
        fn=linear,
        paper="Wortsman et al., 2022 (model soups)",
        model_params={"weight": 1.0},
        global_params={"normalize": True},
        uses_base=False,
        base_as_input=True,
    ),
    "task_arithmetic": Method(
        fn=task_arithmetic,
        paper="Ilharco et al., 2022",
        model_params={"weight": 1.0},
        global_params={"normalize": False, **_gta},
        check=_needs_base("task_arithmetic"),
    ),
    "ties": Method(
        fn=ties,
        paper="Yadav et al., 2023",
        model_params={"weight": 1.0, "density": 1.0},
        global_params={"normalize": True, **_gta},
        check=_needs_base("ties"),
        prepare=ties_prepare_stages,
    ),
    "dare_linear": _sparse(dare_linear, "Yu et al., 2024", normalize=False, rescale=True),
    "dare_ties": _sparse(
        dare_ties, "Yu et al., 2024 + Yadav et al., 2023", normalize=False, rescale=True
    ),
    "slerp": Method(
        fn=slerp,
        paper="Shoemake, 1985; Jang et al., 2024",
        global_params={"t": 0.5},
        check=_slerp_check,
        elementwise=False,
    ),
    "multislerp": Method(
        fn=multislerp,
        paper="Goddard et al., 2024 (mergekit)",
        model_params={"weight": 1.0},
        global_params={"normalize_weights": True, "eps": 1e-8},
        elementwise=False,
        upcasts=True,
    ),
    "breadcrumbs": _sparse(
        breadcrumbs,
        "Davari & Belilovsky, 2024 (Model Breadcrumbs, ECCV)",
        normalize=False,
        rescale=False,
        extra={"gamma": 0.01},
    ),
    "breadcrumbs_ties": _sparse(
        breadcrumbs_ties,
        "Davari & Belilovsky, 2024 + Yadav et al., 2023",
        normalize=False,
        rescale=False,
        extra={"gamma": 0.01},
    ),
    "della": _sparse(
        della, "Deep et al., 2024 (DELLA-Merging)", normalize=True, rescale=True, extra=_eps
    ),
    "della_linear": _sparse(
        della_linear, "Deep et al., 2024 (DELLA-Merging)", normalize=False, rescale=True, extra=_eps
    ),
    "sce": Method(
        fn=sce,
        paper="Wan et al., 2024 (FuseChat: SCE)",
        global_params={"select_topk": 1.0, "int8_mask": False},
        check=_needs_base("sce"),
        elementwise=False,
    ),
    "model_stock": Method(
        fn=model_stock,
        paper="Jang et al., 2024 (Model Stock, ECCV)",
        global_params={"filter_wise": False},
        check=_inputs("model_stock", True, 2),
        elementwise=False,
        upcasts=True,
    ),
    "nuslerp": Method(
        fn=nuslerp,
        paper="Goddard et al., 2024 (mergekit); Shoemake, 1985",
        model_params={"weight": 1.0},
        global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
        check=_inputs("nuslerp", False, 2, 2),
        elementwise=False,
    ),
    "karcher": Method(
        fn=karcher,
        paper="Karcher, 1977 (Riemannian centre of mass); arXiv 2603.04972",
        global_params={"max_iter": 10, "tol": 1e-5},
        uses_base=False,
        base_as_input=True,
        elementwise=False,
        upcasts=True,
    ),
    "arcee_fusion": Method(
        fn=arcee_fusion,
        paper="Arcee AI, 2025 (mergekit)",
        check=_inputs("arcee_fusion", True, 1, 1),
        elementwise=False,
    ),
    "nearswap": Method(
        fn=nearswap,
        paper="alchemonaut, 2024 (QuartetAnemoi; mergekit)",
        global_params={"t": None},
        ranges={**RANGES, "t": _positive},
        check=_nearswap_check,
    ),
    "ram": Method(
        fn=ram,
        paper="RAM, 2026 (Reinforced Agent Merging, arXiv 2601.13572)",
        global_params={"epsilon": 1e-5},
        ranges={**RANGES, "epsilon": _positive},
        check=_needs_base("ram"),
    ),
    "ramplus_tl": Method(
        fn=ramplus_tl,
        paper="RAM+, 2026 (tensor-local; arXiv 2601.13572)",
        global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
        ranges={**RANGES, "epsilon": _positive, "r": _positive, "alpha": _positive},
        check=_needs_base("ramplus_tl"),
        elementwise=False,
    ),
    "tsv": _svd_method(tsv, "Gargiulo et al., 2025 (Task Singular Vectors: TSV-M, CVPR)"),
    "iso_c": _svd_method(iso_c, "Marczak et al., 2025 (Iso-C, ICML)"),
    "iso_cts": _svd_method(
        iso_cts, "Marczak et al., 2025 (Iso-CTS, ICML)", oriented=True, common_space_fraction=0.8
    ),
    "wudi": _svd_method(
        wudi,
        "Cheng et al., 2025 (WUDI-Merging, ICML)",
        ranges={**RANGES, "lr": (lambda v: v > 0, lambda v: v <= 1, "(0, 1], e.g. 1e-5")},
        oriented=True,
        iterations=300,
        lr=1e-5,
    ),
    "passthrough": Method(
        fn=passthrough,
        paper="Goddard et al., 2024 (mergekit)",
        model_params={"scale": 1.0},
        check=_passthrough_check,
        uses_base=False,
        base_as_input=True,
        copies=lambda p, glob: p[0]["scale"] == 1,
    ),
}

# The data-free methods whose processed task vectors a learned merge can weigh (Remark 3,
# processed.py): task arithmetic's own, sparsified and sign-elected ones, or TSV-M's components.
BASE_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "tsv",  # each expert's orthogonalised singular components (svd_methods.tsv_components)
)

# Optimized methods learn task-arithmetic coefficients from data (optimize.py). Their parameters
# and defaults (paper, Table 9; recipe.OptimizeParams types them and takes its defaults from here).
# A method's global_params are the defaults it overrides or shows in `divmerge methods`.
OPTIMIZE_DEFAULTS = {
    "divergence": "js",  # divmerge only
    "granularity": "layer",
    "init": 0.5,  # Table 9; Algorithm 1 uses 1/n ("uniform")
    "lr": 0.01,
    "epochs": 4,  # or "auto" (epochs.py): stop on the held-back objective
    # which epoch's Gamma is written: the lowest objective on the held-back inputs (a fraction of
    # each task's; None: the training inputs with a fixed epochs, AUTO_EPOCHS's with auto)
    "holdout": None,
    "patience": None,  # epochs: auto only (AUTO_EPOCHS)
    "min_delta": None,
    "max_epochs": None,
    "batch_size": None,  # 4 x number of tasks
    "samples": 200,  # validation rows per task
    "top_k": 256,  # 0.8% of dense bytes for SmolLM2 (bench_optimize); at most the vocabulary
    "gen_batch_size": 16,  # teacher generation batch
    "task_vectors": "auto",  # memory | stream | auto (taskvectors.py)
    "base_method": "task_arithmetic",  # Remark 3: the data-free method whose task vectors Gamma weighs
    # (processed.py; one of BASE_METHODS)
    "coefficients": None,  # a coefficients.json to reproduce instead of learning
    "seed": None,  # with coefficients: the --seed of the run that learned them (DARE's masks)
}
# `epochs: auto`'s defaults: hold back a fifth of each task's inputs, stop after 2 epochs without a
# 1% relative improvement of their objective, or after 20 epochs.
AUTO_EPOCHS = {"holdout": 0.2, "patience": 2, "min_delta": 0.01, "max_epochs": 20}
# What a divergence to the teacher's distributions needs; a method with its own objective (an
# entropy needs no teacher distribution) takes neither, and its teacher cache holds token ids only.
TEACHER_ONLY = ("divergence", "top_k")
METHODS["divmerge"] = Method(
    fn=None,
    paper="Touayouch et al., 2026 (DivMerge, EACL)",
    global_params={k: OPTIMIZE_DEFAULTS[k] for k in ("divergence", "lr", "epochs")},
    optimized=True,
)
METHODS["adamerging"] = Method(
    fn=None,
    paper="Yang et al., 2024 (AdaMerging, ICLR)",
    global_params={"lr": 0.001, "epochs": 5},
    optimized=True,
    objective="entropy",  # no teacher: the entropy of the merged model's predictions
)
