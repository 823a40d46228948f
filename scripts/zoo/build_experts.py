"""Fine-tune one SmolLM2 expert per zoo task from ZOO_DIR/base, resumably; score base vs expert.

    python scripts/zoo/prepare_data.py ZOO_DIR          # data/ and tasks.yaml
    python scripts/zoo/build_experts.py ZOO_DIR [--steps 150] [--batch-size 8] [--lr 1e-4]
                                        [--threads 1] [--save-every 50] [--only TASK]

Builds ZOO_DIR/base first when missing (scripts/make_smollm2_base.py, float32). Each expert is
the base fully fine-tuned, completion-only (divmerge_cli.sft.finetune: the loss covers
" " + target + EOS after the task's prompt, the paper's Table 1 setting) on
ZOO_DIR/data/<task>/train.jsonl, then saved in float32 to ZOO_DIR/experts/<task>/ (written to a
temp folder, then renamed). Finished experts are skipped.

Resuming: every --save-every steps the weights and the losses so far go to
ZOO_DIR/experts/.work/<task>/; rerunning the command continues from there. The examples come
from one seeded order (epochs of seeded permutations of train.jsonl): an uninterrupted run trains
on its first steps*batch_size entries in one sft.finetune call (which shuffles them), a resumed
run on the entries after resume_step*batch_size, with seed `seed + resume step`. A resumed expert
is an equally long fine-tune on the same data but not bit-identical to an uninterrupted one (a
few examples seen twice or skipped; AdamW's moments, owned by sft.finetune, restart at the
resume point). --steps may grow between runs.

After an expert is saved, base and expert are scored on the task's test split (greedy
generation, accuracy / ROUGE-1, --eval-limit rows) into ZOO_DIR/scores.json. Per-step losses go
to ZOO_DIR/logs/<task>.log. --score-base-chat only scores the base again with its prompts wrapped
in its chat template (base_chat in scores.json): on the raw prompts it answers end-of-turn. torch
uses --threads threads (1 by default: the machine is shared).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

SEED = 0
WORK = ".work"  # in-progress checkpoints, under ZOO_DIR/experts/
MAKE_BASE = Path(__file__).resolve().parents[1] / "make_smollm2_base.py"
# A cap on tokens per example that the zoo's data never reaches (prompts < 130, answers < 45).
MAX_LENGTH = 192


# ---------------------------------------------------------------------------------- pure parts


def train_examples(task: str, spec, rows: list[dict]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs; the answer carries its leading space (the prompt ends in "Answer:")."""
    from divmerge_cli.tasks import render_prompt

    return [(render_prompt(task, spec, r), " " + str(r[spec.target]).strip()) for r in rows]


def example_order(n: int, count: int, seed: int) -> list[int]:
    """The first `count` indices of an endless stream of seeded permutations of range(n).

    The stream does not depend on `count`, so a longer run extends a shorter one.
    """
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    return order[:count]


def is_checkpoint(step: int, steps: int, every: int) -> bool:
    """Save after steps every, 2*every, ...; not after the last one (the expert is saved then)."""
    return step % every == 0 and step < steps


def run_settings(args: argparse.Namespace, train_sha256: str) -> dict:
    """What a checkpoint's weights depend on, besides the step count (--steps may grow)."""
    lora = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha} if args.lora_rank else {}
    if args.distinct_init:
        lora["distinct_init"] = True
    return {
        **lora,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "max_length": MAX_LENGTH,
        "train_sha256": train_sha256,
    }


