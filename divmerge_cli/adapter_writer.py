"""A merge written as a PEFT LoRA adapter (`--as-adapter`), beside the checkpoint writer.

`write_adapter` writes Σ_t c_t·τ_t: exact at rank Σ r_t when every τ is low rank (factors side by
side), else truncated by SVD to `--adapter-rank`; `merge_as_adapter` writes any data-free merge so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import DTYPES, Checkpoint, atomic_folder, check_out
from .errors import UserError
from .layout import ModuleView, module_delta, module_view
from .lora import PREFIX, LoraExpert, module_kinds
from .merge import merge_tensor, model_card, tensor_generator, tensor_params
from .models import combine, open_model, tau_of
from .recipe import dump_recipe
from .svd_methods import thin_svd
from .taskvectors import LowRank


def factor(delta: Tensor | LowRank, rank: int | None) -> tuple[Tensor, Tensor, float] | None:
    """(B, A, relative Frobenius error) with B@A ≈ delta: exact for a LowRank when rank is None or
    at least its width, else the best rank-`rank` approximation (Eckart-Young). A LowRank is
    truncated through QR of its factors, so its dense form is never built. None for a zero delta."""
    if isinstance(delta, LowRank):
        b, a = delta.B.float() * delta.scale, delta.A.float()
        if rank is None or rank >= b.shape[1]:
            return (b, a, 0.0) if b.abs().sum() and a.abs().sum() else None
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = thin_svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    else:
        if rank is None:
            raise ValueError("a dense task vector needs a rank")
        u, s, vh = thin_svd(delta.float())
    total = float(s.square().sum())
    if total == 0:
        return None
    k = min(rank or len(s), len(s))
    root = s[:k].sqrt()  # split the singular values evenly: both factors stay well scaled
    err = math.sqrt(max(0.0, float(s[k:].square().sum())) / total)
    return u[:, :k] * root, root[:, None] * vh[:k], err


def save_adapter(
    out: Path,
    base: Checkpoint,
    delta: Callable[[str], Tensor | LowRank | None],
    rank: int | None,
    inputs: list[Path],
    *,
    force: bool = False,
    dtype: torch.dtype = torch.float32,
    base_ref: str | None = None,
    card: str = "",
    files: dict[str, str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    verify: Callable[[], None] | None = None,
) -> dict[str, tuple[int, float]]:
    """Write θ0 + delta(name) (`name`: a stored tensor) as a PEFT LoRA adapter folder at OUT
    (atomically), under the module's names and tensors (a MoE layer's fused experts). nn.Linear
    and nn.Embedding weights become LoRA factors (rank None: exact, needs LowRank deltas); any other
    changed module, or one with a dense delta at exact rank, is saved whole (modules_to_save).
    `verify` runs last, before OUT is in place (MergePlan.check_unchanged).
    Returns {module: (rank, relative Frobenius error)}."""
    check_out(out, force, inputs)
    kinds, theta0 = adapter_modules(base)  # module tensor names from here on
    delta = module_delta(theta0, delta)
    modules: dict[str, list[str]] = {}
    for n in theta0.names:
        modules.setdefault(n.rpartition(".")[0], []).append(n)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    whole: list[str] = []
    if progress:
        progress(0, len(modules), "")
    for i, (mod, names) in enumerate(modules.items()):
        ds = {n: delta(n) for n in names if theta0.dtype(n).is_floating_point}
        w = ds.get(f"{mod}.weight")
        others = [d for n, d in ds.items() if n != f"{mod}.weight" and d is not None]
        lora = kinds.get(mod) in ("linear", "embedding") and w is not None and not others
        if lora and (rank is not None or isinstance(w, LowRank)):
            f = factor(w, rank)
            if f is not None:
                b, a, err = f
                ranks[mod] = (b.shape[1], err)
                if kinds[mod] == "embedding":  # PEFT stores embedding factors transposed
                    tensors[f"{PREFIX}{mod}.lora_embedding_A"] = b.T.to(dtype)
                    tensors[f"{PREFIX}{mod}.lora_embedding_B"] = a.T.to(dtype)
                else:
                    tensors[f"{PREFIX}{mod}.lora_A.weight"] = a.to(dtype)
                    tensors[f"{PREFIX}{mod}.lora_B.weight"] = b.to(dtype)
        elif w is not None or others:
            whole.append(mod)
            for n in names:  # the whole module's new values, exact
                d = ds.get(n)
                x = theta0.get(n)
                if d is not None:
                    x = x.float() + (d.dense() if isinstance(d, LowRank) else d)
                tensors[f"{PREFIX}{n}"] = x.to(dtype if x.is_floating_point() else x.dtype)
        if progress:
            progress(i + 1, len(modules), mod)
    if not ranks:
        raise UserError(
            "--as-adapter: the merge changes no linear or embedding weight; nothing to write"
        )
    r = max(k for k, _ in ranks.values())
    other = {m: k for m, (k, _) in ranks.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,  # alpha = r everywhere (per-module patterns below): PEFT's scale is 1
        target_modules=sorted(ranks),
        rank_pattern=other,
        alpha_pattern=dict(other),
        modules_to_save=whole or None,
        base_model_name_or_path=base_ref,
        task_type=_task_type(base.config),
        lora_dropout=0.0,
        inference_mode=True,
    )
    with atomic_folder(out) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp / "adapter_model.safetensors",
            {"format": "pt"},
        )
        config.save_pretrained(tmp)
        (tmp / "README.md").write_text(card + adapter_card(ranks, whole, rank))
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text)
        if verify:
            verify()
    return ranks


def adapter_modules(base: Checkpoint) -> tuple[dict[str, str], ModuleView]:
    """The base's module kinds, and the base read under the module's tensor names: PEFT applies
    an adapter by module path, so one written under stored names it does not find (a MoE's
    per-expert tensors, GPT-NeoX's `embed_out`) would be silently ignored. UserError when the
    architecture cannot be built or the base would not load as it."""
    kinds = module_kinds(base.config)
    if isinstance(kinds, str):  # only real nn.Linear / nn.Embedding weights become LoRA factors
        raise UserError(f"--as-adapter: {kinds} to find its linear layers; write a full model")
    try:
        return kinds, module_view(base)
    except UserError as e:
        raise UserError(f"--as-adapter: {e}") from None


def _task_type(config: dict) -> str | None:
    """PEFT's task type, so AutoPeftModelFor... picks the right head (None: PeftModel only)."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return "SEQ_2_SEQ_LM" if config.get("is_encoder_decoder") else None


# Relative Frobenius error ||Δ - B·A|| / ||Δ|| above which --adapter-rank warns: the module's
# adapter misses half of its merged change or more. Below it a truncated merge tends to behave
# like the full one (DARE drops 90 % of a task vector's entries and keeps its behaviour).
ADAPTER_ERROR_WARN = 0.5


def lossy_modules(ranks: dict[str, tuple[int, float]]) -> list[tuple[str, float]]:
    """(module, relative error) of the modules above ADAPTER_ERROR_WARN, the worst first."""
    lossy = [(m, e) for m, (_, e) in ranks.items() if e > ADAPTER_ERROR_WARN]
    return sorted(lossy, key=lambda x: -x[1])


def adapter_card(ranks: dict[str, tuple[int, float]], whole: list[str], rank: int | None) -> str:
    how = (
        "exact: the low-rank task vectors side by side"
        if rank is None
        else f"truncated by SVD to rank {rank} per module"
    )
    lines = [
        "",
        "## LoRA adapter",
        "",
        f"Load with `PeftModel.from_pretrained(base, path)`. Ranks: {how}.",
        "The error is ||Δ - B·A||_F / ||Δ||_F for the module's merged task vector Δ.",
        "",
        "| module | rank | relative Frobenius error |",
        "|---|---:|---:|",
        *[f"| `{m}` | {k} | {e:.3e} |" for m, (k, e) in ranks.items()],
    ]
    if whole:
        lines += ["", "Saved whole (modules_to_save): " + ", ".join(f"`{m}`" for m in whole)]
    return "\n".join(lines) + "\n"


def require_low_rank(experts: list, base: Checkpoint) -> None:
    """An exact-rank adapter output needs no full checkpoint among the experts (the base itself
    is fine: its τ is zero)."""
    for e in experts:
        if e.path.resolve() == base.path.resolve():
            continue
        if not isinstance(e, LoraExpert):
            raise UserError(
                f"--as-adapter: {e.where} ({e.path}) is a full checkpoint, whose task vector has "
                "no exact low rank; pass --adapter-rank R to truncate it by SVD"
            )


def write_adapter(
    out: Path,
    base: Checkpoint,
    experts: list,
    coefficient: Callable[[str, int], float],
    rank: int | None = None,
    **kw,
) -> dict[str, tuple[int, float]]:
    """θ0 + Σ_t coefficient(name, t)·τ_t as a PEFT LoRA adapter (see save_adapter for **kw). At
    exact rank (None) every expert must be a LoRA adapter on `base`: a full checkpoint's τ has no
    exact low rank."""
    if rank is None:
        require_low_rank(experts, base)

    def delta(name: str) -> Tensor | LowRank | None:
        return combine(
            [(coefficient(name, t), tau_of(e, name, base)) for t, e in enumerate(experts)]
        )

    inputs = [base.path, *(e.path for e in experts)]
    return save_adapter(out, base, delta, rank, kw.pop("inputs", inputs), **kw)


def linear_coefficients(plan) -> Callable[[str, int], float] | None:
    """c_t(name) with merged = θ0 + Σ c_t·τ_t, for the methods linear in the task vectors
    (task_arithmetic; linear when its weights are normalized or sum to 1); None otherwise."""
    m = plan.recipe.merge_method
    if m not in ("linear", "task_arithmetic"):
        return None

    def coefficient(name: str, t: int) -> float:
        p, g = tensor_params(plan, name)
        w = [x["weight"] for x in p]
        total = sum(w) if g["normalize"] and abs(sum(w)) >= 1e-8 else 1.0
        return g.get("lambda", 1.0) * w[t] / total

    if m == "linear":  # Σ w·θ / Σ w keeps θ0 whole only when the weights end up summing to 1
        for n in plan.names:
            p, g = tensor_params(plan, n)
            if not g["normalize"] and abs(sum(x["weight"] for x in p) - 1) > 1e-6:
                return None
    return coefficient


def merge_as_adapter(
    plan,
    out: Path,
    rank: int | None,
    force: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, tuple[int, float]]:
    """`divmerge run --as-adapter`: the recipe's merge as a PEFT LoRA adapter over its base."""
    r = plan.recipe
    if plan.method.optimized:
        raise UserError(
            f"--as-adapter: {r.merge_method} cannot write an adapter yet; write a full model"
        )
    if plan.routes:  # an adapter keeps its base's tensors and shapes
        what = "slices restack the layers" if r.slices else "the output vocabulary is rebuilt"
        raise UserError(
            f"--as-adapter: {what}, so the merge is no adapter of the base; write a full model"
        )
    if not r.base_model:
        raise UserError(
            "--as-adapter: the recipe needs a base_model (an adapter is a change to it)"
        )
    base = plan.base or open_model(r.base_model, "base_model", resolve=r.resolve_path)
    coefficient = linear_coefficients(plan)
    if coefficient is None and rank is None:
        raise UserError(
            f"--as-adapter: {r.merge_method} is not linear in the task vectors here, so its merged "
            "delta has no exact rank; pass --adapter-rank R (SVD of the merged delta)"
        )
    kw = dict(
        force=force,
        dtype=DTYPES[r.out_dtype or r.dtype or "float32"],
        base_ref=r.resolve_path(r.base_model),  # where the adapter's base is, for AutoPeftModel
        card=model_card(plan),
        files={"divmerge_recipe.yaml": dump_recipe(r)},
        progress=progress,
        inputs=[c.path for c in plan.inputs] + [base.path],
        verify=plan.check_unchanged,
    )
    if coefficient is not None:
        return write_adapter(out, base, plan.models, coefficient, rank, **kw)

    def delta(name: str) -> Tensor | None:
        d = (
            merge_tensor(plan, name, tensor_generator(seed, name), device).to("cpu", torch.float32)
            - base.get(name).float()
        )
        return d if d.any() else None

    return save_adapter(out, base, delta, rank, kw.pop("inputs"), **kw)
