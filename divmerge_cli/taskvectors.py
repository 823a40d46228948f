"""Task vectors tau_t = theta_t - theta0, one notion for every method, and the learned merged model.

An *expert* is anything with checkpoint.Checkpoint's read API (`names`, `shape`, `dtype`, `get`)
plus `tau(name, base)`: its task vector on one tensor in its native form, a dense float32 tensor
(a full checkpoint), a `LowRank` (a LoRA target), or None (zero there), and `tau_is_dense(name)`:
True/False when the headers tell whether that tau is dense, None when only reading tells (so
`stream` classifies full checkpoints without reading them). Data-free methods read experts
through `get` (theta_t rows); the learned loop reads them through `tau`.

How the learned loop holds them is a property of the store, not of the loop:
- `memory`: every dense tau loaded once, stacked per tensor in its storage dtype;
- `stream`: nothing held; each tensor's tau is read from disk when its block runs, once in the
  forward pass and again in the backward pass (the block is recomputed, `torch.utils.checkpoint`),
  so peak memory is theta0 + one block's merged weights + one expert's tau, whatever n is.
Low-rank tau are never densified: the Linear (or Embedding) that owns the tensor adds
sum_t Gamma_t s_t B_t A_t x.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint

from .checkpoint import human_size
from .errors import UserError
from .layers import block_of

MODES = ("memory", "stream")
# in stream mode a block's tau are kept from its recomputation for its backward pass (2 reads a
# step instead of 3) while they take at most this much; above, they are read a third time
KEEP_BYTES = 512 * 2**20


@dataclass(frozen=True)
class LowRank:
    """tau = scale * B @ A (a LoRA update): B [out, r], A [r, in]."""

    B: Tensor
    A: Tensor
    scale: float

    def dense(self) -> Tensor:
        return self.scale * (self.B.float() @ self.A.float())


def dense_tau(expert, name: str, base) -> Tensor | None:
    """The expert's task vector on `name` as a dense float32 tensor (None where it is zero)."""
    tau = expert.tau(name, base)
    return tau.dense() if isinstance(tau, LowRank) else tau


class _Combine(torch.autograd.Function):
    """theta0 + sum_t c_t tau_t, accumulated in float32 and returned in theta0's dtype.

    `taus[t]` gives tau_t (float32 or a storage dtype): a stacked tensor held in memory, or a
    reader that fetches it from disk. Plain autograd would keep a float32 copy of every tau for the
    backward pass; here the backward pass fetches each tau again, since the gradient of
    sum_t c_t tau_t with respect to c_t is just dGamma_t = <tau_t, dW>."""

    @staticmethod
    def forward(ctx, coeff: Tensor, base: Tensor, taus) -> Tensor:
        ctx.taus = taus
        fast = isinstance(taus, Tensor) and taus.device == base.device
        if fast and taus.dtype == base.dtype == torch.float32:
            ctx.save_for_backward(coeff)
            return torch.addmv(base.reshape(-1), taus.reshape(len(taus), -1).t(), coeff).view(
                base.shape
            )
        out = base.to(torch.float32, copy=True)
        read = []
        for t in range(len(taus)):
            tau = taus[t].to(out.device, torch.float32)
            out.add_(tau, alpha=float(coeff[t]))
            if getattr(taus, "keep", False):
                read.append(tau)
        # inside a checkpointed block, saved tensors are dropped in the forward pass and kept
        # from the recomputation until this node's backward: the block's tau are read twice,
        # not three times, and one block of them is held at a time
        ctx.save_for_backward(coeff, *read)
        return out.to(base.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        coeff, *held = ctx.saved_tensors
        taus, flat_grad = (held or ctx.taus), grad.reshape(-1).float()
        if isinstance(taus, Tensor) and taus.dtype == torch.float32 and taus.device == grad.device:
            dc = torch.mv(taus.reshape(len(taus), -1), flat_grad)
        else:
            dc = torch.stack(
                [
                    torch.dot(taus[t].to(flat_grad.device, torch.float32).reshape(-1), flat_grad)
                    for t in range(len(taus))
                ]
            )
        return dc.to(coeff.dtype), None, None


class _Reader(Sequence):
    """tau_t of the dense experts on one tensor, read from disk on every access."""

    def __init__(self, experts: list, name: str, base, keep: bool = False):
        self.experts, self.name, self.base, self.keep = experts, name, base, keep

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, t: int) -> Tensor:
        return dense_tau(self.experts[t], self.name, self.base)