# ---------------------------------------------------------------------------------- files


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def save_folder(model, tokenizer, out: Path, extra: dict[str, object]) -> None:
    """save_pretrained into a temp sibling folder, add JSON files, then rename over `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, obj in extra.items():
            (tmp / name).write_text(json.dumps(obj, indent=1) + "\n")
        old = out.with_name(out.name + ".old")
        if out.exists():
            out.rename(old)  # keep the previous checkpoint until the new one is in place
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---------------------------------------------------------------------------------- training


def log_line(path: Path, text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    with open(path, "a") as f:
        f.write(f"{stamp} {text}\n")
    print(f"{stamp} {path.stem}: {text}", flush=True)


def zoo_kind(args: argparse.Namespace) -> str:
    """The folder under ZOO_DIR: experts, lora (--lora-rank) or lora_distinct (--distinct-init)."""
    if not args.lora_rank:
        return "experts"
    return "lora_distinct" if args.distinct_init else "lora"


def init_seed(args: argparse.Namespace, task: str, tasks: list[str]) -> int:
    """lora_A's init seed: --seed for every adapter, or --seed + the task's position in tasks.yaml
    with --distinct-init (the training data's order keeps --seed either way)."""
    return args.seed + tasks.index(task) if args.distinct_init else args.seed


def expert_dir(zoo: Path, task: str, args: argparse.Namespace) -> Path:
    """ZOO_DIR/<zoo_kind>/<task>."""
    return zoo / zoo_kind(args) / task


def is_built(folder: Path) -> bool:
    from divmerge_cli.checkpoint import has_weights

    return has_weights(folder) or (folder / "adapter_model.safetensors").is_file()


def trainable(source: Path, base: Path, args: argparse.Namespace, seed: int):
    """The model to fine-tune from `source`: the base (or a checkpoint) for a full fine-tune; for
    LoRA, the base with a fresh seeded adapter (r, alpha, every linear layer) or the adapter
    checkpointed in `source`; `seed` seeds lora_A's random init."""
    import torch

    from divmerge_cli.hf import load_model

    if not args.lora_rank:
        return load_model(source)
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_model(base)
    if source != base:
        return PeftModel.from_pretrained(model, str(source), is_trainable=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules="all-linear",
        lora_dropout=0.0,
    )  # fmt: skip
    return get_peft_model(model, config)


def build_expert(zoo: Path, task: str, spec, args: argparse.Namespace, seed: int) -> None:
    """Fine-tune (or resume) the expert ZOO_DIR/experts/<task> (or the LoRA adapter
    ZOO_DIR/lora*/<task>, lora_A seeded with `seed`); nothing to do when it exists."""
    from divmerge_cli import sft
    from divmerge_cli.hf import load_tokenizer

    out = expert_dir(zoo, task, args)
    log = (
        zoo / "logs" / f"{out.parent.name}-{task}.log"
        if args.lora_rank
        else zoo / "logs" / f"{task}.log"
    )
    if is_built(out):
        print(f"{task}: {out} exists, skipped", flush=True)
        return
    train_path = zoo / "data" / task / "train.jsonl"
    rows = read_rows(train_path)
    examples = train_examples(task, spec, rows)
    settings = run_settings(args, hashlib.sha256(train_path.read_bytes()).hexdigest())
    order = example_order(len(examples), args.steps * args.batch_size, args.seed)

    work = out.parent / WORK / task
    state = json.loads((work / "state.json").read_text()) if is_built(work) else None
    if state is not None and state["settings"] != settings:
        log_line(log, f"checkpoint at {work} has other settings; starting over")
        state = None
    start = min(state["step"], args.steps) if state else 0
    losses: list[float] = state["losses"][:start] if state else []
    source = work if start else zoo / "base"
    model, tok = trainable(source, zoo / "base", args, seed), load_tokenizer(zoo / "base")
    log_line(log, f"start at step {start}/{args.steps} from {source} ({len(examples)} examples)")

    # One finetune call for the remaining steps: AdamW keeps its moments throughout. The
    # callback checkpoints the weights mid-run (sft.finetune owns the optimizer, so a resumed
    # run restarts AdamW's moments once, at the resume point).
    batch = [examples[i] for i in order[start * args.batch_size :]]
    t0 = time.perf_counter()

    def progress(step: int, _steps: int, loss: float) -> None:
        losses.append(loss)
        done = start + step
        per_step = (time.perf_counter() - t0) / step
        log_line(log, f"step {done}/{args.steps} loss {loss:.4f} ({per_step:.2f} s/step)")
        if is_checkpoint(done, args.steps, args.save_every):
            state = {"step": done, "losses": losses, "settings": settings}
            save_folder(model, tok, work, {"state.json": state})
            log_line(log, f"checkpoint at step {done}")

    if start < args.steps:
        sft.finetune(
            model, tok, batch, steps=args.steps - start, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed + start, max_length=MAX_LENGTH, progress=progress,
        )  # fmt: skip

    info = {"task": task, "steps": args.steps, **settings, "losses": losses}
    save_folder(model, tok, out, {"expert.json": info})
    shutil.rmtree(work, ignore_errors=True)
    first, last = _mean(losses[:10]), _mean(losses[-10:])
    log_line(log, f"saved {out}: mean loss first 10 steps {first:.4f}, last 10 {last:.4f}")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------- scoring


def score_expert(zoo: Path, task: str, spec, limit: int, batch_size: int, kind: str) -> dict:
    """Base and the expert ZOO_DIR/<kind>/<task> on the task's test split; into
    ZOO_DIR/scores.json as base and expert (full fine-tune) or <kind>_expert (LoRA)."""
    from divmerge_cli.evaluate import evaluate_model

    cache = zoo / "cache" / "eval"
    name = score_key(kind)
    expert = zoo / kind / task
    scores = {}
    for key, model_dir in (("base", zoo / "base"), (name, expert)):
        s = evaluate_model(model_dir, {task: spec}, "test", limit, batch_size, 0, cache)[task]
        scores[key] = s.score
    path = zoo / "scores.json"
    n = (json.loads(path.read_text()) if path.is_file() else {}).get(task, {}).get("n", s.n)
    if n != s.n:  # the other experts' scores (and base) are on those rows: keep the table one
        raise SystemExit(
            f"{path}: {task} was scored on {n} test rows, this run on {s.n}; pass --eval-limit {n}"
            " (the expert is saved; nothing was written to scores.json)"
        )
    return merge_scores(zoo, task, {"metric": spec.metric, "n": s.n, "split": "test", **scores})


def score_key(kind: str) -> str:
    """scores.json's field for an expert of ZOO_DIR/<kind>/: expert, lora_expert, ..."""
    return "expert" if kind == "experts" else f"{kind}_expert"


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as the one user turn of the tokenizer's chat template, assistant turn opened."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def score_base_chat(zoo: Path, specs: dict, limit: int, batch_size: int) -> dict[str, float]:
    """The base on the same test rows, its prompts wrapped in its chat template.

    The experts are trained and every model is scored on the raw prompts (the paper's setting);
    the instruct base answers those with end-of-turn at once, so this is its fairer baseline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from divmerge_cli.evaluate import labelled_rows, score_task

    tokenizer = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    out = {}
    for task, spec in specs.items():
        rows = labelled_rows(task, spec, "test", limit, 0)
        wrap = partial(chat_prompts, tokenizer)
        score = score_task(model, tokenizer, task, spec, rows, batch_size, wrap).score
        merge_scores(zoo, task, {"base_chat": score})
        out[task] = score
    return out


def merge_scores(zoo: Path, task: str, fields: dict) -> dict:
    """Update ZOO_DIR/scores.json[task] with `fields`; returns the task's entry."""
    path = zoo / "scores.json"
    # Several builds (--only) may run side by side: read-modify-write under a lock.
    with open(zoo / ".scores.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        all_scores = json.loads(path.read_text()) if path.is_file() else {}
        entry = all_scores[task] = {**all_scores.get(task, {}), **fields}
        write_json_atomic(path, all_scores)
    return entry


# ---------------------------------------------------------------------------------- main


def ensure_base(zoo: Path) -> None:
    from divmerge_cli.checkpoint import has_weights

    if has_weights(zoo / "base"):
        return
    subprocess.run(
        [sys.executable, str(MAKE_BASE), str(zoo / "base"), "--dtype", "float32"], check=True
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo_dir", type=Path)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--lora-rank", type=int, default=0,
        help="train a LoRA adapter of this rank on every linear layer (ZOO_DIR/lora/TASK)",
    )  # fmt: skip
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--distinct-init", action="store_true",
        help="with --lora-rank: seed each adapter's lora_A init with --seed + the task's position "
        "(default: every adapter starts from the same A); into ZOO_DIR/lora_distinct/TASK",
    )  # fmt: skip
    ap.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--only", action="append", help="build only this task (repeatable)")
    ap.add_argument("--eval-limit", type=int, default=100, help="test rows scored; 0: no scoring")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument(
        "--score-base-chat",
        action="store_true",
        help="only score the base with its chat template (base_chat in scores.json)",
    )
    a = ap.parse_args(argv)
    if a.lora_alpha is None:
        a.lora_alpha = 2.0 * a.lora_rank
    if a.distinct_init and not a.lora_rank:
        raise SystemExit("--distinct-init: only with --lora-rank (it seeds each adapter's lora_A)")

    import torch

    from divmerge_cli.tasks import load_tasks

    torch.set_num_threads(a.threads)
    zoo = a.zoo_dir.resolve()
    tasks_file = zoo / "tasks.yaml"
    if not tasks_file.is_file():
        raise SystemExit(f"{tasks_file} not found: run scripts/zoo/prepare_data.py {zoo} first")
    specs = load_tasks(str(tasks_file), zoo, str(tasks_file))
    unknown = sorted(set(a.only or []) - set(specs))
    if unknown:
        raise SystemExit(f"--only {', '.join(unknown)}: not a task; tasks: {', '.join(specs)}")
    (zoo / "logs").mkdir(parents=True, exist_ok=True)
    ensure_base(zoo)
    if a.score_base_chat:
        chosen = {t: s for t, s in specs.items() if not a.only or t in a.only}
        for task, score in score_base_chat(zoo, chosen, a.eval_limit, a.eval_batch_size).items():
            print(f"{task}: {specs[task].metric} base with chat template {score:.4f}", flush=True)
        return 0
    for task, spec in specs.items():
        if a.only and task not in a.only:
            continue
        build_expert(zoo, task, spec, a, init_seed(a, task, list(specs)))
        if a.eval_limit > 0:
            kind = zoo_kind(a)
            e = score_expert(zoo, task, spec, a.eval_limit, a.eval_batch_size, kind)
            name = score_key(kind)
            print(
                f"{task}: {e['metric']} base {e['base']:.4f} {name} {e[name]:.4f} (n={e['n']})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
