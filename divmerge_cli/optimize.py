"""DivMerge and AdaMerging: learn task-arithmetic coefficients Gamma with Adam through accelerate.

DivMerge (Eq. 4): min_Gamma sum_t D_{X_t}(theta_t || theta0 + sum Gamma tau), D = JS or KL, on the
teachers' greedy generations (Algorithm 1, B.1). AdaMerging: min_Gamma entropy of the merged
model's predictions at the same positions (the tokens each expert generated on its task's inputs).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import hf
from .adapter_writer import adapter_modules, require_low_rank, write_adapter
from .checkpoint import DTYPES, disk_full_is_user_error, not_finite_input, write_file
from .coefficients import groups_for, initial_gamma
from .epochs import (
    Rule,
    best_epoch,
    budget,
    check_holdout,
    curve_card,
    holdout_split,
    rule_of,
    stop_reason,
)
from .errors import UserError
from .estimate import Estimate, estimate_learned, teacher_top_k
from .hashing import hash_json
from .layout import ModuleView, StoredTheta0
from .merge import (
    MergePlan,
    model_card,
    run_merge,
    tensor_generator,
    tensor_params,
)
from .models import load_scored, mergekit_ref
from .objectives import DIVERGENCES, OBJECTIVES, collate, sample_means
from .processed import process
from .recipe import OptimizeParams, Recipe, dump_recipe, optimize_params  # noqa: F401 - re-exported
from .tasks import check_task, load_rows, load_tasks, render_prompt
from .taskvectors import (
    MergedModel,
    TaskVectors,
    dense_tau,
    fsdp_launch,
    pick_mode,
    shard_base,
)
from .teacher import TeacherSample, default_cache_dir, teacher_samples

Progress = Callable[[str, int, int, str], None]  # (phase, done, total, info)


@dataclass(kw_only=True)
class Problem:
    """Everything the loop needs: teacher samples, the merged model as a function of Gamma."""

    plan: MergePlan
    params: OptimizeParams
    tasks: list[str]  # task of each expert, in the order of Gamma's rows
    samples: list[TeacherSample]
    groups: list[str]
    student: MergedModel
    mode_reason: str  # which task_vectors mode runs, and why
    experts: list  # the task vector sources in stored layout (the writer's; tv's are views)
    stored_index: dict[str, int]  # stored tensor -> its Gamma group (see learned_groups)
    pad_id: int
    seq2seq: bool
    start_id: int | None
    objective: str

    @property
    def tv(self) -> TaskVectors:
        return self.student.tv


def prepare(
    plan: MergePlan,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    main_first=None,
    available: int | None = None,
    work_dir: Path | None = None,
    mode: str | None = None,
) -> Problem:
    """Check the recipe's tasks, build or reuse the teacher cache, load theta0 once (the model's
    own parameters, in the compute dtype) and the task vectors in the chosen mode."""
    recipe = plan.recipe
    params, tasks, names = check_tasks(recipe, plan)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    samples: list[TeacherSample] = []
    for ckpt, task in zip(plan.models, names):
        tick = (lambda d, t, task=task: progress("teacher", d, t, task)) if progress else None
        with main_first() if main_first else nullcontext():
            got = teacher_samples(
                ckpt,  # a folder, or a LoRA expert: the adapter folded into its model
                task,
                tasks[task],
                samples=params.samples,
                top_k=teacher_top_k(plan, params),
                seed=seed,
                cache_dir=cache,
                batch_size=params.gen_batch_size,
                progress=tick,
            )
        samples.extend(got)
    if mode is None:  # the CLI decides before the teacher runs; a direct call decides here
        seq_len = max((len(x.prompt_ids) + len(x.gen_ids) for x in samples), default=1)
        est = estimate_learned(plan, params, compute_dtype(recipe), seq_len, _world(), device)
        need, free = est.memory_mode_need()
        mode, reason = pick_mode(params.task_vectors, need, available or free)
    else:
        reason = f"task_vectors: {mode}"
    tensors, groups, gidx, stored_index = learned_groups(plan, params.granularity)
    base_view = ModuleView(plan.base, plan.layout)
    if fsdp_launch():
        model = shard_base(plan.base.path, base_view, compute_dtype(recipe), tensors, device)
    else:
        model = hf.load_model(plan.base.path, compute_dtype(recipe)).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    state = dict(model.state_dict(keep_vars=True))
    theta0 = {n: state[n] for n in tensors}
    with main_first() if main_first else nullcontext():  # one process writes, the others read
        sources = task_vector_sources(plan, params, seed, work_dir or cache / "processed")
    stored0 = StoredTheta0(plan.base)  # a converted group's theta0, read once for n experts
    experts = [ModuleView(e, plan.layout, stored0) for e in sources]
    tv = TaskVectors.load(experts, theta0, base_view, tensors, gidx, mode)
    tok = hf.load_tokenizer(plan.base.path)
    objective = plan.method.objective or params.divergence
    return Problem(
        plan=plan,
        params=params,
        tasks=names,
        samples=samples,
        groups=groups,
        student=MergedModel(model, tv, fsdp_launch()),
        mode_reason=reason,
        experts=sources,
        stored_index=stored_index,
        pad_id=tok.pad_token_id,
        seq2seq=bool(getattr(model.config, "is_encoder_decoder", False)),
        start_id=getattr(model.config, "decoder_start_token_id", None),
        objective=objective,
    )


def learned_groups(
    plan: MergePlan, granularity: str
) -> tuple[list[str], list[str], list[int], dict[str, int]]:
    """(module tensors Gamma acts on, group names, the group of each, the group of each stored
    tensor). Groups are formed over the layout's units in stored order: the tensors a converter
    fuses (a layer's experts) share one Gamma, and a tied head stored beside its embedding takes
    the embedding's. Integer tensors have none (copied from the base)."""
    layout = plan.layout
    units = [
        u for u in layout.units if not u.copy and plan.base.dtype(u.stored[0]).is_floating_point
    ]
    groups, index = groups_for([u.name for u in units], granularity)
    of_unit = {u.name: g for u, g in zip(units, index)}
    names = [p for u in units for p in u.params]
    gidx = [of_unit[u.name] for u in units for _ in u.params]
    stored = {}
    for u in layout.units:
        owner = layout.of_param.get(u.name)  # a copy's owner: the unit providing the tensor
        if owner is not None and owner.name in of_unit:
            stored.update(dict.fromkeys(u.stored, of_unit[owner.name]))
    return names, groups, gidx, stored


def stored_coefficients(
    plan: MergePlan, stored_index: dict[str, int], gamma: torch.Tensor
) -> Callable[[str], torch.Tensor | None]:
    """Each stored tensor's coefficients Gamma[:, g], for the writer. A floating tensor the
    module does not hold (a stored buffer, a leftover) has no group: it is merged by task
    arithmetic at each task's mean Gamma (for buffers equal in every model, theta0 itself). None:
    copied from the base (integer tensors)."""
    mean = gamma.mean(1)

    def of(name: str) -> torch.Tensor | None:
        if name in stored_index:
            return gamma[:, stored_index[name]]
        return mean if plan.base.dtype(name).is_floating_point else None

    return of


def task_vector_sources(plan: MergePlan, params: OptimizeParams, seed: int, work_dir: Path) -> list:
    """The experts whose task vectors Gamma combines: the models themselves (task arithmetic), or
    their TIES/DARE-processed task vectors (Remark 3), computed once into work_dir."""
    if params.base_method == "task_arithmetic":
        return plan.models
    key = hash_json({"recipe": _recipe_key(plan.recipe), "seed": seed})
    folder = Path(work_dir) / f"processed-{key[:16]}"
    return process(
        plan, plan.models, params.base_method, folder, seed, tensor_generator, tensor_params
    )


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(plan: MergePlan, seed: int = 0, device: str = "cpu") -> Estimate:
    """The estimate before any weight is read: sequence length from the rendered validation
    prompts (tokenized with the base's tokenizer) plus each task's max_new_tokens."""
    params = optimize_params(plan.recipe)
    return estimate_learned(
        plan, params, compute_dtype(plan.recipe), _seq_len(plan, seed), _world(), device
    )


def _seq_len(plan: MergePlan, seed: int) -> int:
    params, tasks, names = check_tasks(plan.recipe, plan)
    tok = hf.load_tokenizer(plan.base.path)
    seq_len = 1
    for task in dict.fromkeys(names):
        spec = tasks[task]
        rows = load_rows(spec.validation, limit=params.samples, seed=seed)
        check_holdout(task, len(rows), rule_of(params).holdout, str(plan.recipe.source))
        ids = tok([render_prompt(task, spec, r) for r in rows])["input_ids"]
        seq_len = max(seq_len, max(map(len, ids), default=0) + spec.max_new_tokens)
    return seq_len


def learning_budget(plan: MergePlan, seed: int = 0) -> dict:
    """The learning phase's worst case (epochs.budget) from the number of validation inputs each
    task will have (no model loaded): what `validate` prints."""
    params, tasks, names = check_tasks(plan.recipe, plan)
    counts = {
        t: len(load_rows(tasks[t].validation, limit=params.samples, seed=seed)) for t in names
    }
    return budget(counts, params, str(plan.recipe.source))


def fit_teacher_batch(
    plan: MergePlan, seed: int = 0, device: str = "cpu"
) -> tuple[MergePlan, Estimate, str | None]:
    """preflight(), with the default gen_batch_size halved until the teacher phase fits the
    memory available (a value the recipe gives is kept). Returns the plan (its recipe carrying
    the lowered value), the estimate and a note saying what was lowered, if anything."""
    seq_len = _seq_len(plan, seed)  # tokenized once; only the batch changes below

    def estimate(p: MergePlan) -> Estimate:
        params = optimize_params(p.recipe)
        return estimate_learned(p, params, compute_dtype(p.recipe), seq_len, _world(), device)

    first = est = estimate(plan)
    params = plan.recipe.parameters
    if "gen_batch_size" in params or est.teacher_bytes <= est.available:
        return plan, est, None
    start = size = optimize_params(plan.recipe).gen_batch_size
    fitted = plan
    while size > 1 and est.teacher_bytes > est.available:
        size //= 2
        recipe = plan.recipe.model_copy(update={"parameters": {**params, "gen_batch_size": size}})
        fitted = dataclasses.replace(plan, recipe=recipe)
        est = estimate(fitted)
    if est.teacher_bytes > est.available:  # not even one sequence at a time: run refuses
        return plan, first, None
    note = f"parameters.gen_batch_size {start} -> {size}: the teacher phase fits in memory"
    return fitted, est, note


def preflight_learned(
    plan: MergePlan, seed: int = 0, device: str = "cpu"
) -> tuple[MergePlan, Estimate, str, str, str | None]:
    """fit_teacher_batch() and the task-vector mode it leaves room for: (plan, estimate, mode,
    reason, note on a lowered gen_batch_size). What `run` and `validate` decide before work."""
    plan, est, lowered = fit_teacher_batch(plan, seed, device)
    mode, reason = pick_mode(optimize_params(plan.recipe).task_vectors, *est.memory_mode_need())
    return plan, est, mode, reason, lowered


def native_low_precision(dtype: str) -> bool:
    """Whether this CPU has native bfloat16 / float16 matrix products (oneDNN's own probe)."""
    probe = {
        "bfloat16": "_is_mkldnn_bf16_supported",
        "float16": "_is_mkldnn_fp16_supported",
    }[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: no warning


def slow_dtype_warning(recipe: Recipe, device: str) -> str | None:
    """A learned merge in bfloat16/float16 on a CPU without native support for it: some of the
    backward pass's matrix products take a scalar fallback (measured 450x slower than float32
    for one SmolLM2-1.7B MLP product on an AVX2 CPU, README: Memory)."""
    if device != "cpu" or recipe.dtype not in ("bfloat16", "float16"):
        return None
    if optimize_params(recipe).coefficients:  # Gamma from a file: no backward pass
        return None
    if native_low_precision(recipe.dtype):
        return None
    return (
        f"dtype: {recipe.dtype} on this CPU (no native {recipe.dtype} matrix products) runs parts "
        "of the learned merge's backward pass on a slow fallback, hundreds of times slower than "
        "float32; use dtype: float32 where memory allows"
    )


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype of the merged forward and backward passes (Gamma and Adam stay float32)."""
    return DTYPES[recipe.dtype] if recipe.dtype else torch.float32


def check_tasks(recipe: Recipe, plan: MergePlan) -> tuple[OptimizeParams, dict, list[str]]:
    """Every expert names a defined task whose validation rows exist and render (no model loaded)."""
    params = optimize_params(recipe)
    where = str(recipe.source)
    tasks = load_tasks(recipe.tasks, recipe.source.parent, where)
    names = []
    for i, e in enumerate(plan.entries):
        if e.task not in tasks:
            raise UserError(
                f"{where}: models[{i}].task: '{e.task}' is not defined under tasks "
                f"(defined: {', '.join(tasks)})"
            )
        check_task(e.task, tasks[e.task], "validation")
        names.append(e.task)
    if len(set(names)) != len(names):
        raise UserError(
            f"{where}: models: two experts name the same task; each task needs its own expert"
        )
    return params, tasks, names


def objective_per_sample(
    forward: Callable[[dict], torch.Tensor],
    samples: list[TeacherSample],
    objective: str,
    pad_id: int,
    seq2seq: bool,
    start_id: int | None,
    device: str,
) -> torch.Tensor:
    """The objective of each sample: its mean over the generated positions (B.1). `forward` maps
    the model inputs to logits."""
    batch = collate(samples, pad_id, seq2seq, start_id).to(device)
    student = batch.student_logits(forward(batch.model_inputs))
    return sample_means(OBJECTIVES[objective](batch.teacher, student), batch.mask)


def per_sample_loss(
    pb: Problem, gamma: torch.Tensor, samples: list[TeacherSample], device: str
) -> torch.Tensor:
    """The objective of each sample under the merged model theta0 + sum Gamma tau."""

    def forward(inputs: dict) -> torch.Tensor:
        return pb.student.logits(gamma, inputs)

    return objective_per_sample(
        forward, samples, pb.objective, pb.pad_id, pb.seq2seq, pb.start_id, device
    )


def model_divergences(
    model_dir: Path,
    samples: list[TeacherSample],
    batch_size: int = 16,
    device: str = "cpu",
) -> dict[str, float]:
    """D_X(teacher || model) for D = JS and KL over the teacher's samples (paper Table 2, Fig. 5)."""
    model, tok = load_scored(model_dir, str(model_dir))
    model = model.to(device)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    start = getattr(model.config, "decoder_start_token_id", None)
    vals: dict[str, list[torch.Tensor]] = {d: [] for d in DIVERGENCES}
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            forward = _once(lambda kw: model(**kw).logits)  # one pass serves both divergences
            for name, got in vals.items():
                got.append(
                    objective_per_sample(
                        forward,
                        samples[i : i + batch_size],
                        name,
                        tok.pad_token_id,
                        seq2seq,
                        start,
                        device,
                    )
                )
    return {name: float(torch.cat(got).mean()) for name, got in vals.items()}


def _once(fn: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
    """`fn`'s first result, returned again on every later call."""
    memo: list[torch.Tensor] = []

    def call(kw: dict) -> torch.Tensor:
        if not memo:
            memo.append(fn(kw))
        return memo[0]

    return call


def task_objectives(
    pb: Problem,
    gamma: torch.Tensor,
    device: str,
    batch_size: int = 16,
    samples: list[TeacherSample] | None = None,
) -> dict[str, float]:
    """Mean objective per task over all its samples, or over `samples` (no gradient): reported
    at init and at the end, and after every epoch on the evaluated inputs (epochs.py)."""
    out = {}
    with torch.no_grad():
        for task in dict.fromkeys(pb.tasks):
            s = [x for x in (pb.samples if samples is None else samples) if x.task == task]
            vals = [
                per_sample_loss(pb, gamma, s[i : i + batch_size], device)
                for i in range(0, len(s), batch_size)
            ]
            out[task] = float(torch.cat(vals).mean())
    return out


def batches(n_samples: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Every step's sample indices: a fresh seeded shuffle of all tasks' samples each epoch."""
    steps = []
    for e in range(epochs):
        perm = torch.randperm(
            n_samples, generator=torch.Generator().manual_seed(seed * 7919 + e)
        ).tolist()
        steps += [perm[i : i + batch_size] for i in range(0, n_samples, batch_size)]
    return steps


@dataclass
class _Run:
    """The loop's state: Gamma, Adam, the step schedule, the log so far, where they are saved;
    the per-epoch objective on the evaluated inputs and the best Gamma so far (epochs.py)."""

    gamma: torch.nn.Parameter
    opt: torch.optim.Adam
    schedule: list[list[int]]
    key: str
    state_file: Path
    log_file: Path
    start: int = 0
    log: list[dict] | None = None
    rule: Rule | None = None
    evaluated: list[int] = dataclasses.field(default_factory=list)  # sample indices
    held: int = 0  # how many of them are held back from training
    curve: list[dict] = dataclasses.field(default_factory=list)  # {epoch, objective, tasks}
    best: torch.Tensor | None = None

    @property
    def chosen(self) -> int:
        return best_epoch([c["objective"] for c in self.curve])

    @property
    def stopped(self) -> str | None:
        return stop_reason([c["objective"] for c in self.curve], self.rule) if self.curve else None


def train(
    pb: Problem,
    seed: int,
    state_dir: Path,
    resume: bool,
    accelerator,
    progress: Progress | None = None,
    first: dict[str, float] | None = None,
) -> tuple[torch.Tensor, list[dict], _Run]:
    """Adam on Gamma. Each process takes a share of every batch; Gamma's gradient is summed across
    processes, so n processes take the same steps as one. Gamma is checkpointed after every step.
    After each epoch the objective is evaluated (epochs.py); returns the best Gamma, the log and
    the run (its curve, chosen epoch and stop reason). `first`: the initial Gamma's objective per
    task on the evaluated inputs, when the caller has it."""
    run = _restore(pb, seed, state_dir, resume, accelerator)
    device = str(accelerator.device)
    if not run.curve:  # epoch 0: the initial Gamma is a candidate too
        _evaluated(pb, run, 0, first or _objectives(pb, run, device))
    per_epoch = len(run.schedule) // run.rule.epochs  # epochs of equal length (batches)
    if progress:
        progress("optimize", run.start, len(run.schedule), "")
    for step in range(run.start, len(run.schedule)):
        if run.stopped:  # a resumed run that had already stopped
            break
        total = _step(pb, run, step, accelerator)
        epoch = step // per_epoch + 1
        gamma = run.gamma.detach().cpu()
        run.log.append({"step": step + 1, "epoch": epoch, "loss": total, "gamma": gamma.tolist()})
        if (step + 1) % per_epoch == 0:
            run.log[-1]["eval"] = _evaluated(pb, run, epoch, _objectives(pb, run, device))
        if accelerator.is_main_process:
            _save(run, step + 1)
        if progress:
            done, total_steps = step + 1, len(run.schedule)
            if run.stopped:  # stopped early: the bar ends here
                total_steps = done
            info = f"epoch {epoch}/{run.rule.epochs}, loss {total:.4f}"
            progress("optimize", done, total_steps, info)
    return run.best.detach().cpu(), run.log, run


def _objectives(pb: Problem, run: _Run, device: str) -> dict[str, float]:
    """The objective per task on the evaluated inputs at the current Gamma (no gradient)."""
    return task_objectives(pb, run.gamma, device, samples=[pb.samples[i] for i in run.evaluated])


def _evaluated(pb: Problem, run: _Run, epoch: int, tasks: dict[str, float]) -> float:
    """Record epoch's objective (the mean over tasks, as Eq. 4 sums them) and keep its Gamma if it
    is the best so far; returns the objective."""
    value = sum(tasks.values()) / len(tasks)
    run.curve.append({"epoch": epoch, "objective": value, "tasks": tasks})
    if run.chosen == epoch:
        run.best = run.gamma.detach().clone()
    return value


def _restore(pb: Problem, seed: int, state_dir: Path, resume: bool, accelerator) -> _Run:
    """A fresh Gamma and Adam, or the saved ones under --resume (same recipe, data and seed)."""
    p = pb.params
    gamma = torch.nn.Parameter(
        initial_gamma(p.init, len(pb.tasks), len(pb.groups)).to(accelerator.device)
    )
    rule = rule_of(p)
    where = str(pb.plan.recipe.source)
    trained, held = holdout_split([s.task for s in pb.samples], rule.holdout, seed, where)
    # the schedule's indices are into pb.samples; without a holdout `trained` is every sample
    steps = batches(len(trained), p.batch_size or 4 * len(pb.tasks), rule.epochs, seed)
    run = _Run(
        gamma,
        torch.optim.Adam([gamma], lr=p.lr),
        [[trained[i] for i in step] for step in steps],
        run_key(pb, seed),
        state_dir / "state.pt",
        state_dir / "train_log.jsonl",
        log=[],
        rule=rule,
        evaluated=held or trained,
        held=len(held),
    )
    if resume and run.state_file.is_file():
        try:
            # onto the CPU: a run on a GPU saved Adam's moments there, and a machine without one
            # cannot read them back; load_state_dict puts them beside Gamma
            st = torch.load(run.state_file, weights_only=True, map_location="cpu")
            steps = int(st["step"])
        except Exception:  # noqa: BLE001 - any unreadable state is the same for the user
            raise UserError(
                f"--resume: {run.state_file} is damaged; rerun without --resume to start over"
            ) from None
        if st.get("key") != run.key:
            raise UserError(
                f"--resume: {run.state_file} belongs to a different recipe, data or seed; "
                "rerun without --resume"
            )
        if "curve" not in st:
            raise UserError(
                f"--resume: {run.state_file} was saved by an older divmerge (no per-epoch "
                "objective); rerun without --resume to start over"
            )
        run.log = _read_log(run.log_file, steps)
        gamma.data.copy_(st["gamma"])
        run.opt.load_state_dict(st["opt"])
        run.start = st["step"]
        run.curve = st["curve"]
        run.best = st["best"].to(accelerator.device)
    if accelerator.is_main_process:  # the log is followable while the run goes (tail -f)
        state_dir.mkdir(parents=True, exist_ok=True)
        write_file(run.log_file, "".join(json.dumps(x) + "\n" for x in run.log), STATE)
    return run


def _read_log(path: Path, steps: int) -> list[dict]:
    """The first STEPS records of train_log.jsonl, one per step in order (a line past them is a
    step whose state was never saved). A garbled or missing record is refused: the resumed run
    would report a wrong trace and step count."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    if len(lines) < steps:
        raise UserError(
            f"--resume: {path} holds {len(lines)} steps but the optimizer state is at step "
            f"{steps}: the log was cut short; rerun without --resume to start over"
        )
    log = []
    for i, line in enumerate(lines[:steps], start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or record.get("step") != i:
            raise UserError(
                f"--resume: {path}: line {i} is not the record of step {i} (garbled); the "
                "optimizer state is fine, but its log is not: rerun without --resume to start over"
            )
        log.append(record)
    return log


def _step(pb: Problem, run: _Run, step: int, accelerator) -> float:
    """One Adam step on this process's share of the batch; returns the batch's mean loss."""
    idx = run.schedule[step]
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = idx[rank::world]
    if mine or pb.student.sharded:
        # divide by the whole batch, not by this share: summed over ranks, the gradients and
        # losses are those of the batch mean. Sharded, every rank must run the model (the
        # gathers of theta0 are collective): one without a share runs a sample at weight 0
        batch = [pb.samples[i] for i in mine or idx[:1]]
        loss = per_sample_loss(pb, run.gamma, batch, str(accelerator.device)).sum()
        loss = loss / len(idx) if mine else loss * 0
    else:
        # a rank with no sample still joins the all-reduce below, with a zero gradient
        loss = run.gamma.sum() * 0
    run.opt.zero_grad()
    loss.backward()
    total = loss.detach().clone()
    if world > 1:
        run.gamma.grad = accelerator.reduce(run.gamma.grad, reduction="sum")
        total = accelerator.reduce(total, reduction="sum")
    if not math.isfinite(float(total)) or not torch.isfinite(run.gamma.grad).all():
        raise _not_finite(pb, run, step, float(total))
    run.opt.step()
    return float(total)


def _not_finite(pb: Problem, run: _Run, step: int, loss: float) -> UserError:
    if step == 0:  # nothing learned yet: the starting point, or an expert holding NaN or Inf
        bad = not_finite_input((c, n) for c in pb.plan.inputs for n in c.names)
        return bad or UserError(
            f"step 1: the loss at the initial Gamma (parameters.init = {pb.params.init}) is not "
            f"finite ({loss}); nothing was kept; use a smaller init (the paper uses 0.5 or 1/n)"
        )
    return UserError(
        f"step {step + 1}: the loss is not finite ({loss}); stopped with the Gamma of step "
        f"{step} kept in {run.state_file}; lower parameters.lr and rerun with --resume"
    )


STATE = "the optimizer state"


def _save(run: _Run, step: int) -> None:
    """Append the step to the log, then replace state.pt whole. Serialized in memory first: on a
    full disk torch.save fails with a C++ message and leaves an empty file; a plain write says
    ENOSPC and write_file removes its temporary file."""
    line = json.dumps(run.log[-1]) + "\n"
    state = {"key": run.key, "gamma": run.gamma.detach().cpu(), "opt": run.opt.state_dict()}
    state.update(curve=run.curve, best=run.best.detach().cpu())
    buf = io.BytesIO()
    torch.save({**state, "step": step}, buf)
    folder = run.state_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    with disk_full_is_user_error(folder, len(line) + buf.tell(), STATE):
        with open(run.log_file, "a") as f:  # a torn last line is past state.pt's step: dropped
            f.write(line)
    write_file(run.state_file, buf.getvalue(), STATE)


# Parameters that say how a learned merge runs, not what it computes: the teacher's batch
# changes no sample (they are in the key) and may be lowered to fit the memory free at the time
# (fit_teacher_batch); where the task vectors live (memory or streamed) changes no value. A
# resumed run or reused processed vectors must not depend on them.
EXECUTION = ("gen_batch_size", "task_vectors")


def _recipe_key(recipe: Recipe) -> dict:
    """The recipe as a hash key, without its execution settings."""
    data = recipe.model_dump(mode="json", exclude={"source"})
    for k in EXECUTION:
        data["parameters"].pop(k, None)
    return data


def run_key(pb: Problem, seed: int) -> str:
    return hash_json(
        {
            "recipe": _recipe_key(pb.plan.recipe),
            "seed": seed,
            "samples": [(s.task, s.prompt_ids.tolist(), s.gen_ids.tolist()) for s in pb.samples],
        }
    )


def state_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.divmerge-state"


def run_optimized(
    plan: MergePlan,
    out: Path,
    *,
    force: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: Path | None = None,
    resume: bool = False,
    shard_bytes: int = 5 * 10**9,
    progress: Progress | None = None,
    available: int | None = None,
    mode: tuple[str, str] | None = None,
    as_adapter: bool = False,
    adapter_rank: int | None = None,
) -> dict:
    """Learn Gamma, then write theta0 + sum Gamma tau like any merge, plus coefficients.json, a
    mergekit recipe that reproduces it, and the training log. Returns a summary. The caller has
    planned the merge (plan_merge) and checked OUT (check_out). `as_adapter`: write a PEFT LoRA
    adapter instead (exact at rank sum r_t, or SVD-truncated to `adapter_rank`)."""
    from accelerate import Accelerator

    if optimize_params(plan.recipe).coefficients:
        return write_fixed(
            plan,
            out,
            force=force,
            seed=seed,
            shard_bytes=shard_bytes,
            progress=progress,
            adapter=(adapter_rank,) if as_adapter else None,
        )
    acc = Accelerator(cpu=device == "cpu")
    torch.manual_seed(seed)
    if acc.num_processes > 1:  # every process must hold the task vectors the same way
        from accelerate.utils import broadcast_object_list

        mode = broadcast_object_list([mode])[0]
    pb = prepare(
        plan,
        seed=seed,
        cache_dir=cache_dir,
        device=str(acc.device),
        progress=progress,
        main_first=acc.main_process_first,
        available=available,
        work_dir=state_dir_for(out),
        mode=mode[0] if mode else None,
    )
    if mode:
        pb.mode_reason = mode[1]
    init = initial_gamma(pb.params.init, len(pb.tasks), len(pb.groups))
    before = task_objectives(pb, init.to(acc.device), str(acc.device))
    # without a holdout every sample is evaluated: the curve's objectives are before's and after's
    whole = rule_of(pb.params).holdout is None
    gamma, log, run = train(pb, seed, state_dir_for(out), resume, acc, progress, whole and before)
    if whole:
        after = run.curve[run.chosen]["tasks"]
    else:
        after = task_objectives(pb, gamma.to(acc.device), str(acc.device))
    epochs = epochs_record(run)
    summary = {
        "tasks": pb.tasks,
        "groups": pb.groups,
        "gamma": gamma.tolist(),
        "objective": pb.objective,
        "before": before,
        "after": after,
        "steps": len(log),
        **epochs,
        "task_vectors": pb.tv.mode,
        "task_vectors_reason": pb.mode_reason,
    }
    if acc.is_main_process:
        files = {
            "coefficients.json": json.dumps(
                {**coefficients_json(pb, gamma), "epochs": epochs}, indent=2
            )
            + "\n",
            "train_log.jsonl": "".join(json.dumps(x) + "\n" for x in log),
        }
        coeff = stored_coefficients(pb.plan, pb.stored_index, gamma)
        if as_adapter:
            summary["adapter"] = write_learned_adapter(
                reproducing(pb.plan, seed),
                out,
                pb.experts,
                lambda n, t: float(coeff(n)[t]),
                adapter_rank,
                force=force,
                files=files,
                card_extra=card_extra(pb, gamma, before, after) + card_epochs(run),
                progress=_merge_tick(progress),
            )
        else:
            if pb.params.base_method == "task_arithmetic":  # mergekit computes the same tensors
                files["mergekit_task_arithmetic.yaml"] = mergekit_yaml(pb, gamma)
            run_merge(
                reproducing(pb.plan, seed),
                out,
                force=force,
                seed=seed,
                shard_bytes=shard_bytes,
                device=str(acc.device),
                progress=_merge_tick(progress),
                tensors=lambda n: merged_tensor(pb.plan, pb.experts, coeff, n),
                extra_files=files,
                card_extra=card_extra(pb, gamma, before, after) + card_epochs(run),
            )
        shutil.rmtree(state_dir_for(out), ignore_errors=True)
    acc.wait_for_everyone()
    return summary


def epochs_record(run: _Run) -> dict:
    """Which epoch's Gamma was written and why the run stopped, with the per-epoch objective on
    the evaluated inputs: for the summary and coefficients.json."""
    return {
        "epoch": run.chosen,
        "stopped": run.stopped,
        "evaluated_on": "held_back" if run.held else "training",
        "curve": [{"epoch": c["epoch"], "objective": c["objective"]} for c in run.curve],
    }


def card_epochs(run: _Run) -> str:
    return curve_card(run.curve, run.chosen, run.stopped, run.rule, run.held)


def reproducing(plan: MergePlan, seed: int) -> MergePlan:
    """The plan whose written divmerge_recipe.yaml reproduces the merge: the recipe as run, plus
    `coefficients: coefficients.json` (resolved beside the recipe): Gamma fixed, nothing learned."""
    params = {**plan.recipe.parameters, "coefficients": "coefficients.json", "seed": seed}
    return dataclasses.replace(plan, recipe=plan.recipe.model_copy(update={"parameters": params}))


def write_fixed(
    plan: MergePlan,
    out: Path,
    *,
    force: bool,
    seed: int,
    shard_bytes: int,
    progress: Progress | None = None,
    adapter: tuple[int | None] | None = None,
) -> dict:
    """Write theta0 + sum Gamma tau with Gamma read from `parameters.coefficients` (no teacher,
    no model loaded): what a learned merge's divmerge_recipe.yaml runs. `adapter`: (rank,) to
    write a PEFT LoRA adapter instead (--as-adapter)."""
    params = optimize_params(plan.recipe)
    seed = seed if params.seed is None else params.seed
    source = Path(plan.recipe.resolve_path(params.coefficients))
    where = f"{plan.recipe.source}: parameters.coefficients"
    try:
        saved = json.loads(source.read_text())
        groups, rows = saved["groups"], saved["gamma"]
        tasks = [e.task for e in plan.entries]
        gamma = torch.tensor([[float(rows[t][g]) for g in groups] for t in tasks])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{where}: {source} is not a coefficients.json with a Gamma for every task "
            f"({type(e).__name__}: {e})"
        ) from None
    _, got, _, stored_index = learned_groups(plan, params.granularity)
    if got != groups:
        raise UserError(
            f"{where}: {source} has groups for another granularity or model "
            f"({len(groups)} groups, {params.granularity} level here has {len(got)})"
        )
    experts = task_vector_sources(plan, params, seed, state_dir_for(out))
    coeff = stored_coefficients(plan, stored_index, gamma)
    card = f"\nGamma fixed from `{source.name}` ({params.granularity} level, base_method {params.base_method})."
    if adapter is not None:
        ranks = write_learned_adapter(
            plan,
            out,
            experts,
            lambda n, t: float(coeff(n)[t]),
            adapter[0],
            force=force,
            files={"coefficients.json": source.read_text()},
            card_extra=card,
            progress=_merge_tick(progress),
        )
        shutil.rmtree(state_dir_for(out), ignore_errors=True)
        return {
            "tasks": tasks,
            "groups": groups,
            "gamma": gamma.tolist(),
            "steps": 0,
            "fixed": True,
            "adapter": ranks,
        }
    run_merge(
        plan,
        out,
        force=force,
        seed=seed,
        shard_bytes=shard_bytes,
        progress=_merge_tick(progress),
        tensors=lambda name: merged_tensor(plan, experts, coeff, name),
        extra_files={"coefficients.json": source.read_text()},
        card_extra=card,
    )
    shutil.rmtree(state_dir_for(out), ignore_errors=True)
    return {"tasks": tasks, "groups": groups, "gamma": gamma.tolist(), "steps": 0, "fixed": True}


def check_adapter_output(plan: MergePlan, rank: int | None) -> None:
    """--as-adapter on a learned merge: what the adapter writer would refuse, said before any
    teacher generates (at exact rank every task vector must be low rank). The CLI calls it."""
    adapter_modules(plan.base)
    if rank is None:
        require_low_rank(plan.models, plan.base)
        method = optimize_params(plan.recipe).base_method
        if method != "task_arithmetic":
            raise UserError(
                f"--as-adapter: base_method {method} processes the task vectors densely, so the "
                "merged delta has no exact low rank; pass --adapter-rank R (SVD of the merged delta)"
            )


def write_learned_adapter(
    plan: MergePlan,
    out: Path,
    experts: list,
    coefficient: Callable[[str, int], float],
    rank: int | None,
    *,
    force: bool,
    files: dict[str, str],
    card_extra: str,
    progress: Callable[[int, int, str], None] | None,
) -> dict[str, tuple[int, float]]:
    """theta0 + sum_t coefficient(name, t) tau_t as a PEFT LoRA adapter at OUT, with `files` and
    the recipe of `plan` (it reproduces the merge) beside it."""
    r = plan.recipe
    return write_adapter(
        out,
        plan.base,
        experts,
        coefficient,
        rank,
        force=force,
        dtype=DTYPES[r.out_dtype or r.dtype or "float32"],
        base_ref=r.resolve_path(r.base_model),
        card=model_card(plan, card_extra),
        files={**files, "divmerge_recipe.yaml": dump_recipe(r)},
        progress=progress,
        inputs=[c.path for c in plan.inputs],
        verify=plan.check_unchanged,
    )


def merged_tensor(
    plan: MergePlan,
    experts: list,
    coefficients: Callable[[str], torch.Tensor | None],
    name: str,
) -> torch.Tensor:
    """theta0 + sum_t c_t tau_t on one stored tensor, c = coefficients(name) (None: copied from
    the base), in float32 from the stored theta0 (whatever the compute dtype was), the task
    vectors read again one at a time."""
    base = plan.base
    c = coefficients(name)
    if c is None:
        return base.get(name)
    out = base.get(name).float()
    for t, e in enumerate(experts):
        tau = dense_tau(e, name, base)
        if tau is not None:
            out.add_(tau, alpha=float(c[t]))
    return out


def _merge_tick(progress: Progress | None):
    return (lambda d, t, n: progress("write", d, t, n)) if progress else None


def coefficients_json(pb: Problem, gamma: torch.Tensor) -> dict:
    return {
        "granularity": pb.params.granularity,
        "objective": pb.objective,
        "groups": pb.groups,
        "gamma": {t: dict(zip(pb.groups, row)) for t, row in zip(pb.tasks, gamma.tolist())},
    }


def mergekit_filters(
    plan: MergePlan, stored_index: dict[str, int], groups: list[str], granularity: str
) -> list[tuple[str, int | None]]:
    """(filter, group) pairs that give every stored floating tensor its coefficient, in the
    checkpoint's names (group None: each task's mean Gamma, for tensors the module does not
    hold). A block is one prefix filter when that prefix picks exactly its tensors; every other
    tensor is named whole. Whole names come first, longest first, so no filter catches a tensor
    another one names (mergekit and divmerge take the first filter that is a substring)."""
    floats = [n for n in plan.names if plan.base.dtype(n).is_floating_point]
    exact: list[tuple[str, int | None]] = [(n, None) for n in floats if n not in stored_index]
    prefixes = []
    for g, group in enumerate(groups):
        members = [n for n in floats if stored_index.get(n) == g]
        prefix = group + "."
        picked = [n for n in floats if prefix in n and n in stored_index]
        block = granularity == "layer" and group not in ("embeddings", "head")
        if block and picked == members and all(n.startswith(prefix) for n in members):
            prefixes.append((prefix, g))
        else:
            exact += [(n, g) for n in members]
    return sorted(exact, key=lambda fg: -len(fg[0])) + prefixes


def mergekit_yaml(pb: Problem, gamma: torch.Tensor) -> str:
    """A mergekit task_arithmetic recipe giving the same tensors: per-group weights via filters
    on the stored tensor names (see mergekit_filters)."""
    filters = mergekit_filters(pb.plan, pb.stored_index, pb.groups, pb.params.granularity)
    models = []
    for ckpt, row in zip(pb.plan.models, gamma.tolist()):
        mean = sum(row) / len(row)
        weight = (
            row[0]
            if len(pb.groups) == 1  # one Gamma: the mean is that Gamma too
            else [{"filter": f, "value": mean if g is None else row[g]} for f, g in filters]
        )
        models.append({"model": mergekit_ref(ckpt), "parameters": {"weight": weight}})
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(pb.plan.base.path),
        "models": models,
        "parameters": {"lambda": 1.0, "normalize": False},
        "dtype": "float32",
        "out_dtype": pb.plan.recipe.out_dtype or pb.plan.recipe.dtype or "float32",
    }
    head = "# Reproduces this DivMerge result with mergekit or `divmerge run` (task arithmetic, learned weights)\n"
    return head + yaml.safe_dump(recipe, sort_keys=False)


def card_extra(pb: Problem, gamma: torch.Tensor, before: dict, after: dict) -> str:
    lines = [
        "",
        f"## Learned coefficients ({pb.params.granularity} level, objective {pb.objective})",
        "",
        "| task | objective at init | objective at end | mean Gamma |",
        "|---|---|---|---|",
    ]
    for t, row in zip(pb.tasks, gamma.tolist()):
        lines.append(f"| {t} | {before[t]:.5f} | {after[t]:.5f} | {sum(row) / len(row):.4f} |")
    if pb.params.base_method == "task_arithmetic":
        lines.append(
            "\nPer-group values: `coefficients.json`. Mergekit recipe: "
            "`mergekit_task_arithmetic.yaml` (mergekit computes the same tensors)."
        )
    else:
        lines.append(
            f"\nPer-group values: `coefficients.json`. Gamma was fitted on "
            f"{pb.params.base_method}-processed task vectors (the paper's Remark 3); mergekit has "
            "no method that computes these tensors (its TIES elects signs from the weighted sum "
            "and divides by the agreeing weights), so no mergekit recipe is written."
        )
    lines.append(f"\nTask vectors held in `{pb.tv.mode}` mode ({pb.mode_reason}).")
    return "\n".join(lines)