class _Theta0:
    """theta0 as the model's own parameters, in the read API `tau` takes. Where the compute dtype
    cannot hold the stored values exactly (bf16 compute, float32 checkpoint), tau is taken
    against the stored theta0, read from disk: tau must not carry theta0's rounding. So is a
    theta0 sharded across processes (FSDP): this process holds only some of its rows."""

    def __init__(self, params: dict[str, Tensor], ckpt):
        self.params, self.ckpt = params, ckpt
        self._last: tuple[str, Tensor] | None = None  # n experts in a row read one tensor's theta0

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        t = self.params[name].detach()
        if _is_dtensor(t):  # sharded: this process holds some rows only
            return self.ckpt.get(name, start, stop)
        if t.dtype not in (torch.float32, self.ckpt.dtype(name)):
            if self._last is None or self._last[0] != name:
                self._last = (name, self.ckpt.get(name))
            t = self._last[1]
        return t if start is None else t[start:stop]


@dataclass
class TaskVectors:
    """The n experts' task vectors per tensor, as the learned loop needs them.

    For each tensor: the experts whose tau is dense (`dense_idx`) and either their stacked tau
    (`memory`) or nothing (`stream`: read when needed), and the experts whose tau is low rank."""

    names: list[str]
    group_index: dict[str, int]
    experts: list
    base: _Theta0
    mode: str
    dense_idx: dict[str, list[int]]
    stacked: dict[str, Tensor]
    low_rank: dict[str, list[tuple[int, LowRank]]]

    @classmethod
    def load(
        cls,
        experts: list,
        theta0: dict[str, Tensor],
        base_ckpt,
        names: list[str],
        group_index: list[int],
        mode: str = "memory",
    ) -> TaskVectors:
        """Classify every tensor's task vectors (and, in `memory` mode, load the dense ones).
        `theta0` are the model's own parameters: theta0 lives once, in the compute dtype."""
        base = _Theta0(theta0, base_ckpt)
        dense_idx, stacked, low = {}, {}, {}
        for name in names:
            dense_idx[name], low[name], held = [], [], []
            for t, e in enumerate(experts):
                dense = e.tau_is_dense(name)
                if mode == "stream" and dense is not None:  # known from headers: no read
                    if dense:
                        dense_idx[name].append(t)
                    continue
                tau = e.tau(name, base)
                if isinstance(tau, LowRank):
                    low[name].append((t, tau))
                elif tau is not None:
                    dense_idx[name].append(t)
                    if mode == "memory":  # one copy per expert, in the expert's storage dtype
                        held.append(tau.to(e.dtype(name)))
            if held:
                stacked[name] = torch.stack(held)
        gidx = dict(zip(names, group_index))
        return cls(list(names), gidx, list(experts), base, mode, dense_idx, stacked, low)

    @property
    def nbytes(self) -> int:
        """Bytes held for the task vectors (0 when streamed), low-rank factors included."""
        held = sum(t.numel() * t.element_size() for t in self.stacked.values())
        lr = sum(
            x.B.numel() * x.B.element_size() + x.A.numel() * x.A.element_size()
            for v in self.low_rank.values()
            for _, x in v
        )
        return held + lr

    def combine(
        self, name: str, gamma: Tensor, theta0: Tensor | None = None, keep: bool = False
    ) -> Tensor:
        """theta0 + sum over dense experts of Gamma[t, group] tau_t on one tensor (differentiable
        in Gamma); low-rank experts are applied by the Linear that owns the tensor. `theta0`: the
        tensor as the model holds it now (whole again while an FSDP unit runs), by default the
        one captured at load. `keep`: the streamed tau may be saved for the backward pass (only
        inside a checkpointed block)."""
        theta0 = self.base.params[name] if theta0 is None else theta0
        idx = self.dense_idx[name]
        if not idx:
            return theta0
        coeff = gamma[idx, self.group_index[name]]
        taus = (
            self.stacked[name]
            if self.mode == "memory"
            else _Reader([self.experts[t] for t in idx], name, self.base, keep)
        )
        return _Combine.apply(coeff, theta0, taus)


