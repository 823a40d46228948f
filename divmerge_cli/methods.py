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

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import Recipe

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
        torch.sub(x, base, out=t[i])
    return t


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
    return _dare_merge(base, xs, p, glob, rng, elect=False)


def dare_ties(base, xs, p, glob, rng, prep=None) -> Tensor:
    """DARE's random drop, then TIES's sign election and disjoint merge."""
    return _dare_merge(base, xs, p, glob, rng, elect=True)


def _dare_merge(base, xs, p, glob, rng, elect: bool) -> Tensor:
    t = _taus(base, xs)
    for tau, m in zip(t, p):
        _dare(tau, m["density"], glob["rescale"], rng)
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
    """ties_prepare as stages (see Stages): bracket each k-th magnitude from a sample of rows, one
    pass over the row chunks counting entries above each bracket and keeping those inside it, then
    a select inside the bracket (an exact select of the whole tensor when it missed)."""
    n = xs[0].numel()
    ks = [_top_k(n, m["density"]) for m in p]
    live = [i for i, k in enumerate(ks) if k is not None]
    thresholds = [-1.0] * len(xs)  # -1: keep everything
    if n <= EXACT_BELOW:
        vals = yield [partial(_kth_exact, xs[i], base, ks[i]) for i in live]
    elif live:
        rows = xs[0].shape[0]
        step = step or max(1, (1 << 20) // (n // rows))
        xl = [xs[i] for i in live]
        (brackets,) = yield [partial(_brackets, xl, base, [ks[i] for i in live])]
        parts = yield [
            partial(_count_in_brackets, xl, base, brackets, r, r + step)
            for r in range(0, rows, step)
        ]
        vals = yield [
            partial(_select, xs[i], base, ks[i], brackets[j], [part[j] for part in parts])
            for j, i in enumerate(live)
        ]
    for i, v in zip(live, vals if live else ()):
        thresholds[i] = v
    return {"thresholds": thresholds}


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


def _dare(tau: Tensor, density: float, rescale: bool, rng: torch.Generator) -> Tensor:
    """In place: Bernoulli(density) mask; with `rescale`, survivors are scaled so the tensor keeps
    its L1 norm (mergekit 0.1.5; about 1/density on large tensors, as in the DARE paper)."""
    if density >= 1:
        return tau
    before = tau.abs().sum() if rescale else None
    tau.mul_(torch.rand(tau.shape, generator=rng) < density)
    if rescale:
        after = tau.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            tau.mul_(before / after)
    return tau


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
        return xs[0]
    eps = glob["eps"]
    w = torch.tensor([m["weight"] for m in p], dtype=torch.float32)
    if glob["normalize_weights"]:
        w = w / w.sum()
    v = torch.stack([(x - base) if base is not None else x for x in xs]).reshape(len(xs), -1)
    norms = torch.linalg.vector_norm(v, dim=1)
    unit = v / (norms[:, None] + eps)
    mean = (unit * w[:, None]).sum(0)
    if not norms.any():  # a tensor no model changed: the weighted mean norm, so the merge, is 0
        out = torch.zeros_like(v[0])
    elif torch.linalg.vector_norm(mean) < eps:
        if len(xs) != 2:
            raise UserError(
                "multislerp: the task vectors cancel out (their weighted mean direction is zero), "
                "so the merge is undefined; change the models' weights or use task_arithmetic"
            )
        out = w[0] * v[0] + w[1] * v[1]
    else:
        mean = mean / torch.linalg.vector_norm(mean)
        tangent = unit - (unit @ mean)[:, None] * mean
        r = (tangent * w[:, None]).sum(0)
        s = torch.linalg.vector_norm(r) + eps
        out = (mean * torch.cos(s) + r * torch.sin(s) / s) * (norms * w).sum()
    out = out.reshape(xs[0].shape)
    return out + base if base is not None else out


def passthrough(base, xs, p, glob, rng, prep=None) -> Tensor:
    """One model's tensors, each times its `scale` (mergekit's passthrough; with `slices:` it
    copies each slice's layers, stacking them into a deeper model)."""
    return xs[0].float() * p[0]["scale"]


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


def _passthrough_check(recipe: Recipe) -> None:
    base = recipe.base_model
    if len(recipe.models) != 1 or (base and Path(base) != Path(recipe.models[0].model)):
        raise ValueError(
            "models: passthrough copies one model (list one model, and no other base_model); "
            "to stack layer ranges of several models, give each its slice under `slices:`"
        )


def _ok(recipe: Recipe) -> None:
    pass


_positive = (lambda v: v > 0, lambda v: True, "(0, inf), e.g. 1e-8")  # multislerp divides by it

# Ranges of per-model and global parameters, by name, shared by every method that has them.
RANGES = {"density": _unit, "t": _t, "eps": _positive}


@dataclass(frozen=True, kw_only=True)
class Method:
    fn: Callable[..., Tensor] | None  # None: optimized, see optimize.py
    paper: str
    model_params: dict[str, float] = field(default_factory=dict)  # per model, with defaults
    # a bool default makes a switch: YAML may say true/false or 1/0, the function gets a bool
    global_params: dict[str, float | bool] = field(default_factory=dict)
    ranges: dict = field(default_factory=lambda: RANGES)
    check: Callable[[Recipe], None] = _ok
    uses_base: bool = True  # the base tensor is read (and passed as `base`)
    base_as_input: bool = False  # linear: a base_model not listed in models joins them (mergekit)
    elementwise: bool = True  # may be applied to row-chunks
    prepare: Callable | None = None  # stages of whole-tensor statistics for chunked runs
    optimized: bool = False  # learns coefficients from data (divmerge, adamerging)
    # optimized methods: the objectives.OBJECTIVES entry minimized; None = `parameters.divergence`
    objective: str | None = None


_gta = {"lambda": 1.0, "int8_mask": False}  # int8_mask only changes mergekit's mask dtype

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
    "dare_linear": Method(
        fn=dare_linear,
        paper="Yu et al., 2024",
        model_params={"weight": 1.0, "density": 1.0},
        global_params={"normalize": False, "rescale": True, **_gta},
        check=_needs_base("dare_linear"),
        elementwise=False,
    ),
    "dare_ties": Method(
        fn=dare_ties,
        paper="Yu et al., 2024 + Yadav et al., 2023",
        model_params={"weight": 1.0, "density": 1.0},
        global_params={"normalize": False, "rescale": True, **_gta},
        check=_needs_base("dare_ties"),
        elementwise=False,
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
    ),
    "passthrough": Method(
        fn=passthrough,
        paper="Goddard et al., 2024 (mergekit)",
        model_params={"scale": 1.0},
        check=_passthrough_check,
        uses_base=False,
        base_as_input=True,
    ),
}

# Optimized methods learn task-arithmetic coefficients from data (optimize.py). Their parameters
# and defaults (paper, Table 9; recipe.OptimizeParams types them and takes its defaults from here).
# A method's global_params are the defaults it overrides or shows in `divmerge methods`.
OPTIMIZE_DEFAULTS = {
    "divergence": "js",  # divmerge only
    "granularity": "layer",
    "init": 0.5,  # Table 9; Algorithm 1 uses 1/n ("uniform")
    "lr": 0.01,
    "epochs": 4,
    "batch_size": None,  # 4 x number of tasks
    "samples": 200,  # validation rows per task
    "top_k": 256,  # 0.8% of dense bytes for SmolLM2 (bench_optimize); at most the vocabulary
    "gen_batch_size": 16,  # teacher generation batch
    "task_vectors": "auto",  # memory | stream | auto (taskvectors.py)
    "base_method": "task_arithmetic",  # Remark 3: the data-free method whose task vectors Gamma weighs
    "coefficients": None,  # a coefficients.json to reproduce instead of learning
    "seed": None,  # with coefficients: the --seed of the run that learned them (DARE's masks)
}
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
