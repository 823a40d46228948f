"""Data-free merge methods as pure per-tensor functions, and METHODS, the one table of them.

Semantics follow mergekit 0.1.5 for the same YAML keys (see README "Methods").

The contract of a merge function `fn(base, xs, p, glob, rng, prep=None) -> Tensor`, which
merge.merge_tensor relies on:
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
  whole tensor (TIES's magnitude threshold) cannot come from a chunk: `prepare(base, xs, p)`
  computes it once from the whole tensors (streamed as merge.Rows) and every chunk gets it as
  `prep`. Only chunked calls get a `prep`; given None, a function computes it from what it holds.
- `elementwise=False`: one call with the whole tensor. DARE's mask is per element, but its rescale
  keeps each task vector's L1 norm (a whole-tensor sum) and its random stream must not depend on
  how the tensor is cut; SLERP and Multi-SLERP use whole-tensor norms and angles.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .errors import UserError

if TYPE_CHECKING:
    from .recipe import Recipe


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


def task_arithmetic(base, xs, p, glob, rng, prep=None) -> Tensor:
    """theta0 + lambda * sum w_i tau_i (Ilharco et al., 2022)."""
    return _disjoint_merge(base, _taus(base, xs), p, glob, elect=False)


def ties(base, xs, p, glob, rng, prep=None) -> Tensor:
    """TIES (Yadav et al., 2023): trim to the top-density magnitudes, elect signs, disjoint merge."""
    prep = prep or ties_prepare(base, xs, p)
    t = _taus(base, xs)
    thr = torch.tensor(prep["thresholds"], dtype=t.dtype).view(-1, *([1] * base.dim()))
    t.masked_fill_(t.abs() < thr, 0.0)  # trim: density 1 has threshold -1, keeping everything
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


def ties_prepare(base: Tensor, xs: list[Tensor], p: list[dict]) -> dict:
    """Whole-tensor statistics TIES needs before it can run on row chunks. Takes tensors in any
    dtype (or merge.Rows) and holds one float32 |tau| per worker; big tensors use two workers,
    since numpy releases the GIL while it partitions. (A long-lived pool whose threads also call
    torch made the rest of the merge slower: OpenMP threads from several callers contend.)"""
    jobs = [(x, m["density"]) for x, m in zip(xs, p)]
    if xs[0].numel() < 1 << 20:
        return {"thresholds": [magnitude_threshold(x, base, d) for x, d in jobs]}
    with ThreadPoolExecutor(max_workers=min(2, len(jobs))) as pool:
        return {"thresholds": list(pool.map(lambda j: magnitude_threshold(j[0], base, j[1]), jobs))}


def magnitude_threshold(x, base, density: float) -> float:
    """The k-th largest |x - base|, k = max(1, int(density * numel)) as in mergekit: TIES keeps
    every entry at least that large (entries tied with it too). numpy's introselect is ~25x
    faster than torch.kthvalue on CPU."""
    n = x.numel()
    k = max(1, int(density * n))  # mergekit keeps at least one entry
    if density >= 1 or k >= n:
        return -1.0
    a = _abs_delta(x, base)  # one float32 copy, partitioned in place
    a.partition(n - k)
    return float(a[n - k])


def _abs_delta(x, base, chunk: int = 1 << 20) -> np.ndarray:
    """|x - base| as a flat float32 array, filled by row chunks (x and base may be tensors or
    merge.Rows read from disk), so no other full-size copy exists."""
    rows = x.shape[0] if len(x.shape) else 1
    per_row = x.numel() // max(rows, 1)
    out = torch.empty(x.numel(), dtype=torch.float32)
    step = max(1, chunk // max(per_row, 1))
    for i in range(0, rows, step):
        o = out[i * per_row : (i + step) * per_row].view(-1)
        torch.sub(
            x[i : i + step].float().reshape(-1), base[i : i + step].float().reshape(-1), out=o
        )
    return out.abs_().numpy()


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
    stacked task vectors `t` (modified in place)."""
    w = _weights(p, t[0])
    unit = bool((w == 1).all())
    if not unit:
        t.mul_(w)
    if elect:
        # elect the sign of the weighted sum (>= 0 counts as +); zero entries never agree
        sign = torch.where(t.sum(0) >= 0, 1.0, -1.0)
        agree = (t * sign) > 0
        t.mul_(agree)
    mixed = t.sum(0)
    if glob["normalize"]:
        if elect:
            div = agree.sum(0, dtype=t.dtype) if unit else (agree * w).sum(0)
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


def _ok(recipe: Recipe) -> None:
    pass


# Ranges of per-model and global parameters, by name, shared by every method that has them.
RANGES = {"density": _unit, "t": _t}


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
    prepare: Callable | None = None  # whole-tensor statistics for chunked runs
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
        prepare=ties_prepare,
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
}
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
