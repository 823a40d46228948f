"""Napkin math before the work: peak memory, device memory and disk a learned merge will need,
from headers, configs and the rendered prompts only (no weights read).

The terms, for a batch of B sequences of T tokens, hidden size H, vocabulary V, L blocks:
- theta0 once, as the model's parameters, in the compute dtype;
- `memory` mode: every dense tau in its storage dtype, plus every merged weight for the step;
- `stream` mode: the merged tensors outside blocks, one block's merged weights and one tau;
  under an FSDP launch theta0's blocks are divided among the processes (taskvectors.shard_base);
- activations: all of every block (memory) or each block's input plus one block's internals
  (stream, recomputed block by block), and the logits with the objective's temporaries;
- the process itself (torch, transformers), measured on these machines.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import psutil
import torch

from .checkpoint import human_size, parse_size
from .layers import block_of
from .methods import METHODS
from .objectives import DIVERGENCES
from .slices import tensor_inputs
from .svd_methods import (
    MATMUL_FLOPS,
    SVD_FLOPS,
    SVD_METHODS,
    from_factors,
    svd_flops,
    work,
)
from .taskvectors import KEEP_BYTES, fsdp_launch

RUNTIME_BYTES = 600 * 10**6  # python + torch + transformers + accelerate, imported (RSS)
LOGIT_COPIES = 6  # logits, log-softmax, softmax and gradients in float32 (calibrated: bench_scale)
MAX_MEMORY_ENV = "DIVMERGE_MAX_MEMORY"


@dataclass(frozen=True)
class Estimate:
    memory_bytes: int  # peak memory of the learning phase in `memory` mode (CPU: host)
    stream_bytes: int  # the same in `stream` mode
    teacher_bytes: int  # peak while one expert generates (float32, one batch of gen_batch_size)
    disk_bytes: int  # the output checkpoint, the teacher cache and the state
    available: int  # memory the process may use (DIVMERGE_MAX_MEMORY, else what is free)

    process_bytes: int = 0  # peak while TIES/DARE-processed task vectors are computed
    # On a GPU the learning phase splits: theta0, the merged weights and the activations live on
    # the device, the held tau (memory mode) and the teacher (which generates on the CPU) on the
    # host. Untested on a GPU (none here); on the CPU device and host are one memory.
    device: str = "cpu"
    device_memory_bytes: int = 0  # memory mode, on the GPU
    device_stream_bytes: int = 0  # stream mode, on the GPU
    host_learn_bytes: dict | None = None  # mode -> host bytes of the learning phase on a GPU
    device_available: int = 0  # free GPU memory

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def peak(self, mode: str) -> int:
        """Peak host memory."""
        return max(self._host_learn(mode), self.teacher_bytes, self.process_bytes)

    def _host_learn(self, mode: str) -> int:
        if self.gpu:
            return (self.host_learn_bytes or {})[mode]
        return self.memory_bytes if mode == "memory" else self.stream_bytes

    def device_peak(self, mode: str) -> int:
        """Peak memory of the device the merge learns on (the host's peak on the CPU)."""
        if not self.gpu:
            return self.peak(mode)
        return self.device_memory_bytes if mode == "memory" else self.device_stream_bytes

    def memory_mode_need(self) -> tuple[int, int]:
        """(what memory mode needs, what is available) where it binds: on a GPU the device, unless
        the host cannot hold the task vectors memory mode keeps there."""
        if self.gpu:
            host = (self.host_learn_bytes or {})["memory"]
            if host > self.available:
                return host, self.available
            return self.device_memory_bytes, self.device_available
        return self.memory_bytes, self.available

    def too_big(self, mode: str) -> str | None:
        """None when the run fits; else one line: which phase does not fit, by how much, and the
        knobs that shrink it."""

        learn_knobs = (
            "parameters.batch_size"
            + (", parameters.task_vectors: stream" if mode == "memory" else "")
            + " or dtype: bfloat16"
        )
        if self.gpu and self.device_peak(mode) > self.device_available:
            return (
                f"this merge needs about {human_size(self.device_peak(mode))} of {self.device} "
                f"memory for learning ({mode} task vectors), "
                f"{human_size(self.device_available)} free; lower it with {learn_knobs}"
            )
        if self.peak(mode) <= self.available:
            return None
        phase, knobs = max(
            (self._host_learn(mode), "learning", learn_knobs),
            (self.teacher_bytes, "teacher generation", "parameters.gen_batch_size"),
            (self.process_bytes, "processing the task vectors", "base_method: task_arithmetic"),
        )[1:]
        return (
            f"this merge needs about {human_size(self.peak(mode))} of memory for {phase} "
            f"({mode} task vectors), {human_size(self.available)} available; lower it with {knobs}"
        )


def available_memory() -> int:
    """DIVMERGE_MAX_MEMORY (bytes, or e.g. 8GB) if set, else what the OS reports available plus
    this process's own resident memory (the estimates count the process from zero), shared
    between the processes of this machine (LOCAL_WORLD_SIZE)."""
    limit = os.environ.get(MAX_MEMORY_ENV)
    if limit:
        return parse_size(limit)
    free = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    return int(free // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def teacher_top_k(plan, params) -> int | str | None:
    """What the teacher cache stores per generated position: the top-k (or full) distribution a
    divergence compares with, or nothing (None: token ids only) for an objective that reads no
    teacher distribution (AdaMerging's entropy)."""
    objective = plan.method.objective or params.divergence
    return params.top_k if objective in DIVERGENCES else None


def estimate_learned(
    plan,
    params,
    compute: torch.dtype,
    seq_len: int,
    n_processes: int = 1,
    device: str = "cpu",
) -> Estimate:
    """The figures for one process of a divmerge/adamerging run of `plan` (see the module doc)."""
    base, cfg = plan.base, plan.base.config
    c = _itemsize(compute)
    floats = [n for n in plan.names if base.dtype(n).is_floating_point]
    numel = {n: _numel(base.shape(n)) for n in floats}
    p_total = sum(numel.values())
    model = p_total * c
    n_experts = len(plan.models)
    processed = params.base_method != "task_arithmetic"  # float32 vectors written to disk
    taus = 0
    for e in plan.models:
        low = getattr(e, "adapter_bytes", None)  # LoRA experts hold factors, not dense tau
        if processed:
            taus += p_total * 4
        elif low is not None:
            taus += low
        else:
            taus += sum(numel[k] * _itemsize(e.dtype(k)) for k in floats)
    blocks: dict[str, int] = {}
    outside = 0
    for n in floats:
        b = block_of(n)
        if b:
            blocks[f"{b[0]}.{b[1]}"] = blocks.get(f"{b[0]}.{b[1]}", 0) + numel[n]
        else:
            outside += numel[n]
    biggest_block = max(blocks.values(), default=0)
    biggest_tensor = max(numel.values(), default=0)
    # a group transformers fuses on load (a layer's experts) is one module tensor, read whole:
    # its stored theta0 and tau, their stacks and the fused result are held while it converts
    # (layout.ModuleView); loading theta0, transformers keeps the stored experts' pages mapped
    # beside their fused copies
    layout = getattr(plan, "layout", None)
    units = [u for u in (layout.units if layout else ()) if u.converter]
    fused = [sum(numel.get(s, 0) for s in u.stored) for u in units]
    biggest_tensor = max([biggest_tensor, *fused])
    convert = 4 * 4 * max(fused, default=0)
    convert += sum(numel.get(s, 0) * _itemsize(base.dtype(s)) for u in units for s in u.stored)

    bs = params.batch_size or 4 * len(plan.models)
    b = math.ceil(bs / n_processes)
    h = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("n_embd") or 0
    inter = cfg.get("intermediate_size") or cfg.get("d_ff") or 4 * h
    heads = cfg.get("num_attention_heads") or cfg.get("num_heads") or 1
    vocab = cfg.get("vocab_size") or 0
    n_blocks = max(len(blocks), 1)
    # one block's saved activations: ~12 hidden-size and 4 intermediate-size tensors per token,
    # plus the attention scores and probabilities
    per_block = b * seq_len * (12 * h + 4 * inter) * c + 2 * b * heads * seq_len * seq_len * c
    logits = LOGIT_COPIES * b * seq_len * vocab * 4
    act_memory = n_blocks * per_block + logits
    act_stream = n_blocks * b * seq_len * h * c + per_block  # logits added below

    memory = RUNTIME_BYTES + model + taus + model + act_memory + convert

    kept = (
        n_experts * biggest_block * 4
    )  # one block's tau, saved from the recomputation (taskvectors)
    held = model
    if fsdp_launch():  # blocks sharded; one block gathered whole, with the gather's buffers
        held = outside * c + (p_total - outside) * c // n_processes + 2 * biggest_block * c
    stream = (
        RUNTIME_BYTES
        + held
        + outside * c
        + biggest_block * (c + 4)  # one block merged, and its float32 accumulator
        # one tau being read, and a float32 accumulator unless the merged tensor is one already
        + biggest_tensor * 4 * (1 if c == 4 else 2)
        + convert
        + act_stream
        # a block's kept tau live during its backward pass, after the logits' memory is freed
        + max(logits, kept if kept <= KEEP_BYTES else 0)
    )
    out_dtype = plan.recipe.out_dtype or plan.recipe.dtype
    out_size = _itemsize(torch.float32) if out_dtype == "float32" else 2
    if out_dtype is None:
        out_size = max((_itemsize(base.dtype(n)) for n in floats), default=4)
    top_k = teacher_top_k(plan, params)
    per_token = 8  # the prompt's and the generation's ids (int64)
    if top_k == "full":
        per_token += vocab * 4
    elif top_k is not None:
        per_token += min(top_k, vocab or 1) * 10
    teacher = len(plan.models) * params.samples * seq_len * per_token
    disk = p_total * out_size + teacher + (n_experts * p_total * 4 if processed else 0)
    # processing holds every expert's float32 tau of one tensor, and a copy
    process = RUNTIME_BYTES + 2 * n_experts * biggest_tensor * 4 if processed else 0
    # a teacher generates alone: float32 weights, its KV cache and one step's logits per sequence
    kv_heads = cfg.get("num_key_value_heads") or heads
    kv = 2 * n_blocks * params.gen_batch_size * seq_len * (h * kv_heads // max(heads, 1)) * 4
    gen = RUNTIME_BYTES + p_total * 4 + kv + 4 * params.gen_batch_size * seq_len * vocab * 4
    gpu = {}
    if device.startswith("cuda"):
        # one tau at a time is moved to the device, in float32
        gpu = dict(
            device_memory_bytes=int(model + model + act_memory + biggest_tensor * 4),
            device_stream_bytes=int(stream - RUNTIME_BYTES),
            # theta0 is loaded on the host before it moves; memory mode holds the tau there
            host_learn_bytes={
                "memory": int(RUNTIME_BYTES + max(model, taus)),
                "stream": int(RUNTIME_BYTES + model),
            },
            device_available=gpu_free(device),
        )
    return Estimate(
        int(memory), int(stream), int(gen), int(disk), available_memory(), int(process),
        device=device, **gpu,
    )  # fmt: skip


def gpu_free(device: str) -> int:
    """Free memory on a CUDA device (DIVMERGE_MAX_MEMORY caps it too, for tests)."""
    free = torch.cuda.mem_get_info(torch.device(device))[0]
    limit = os.environ.get(MAX_MEMORY_ENV)
    if limit:
        free = min(free, parse_size(limit))
    return int(free)


@dataclass(frozen=True)
class SvdEstimate:
    """What a singular-value method (svd_methods.py) computes over the whole model, from headers."""

    method: str
    matrices: int  # 2-D tensors it decomposes or optimizes
    largest: tuple[int, int]  # the largest of them
    svds: int  # SVDs computed in all
    seconds: float  # on one core of these machines (svd_methods.SVD_FLOPS, MATMUL_FLOPS)
    peak_bytes: int  # the largest matrix's inputs, task vectors and the method's own matrices
    steps: int = 0  # WUDI's Adam steps per matrix

    def report(self) -> dict:
        """The estimate as validate's --json gives it (`svd_estimate`)."""
        return dict(
            method=self.method, matrices=self.matrices, largest=list(self.largest),
            svds=self.svds, seconds=round(self.seconds, 3), peak_bytes=self.peak_bytes,
        )  # fmt: skip

    def line(self) -> str:
        r, c = self.largest
        if self.method == "wudi":
            what = (
                f"{self.steps} Adam steps on each of {self.matrices} matrices up to {r}x{c} (no "
                f"SVD), a product with the matrix's {c}x{c} Gram matrix (factored for low-rank "
                "experts) per step"
            )
        else:
            what = f"{self.svds} SVDs of {self.matrices} matrices up to {r}x{c}" + (
                "" if self.method == "iso_c" else " (per expert, and to orthogonalise)"
            )
        return (
            f"{self.method}: {what}; about {_duration(self.seconds)} on one core, "
            f"peak about {human_size(self.peak_bytes)} for the largest matrix"
        )


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.0f} min"


def _largest_value(value, default: float) -> float:
    """The largest number a parameter resolves to on any tensor (scalar, list, or filters)."""
    if value is None:
        return default
    if isinstance(value, list):
        vals = [_largest_value(getattr(v, "value", v), default) for v in value]
        return max(vals, default=default)
    return float(value)


def _rank_bound(inputs: list[tuple]) -> int | None:
    """The sum of the experts' task-matrix ranks on one tensor, from its (checkpoint, stored
    name) inputs, when every expert states one (LoRA adapters on the base, lora.LoraExpert.
    tau_rank), else None."""
    ranks = [getattr(m, "tau_rank", lambda _: None)(name) for m, name in inputs]
    return None if None in ranks else sum(ranks)


def estimate_svd(plan, method: str, factored: bool = True) -> SvdEstimate | None:
    """The SVD work of `method` (a data-free merge, or a learned merge's base_method) on `plan`'s
    tensors, from headers; None for a method that does none. `factored`: the method works on
    LoRA experts' factors (data-free merges; a base_method gets dense task vectors)."""
    if method not in SVD_METHODS:
        return None
    glob = {
        k: _largest_value(plan.recipe.parameters.get(k), d)
        for k, d in METHODS[method].global_params.items()
    }
    matrices = svds = 0
    seconds, peak, largest = 0.0, 0, (0, 0)
    for name in plan.names:
        shape, dtype = plan.out_specs[name]
        if len(shape) != 2 or not dtype.is_floating_point:
            continue
        shape = shape[::-1] if name in plan.in_out else tuple(shape)  # as the method gets it
        inputs = tensor_inputs(plan, name, base=False)
        n = len(inputs)
        # a rebuilt vocabulary's tensors are merged densely (merge._lowrank_taus)
        rank = None if name in plan.vocab_names else _rank_bound(inputs)
        if rank == 0:
            continue  # no expert changes it: merged without an SVD or a step
        shapes, flops, held = work(method, shape, n, glob, rank, factored)
        matrices += 1
        svds += len(shapes)
        seconds += sum(svd_flops(*s) for s in shapes) / SVD_FLOPS + flops / MATMUL_FLOPS
        if _numel(shape) > _numel(largest):
            largest = shape
            # base, n inputs and n task vectors in float32 (from factors: the base alone), and
            # the method's own matrices
            dense_in = 0 if from_factors(method, rank, factored) else 2 * n
            peak = 4 * _numel(shape) * (dense_in + 1 + held)
            peak += 4 * shape[1] ** 2
    if not matrices:
        return None
    steps = int(glob.get("iterations", 0))
    return SvdEstimate(method, matrices, largest, svds, seconds, peak, steps)