class MergedModel:
    """The student theta0 + sum_t Gamma_t tau_t as a function of Gamma: `logits(gamma, inputs)`.

    In `stream` mode each transformer block builds its merged weights when it runs and frees
    them after; its backward pass recomputes them (non-reentrant activation checkpointing), so
    one block's weights exist at a time. Tensors outside blocks (embeddings, final norm, head)
    are merged for the whole step: they are a fixed size, not one copy per expert.

    Each merge reads theta0 from the module as it is when the module runs, and calls the
    module's own forward with the merged tensors swapped in (not `module(...)` again): under
    FSDP (`shard`) the parameters are whole only between the unit's pre- and post-forward hooks,
    and a second call would let the hooks put theta0 back over the merged tensors."""

    def __init__(self, model: nn.Module, tv: TaskVectors, sharded: bool = False):
        self.model, self.tv, self.sharded = model, tv, sharded
        self.gamma: Tensor | None = None
        self._blocks: dict[str, list[str]] = {}
        outside = []
        for n in tv.names:
            b = block_of(n)
            if tv.mode == "stream" and b:
                self._blocks.setdefault(f"{b[0]}.{b[1]}", []).append(n)
            else:
                outside.append(n)
        self._merge_on_forward(model, outside, stream=False)
        for prefix, names in self._blocks.items():
            held = sum(4 * len(tv.dense_idx[n]) * tv.base.params[n].numel() for n in names)
            self._merge_on_forward(
                model.get_submodule(prefix), names, True, prefix, keep=held <= KEEP_BYTES
            )
        for name, lows in tv.low_rank.items():
            if lows:
                self._add_low_rank(name, lows)

    def logits(self, gamma: Tensor, inputs: dict) -> Tensor:
        self.gamma = gamma
        # no KV cache: a recomputed block would append its keys and values a second time
        return self.model(**inputs, use_cache=False).logits

    def _merge_on_forward(
        self,
        module: nn.Module,
        names: list[str],
        stream: bool,
        prefix: str = "",
        keep: bool = False,
    ) -> None:
        """Make `module` run with theta0 + sum Gamma tau on `names` (its own tensors, full names);
        a streamed block under activation checkpointing, so its merged weights are rebuilt in
        the backward pass instead of kept (`keep`: its tau are, from the recomputation)."""
        plain = module.forward
        local = [n[len(prefix) + 1 :] if prefix else n for n in names]

        def merged(gamma: Tensor, *args, **kwargs):
            params = {
                k: self.tv.combine(n, gamma, _tensor(module, k), keep=keep)
                for k, n in zip(local, names)
            }
            with _reparametrize_module(module, params, tie_weights=True):
                return plain(*args, **kwargs)

        def forward(*args, **kwargs):
            if stream:
                return checkpoint(merged, self.gamma, *args, use_reentrant=False, **kwargs)
            return merged(self.gamma, *args, **kwargs)

        module.forward = forward

    def _add_low_rank(self, name: str, lows: list[tuple[int, LowRank]]) -> None:
        """One forward hook per module that uses the tensor (two when an embedding is tied to the
        head): every expert's factors side by side, A_cat [Σr, in] and B_cat [out, Σr], scaled
        per rank column by coef[j] = Gamma[t_j, g] s_{t_j}, so one pair of matmuls serves n
        experts (one hook per expert held n sets of activations for the backward pass)."""
        g = self.tv.group_index[name]
        a = torch.cat([lr.A.float() for _, lr in lows])
        b = torch.cat([lr.B.float() for _, lr in lows], dim=1)
        idx = torch.tensor([t for t, lr in lows for _ in range(lr.A.shape[0])])
        s = torch.tensor([lr.scale for _, lr in lows for _ in range(lr.A.shape[0])])

        def coef(dtype: torch.dtype) -> Tensor:  # [Σr], differentiable in Gamma
            return (self.gamma[idx.to(self.gamma.device), g] * s.to(self.gamma.device)).to(dtype)

        def linear(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            x = args[0]
            return (
                out
                + ((x @ a.to(x.device, x.dtype).t()) * coef(x.dtype)) @ b.to(x.device, x.dtype).t()
            )

        def embedding(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            # tau[ids] = (B[ids] * coef) @ A: only the looked-up rows of B are touched
            rows = torch.nn.functional.embedding(args[0], b.to(out.device, out.dtype))
            return out + (rows * coef(out.dtype)) @ a.to(out.device, out.dtype)

        users = low_rank_users(self.model, self.tv.base.params[name], name)
        for m in users:  # modules() lists a module once; a tied weight has two users
            m.register_forward_hook(linear if isinstance(m, nn.Linear) else embedding)


def low_rank_users(model: nn.Module, param: Tensor, name: str) -> list[nn.Module]:
    """The modules whose weight is `param` (two when an embedding is tied to the head); a LoRA
    task vector is learned through them, so each must be an nn.Linear or an exact nn.Embedding
    (subclasses, such as Gemma's scaled embedding, change the looked-up rows)."""
    users = [m for m in model.modules() if getattr(m, "weight", None) is param]
    bad = [m for m in users if not (isinstance(m, nn.Linear) or type(m) is nn.Embedding)]
    if param is None or not users or bad or not name.endswith(".weight"):
        kind = type(bad[0]).__name__ if bad else "module that is not an nn.Linear"
        raise UserError(
            f"tensor {name}: a LoRA task vector is learned through an nn.Linear or "
            f"nn.Embedding weight, and this one belongs to a {kind}; merge it with a "
            "data-free method"
        )
    return users


def _tensor(module: nn.Module, name: str) -> Tensor:
    """The parameter or buffer `name` of `module`, as the module holds it now."""
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def _is_dtensor(t: Tensor) -> bool:
    """Whether t is sharded (a DTensor). Told without importing torch.distributed.tensor (a
    second of a data-free merge's start): a DTensor exists only once that module is loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def fsdp_launch() -> bool:
    """True when `accelerate launch --use_fsdp` (or an FSDP accelerate config) started several
    processes: theta0 is then sharded across them (`shard_base`). Read from the launcher's
    environment, since accelerate only turns its own FSDP state on for GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def shard_base(path, ckpt, dtype: torch.dtype, names: list[str], device: str) -> nn.Module:
    """The base model with the transformer blocks' theta0 sharded across the processes by PyTorch
    FSDP2 (`fully_shard`, one unit per block). The tensors outside blocks (embeddings, final norm,
    head) stay whole in every process: they are merged for the whole step anyway, so gathering
    them would only add the gather's buffers to the peak. Each process reads from disk only its
    own rows of every block parameter (FSDP2 gives process r the r-th `torch.chunk` of dim 0)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(torch.device(device).type, (world,))
    from . import hf  # lazy: transformers' models take seconds to import

    model = hf.empty_model(path, dtype)
    model.requires_grad_(False)
    blocks = dict.fromkeys(f"{b[0]}.{b[1]}" for n in names if (b := block_of(n)))
    for prefix in blocks:
        fully_shard(model.get_submodule(prefix), mesh=mesh)
    # the root unit schedules the blocks' gathers; it owns no parameter itself
    outside = {p for p in model.parameters() if not isinstance(p, DTensor)}
    fully_shard(model, mesh=mesh, ignored_params=outside)
    buffers = dict(model.named_buffers())  # to_empty would drop their values
    model.to_empty(device=device)
    for n, b in buffers.items():
        owner, _, leaf = n.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b.to(device)
    model.tie_weights()  # to_empty gave the head and the embeddings a tensor each
    stored = set(ckpt.names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n not in stored:
                raise UserError(f"base_model: the model has a parameter {n} the checkpoint lacks")
            if isinstance(p, DTensor):
                local = p.to_local()
                first = -(-p.shape[0] // world) * rank  # first row of this process's chunk
                local.copy_(ckpt.get(n, first, first + local.shape[0]))
            else:
                p.copy_(ckpt.get(n))
        for n, b in model.named_buffers():
            if n in stored:
                b.copy_(ckpt.get(n))
    return model


def pick_mode(choice: str, memory_bytes: int, available: int) -> tuple[str, str]:
    """(mode, reason) for `parameters.task_vectors`; `auto` streams when memory would not fit."""
    if fsdp_launch():  # a sharded theta0 only works with blocks merged as they run
        if choice == "memory":
            raise UserError(
                "parameters.task_vectors: memory holds every task vector whole in each process; "
                "an FSDP launch (theta0 sharded) needs stream or auto"
            )
        return "stream", (
            f"task_vectors: stream: theta0 sharded across {os.environ['WORLD_SIZE']} processes "
            "(FSDP launch)"
        )
    if choice != "auto":
        return choice, f"task_vectors: {choice} (set in the recipe)"
    if memory_bytes > available:
        return "stream", (
            f"task_vectors: auto chose stream: memory mode needs about {human_size(memory_bytes)}, "
            f"{human_size(available)} available"
        )
    return "memory", (
        f"task_vectors: auto chose memory: it needs about {human_size(memory_bytes)}, "
        f"{human_size(available)} available"
    )
