"""Generation-based scoring (accuracy, ROUGE-1) and the paper's ANP (Eq. 5).

A model is scored the way it is used: greedy generation on the labelled rows of a task, the
generated text compared with the target field. Scores can be cached on disk by content hash,
so the experts' reference scores are computed once per (model bytes, task, rows).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .checkpoint import write_file
from .errors import UserError
from .generate import greedy_generate
from .hashing import hash_json
from .hf import load_tokenizer
from .models import content_hash, load_expert_model, model_folder, scored_model
from .tasks import TaskSpec, load_rows, render_prompt

# Bump when scoring changes meaning, so old cached scores stop matching.
CACHE_VERSION = 1
CACHE_FILE = "eval_scores.json"

# Stripped from both ends of an answer: quotes, brackets and sentence punctuation. Signs
# (+ - $ %) are kept so that "-3" and "3" stay different answers.
_EDGE_CHARS = "\"'`“”‘’«»()[]{}<>.,;:!?*_ \t"


def normalize_answer(s: str) -> str:
    """First non-empty line, lowercased, whitespace collapsed, edge quotes/punctuation stripped.

    A classification model that answers "Positive." and then keeps talking on the next line
    has still answered "positive".
    """
    lines = [ln for ln in s.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\s+", " ", first.lower()).strip(_EDGE_CHARS)


def accuracy(preds: list[str], targets: list[str]) -> float:
    """Fraction of predictions equal to their target after normalize_answer."""
    _check_lengths(preds, targets)
    hits = sum(normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, targets))
    return hits / len(preds)


# No stemming: the `rouge-score` default, also the default of Hugging Face `evaluate`'s
# "rouge", which is how such papers usually compute it. The paper only says ROUGE-1.
_ROUGE = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)


def rouge1(preds: list[str], targets: list[str]) -> float:
    """Mean ROUGE-1 F1 (unigram overlap) over the whole generated text.

    rouge-score lowercases and keeps only [a-z0-9] tokens, so non-ASCII letters are dropped.
    """
    _check_lengths(preds, targets)
    # rouge-score's signature is score(target, prediction).
    return sum(_ROUGE.score(t, p)["rouge1"].fmeasure for p, t in zip(preds, targets)) / len(preds)


def _check_lengths(preds: list[str], targets: list[str]) -> None:
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    if not preds:
        raise UserError("scoring: no labelled rows to score")


METRICS: dict[str, Callable[[list[str], list[str]], float]] = {
    "accuracy": accuracy,
    "rouge1": rouge1,
}


def normalized(score: float, reference: float) -> float | None:
    """PERF(model, t) / PERF(expert t, t); None (undefined) when the expert scores 0 on t."""
    return score / reference if reference else None


def anp(scores: dict[str, float], references: dict[str, float]) -> float | None:
    """Average Normalized Performance (Eq. 5): mean over tasks of score / expert's score.

    `scores` are the merged model's per-task scores, `references` each task's expert on it. None
    when an expert scores 0 on its task (often on a few rows, --limit): that task's normalized
    performance is undefined, and the mean over the other tasks would be another quantity.
    """
    if not scores:
        raise UserError("ANP: no tasks to average over")
    ratios = []
    for task, score in scores.items():
        if task not in references:
            raise UserError(f"ANP: no reference (expert) score for task {task!r}")
        ratios.append(normalized(score, references[task]))
    return None if None in ratios else sum(ratios) / len(ratios)


# progress(task, done, total): rows of `task` generated so far (0 when its generation starts).
ScoreProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TaskScore:
    metric: str
    score: float
    n: int  # labelled rows scored


def labelled_rows(
    task: str, spec: TaskSpec, split: str, limit: int | None, seed: int
) -> list[dict]:
    """The split's rows that carry the target field (at most `limit`, sampled with `seed`)."""
    path = getattr(spec, split, None)
    if not path:
        raise UserError(f"tasks.{task}.{split}: no {split} file; scoring needs labelled rows")
    if not spec.target:
        raise UserError(f"tasks.{task}.target: not set; scoring needs the field holding the answer")
    rows = [r for r in load_rows(path, limit=limit, seed=seed) if r.get(spec.target) is not None]
    if not rows:
        raise UserError(f"tasks.{task}.{split}: {path} has no rows with the field {spec.target!r}")
    return rows


def score_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    spec: TaskSpec,
    rows: list[dict],
    batch_size: int = 16,
    wrap: Callable[[list[str]], list[str]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TaskScore:
    """Greedy-generate on `rows` and score with the task's metric (works on in-memory models).

    `wrap` rewrites the rendered prompts first (e.g. into a chat template); `progress(done,
    total)` is called after each generation batch.
    """
    prompts = [render_prompt(task, spec, r) for r in rows]
    if wrap is not None:
        prompts = wrap(prompts)
    gens = greedy_generate(
        model, tokenizer, prompts, spec.max_new_tokens, batch_size=batch_size, progress=progress
    )
    preds = [gen.text for gen in gens]
    targets = [str(r[spec.target]) for r in rows]
    return TaskScore(spec.metric, METRICS[spec.metric](preds, targets), len(rows))


def _cache_key(model_hash: str, task: str, spec: TaskSpec, rows, split, limit, seed) -> str:
    return hash_json(
        {
            "version": CACHE_VERSION,
            "model": model_hash,
            "task": task,
            "spec": spec.model_dump(mode="json"),
            "rows": rows,
            "split": split,
            "limit": limit,
            "seed": seed,
        }
    )


def _read_cache(path: Path) -> dict:
    try:
        got = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing, torn or unreadable cache only costs a recomputation
    return got if isinstance(got, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    """Merge `entries` into the cache file atomically (re-read first: other runs may have written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_cache(path), **entries}
    write_file(path, json.dumps(merged, indent=1, sort_keys=True), "the score cache")


def evaluate_model(
    model_dir: str | Path,
    tasks: dict[str, TaskSpec],
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: ScoreProgress | None = None,
    device: str = "cpu",
) -> dict[str, TaskScore]:
    """Score the checkpoint in `model_dir` (or a LoRA adapter: lora.scored_model) on every task's
    labelled `split` rows.

    With `cache_dir`, each task's score is stored under a hash of (model files, task spec, rows,
    split, limit, seed); a rerun with the same inputs loads neither the model nor generates.
    `progress(task, done, total)` follows the generation batches (0 first); a cached task
    reports 1 of 1. The model generates on `device`; the cache does not depend on it (greedy
    generation is meant to give the same text anywhere).
    """
    expert = scored_model(model_dir, str(model_dir))
    rows = {t: labelled_rows(t, spec, split, limit, seed) for t, spec in tasks.items()}
    cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    cached = _read_cache(cache_path) if cache_path else {}
    model_hash = content_hash(expert) if cache_path else ""
    keys = {t: _cache_key(model_hash, t, tasks[t], rows[t], split, limit, seed) for t in tasks}

    out: dict[str, TaskScore] = {}
    fresh: dict[str, dict] = {}
    model = tokenizer = None
    for task, spec in tasks.items():
        hit = cached.get(keys[task])
        if hit is not None:
            out[task] = TaskScore(**hit)
            if progress:
                progress(task, 1, 1)
            continue
        if model is None:  # load lazily: a fully cached run never touches the weights
            model = load_expert_model(expert).to(device)
            tokenizer = load_tokenizer(model_folder(expert))
        tick = (lambda d, n, t=task: progress(t, d, n)) if progress else None
        out[task] = score_task(model, tokenizer, task, spec, rows[task], batch_size, None, tick)
        fresh[keys[task]] = asdict(out[task])
    if cache_path and fresh:
        _write_cache(cache_path, fresh)
    return out


@dataclass(frozen=True)
class Gate:
    """A quality gate: a model's ANP (percent) or one task's score must not be under `threshold`."""

    threshold: float
    task: str | None = None  # None: the ANP gate


def parse_gates(anp_min: float | None, task_mins: list[str], tasks: list[str]) -> list[Gate]:
    """--fail-under-anp X and --fail-under TASK=SCORE, checked against the evaluated tasks. A
    threshold is a finite number: NaN passes or fails everything, and infinity is no bound."""
    gates = []
    if anp_min is not None:
        if not math.isfinite(anp_min):
            raise UserError(
                f"--fail-under-anp {anp_min}: not a finite number; give a percentage, e.g. 80"
            )
        gates.append(Gate(anp_min))
    for item in task_mins:
        task, sep, value = item.partition("=")
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if not sep or task not in tasks or not math.isfinite(threshold):
            raise UserError(
                f"--fail-under {item}: use TASK=SCORE with TASK one of {', '.join(tasks)} and "
                "SCORE a finite number on the task's metric scale"
            )
        gates.append(Gate(threshold, task))
    return gates


def check_gates(models: dict[str, dict], gates: list[Gate]) -> list[dict]:
    """One record per (model, gate): the value found and whether it passed.

    `models` maps a model to its report entry ({"tasks": {task: {"score": ...}}, "anp": ...}).
    A model without an ANP (no reference for any of its tasks) fails an ANP gate.
    """
    records = []
    for model, entry in models.items():
        for g in gates:
            if g.task is None:
                anp_ = entry.get("anp")
                value = None if anp_ is None else 100 * anp_
            else:
                value = entry["tasks"][g.task]["score"]
            records.append(
                {
                    "model": model,
                    "gate": "anp" if g.task is None else g.task,
                    "threshold": g.threshold,
                    "value": value,
                    "passed": value is not None and value >= g.threshold,
                }
            )
            zero = [t for t, s in entry["tasks"].items() if s.get("normalized", 0) is None]
            if value is None and zero:
                records[-1]["undefined"] = f"the expert scores 0 on task {zero[0]!r}"
    return records


def gate_message(record: dict) -> str:
    """One line for a failed gate."""
    if record["gate"] == "anp":
        if record.get("undefined"):
            return f"{record['model']}: ANP is undefined ({record['undefined']})"
        if record["value"] is None:
            return f"{record['model']}: no ANP to gate (no task has a reference score)"
        return f"{record['model']}: ANP {record['value']:.2f} % is under {record['threshold']:g} %"
    return (
        f"{record['model']}: {record['gate']} scored {record['value']:.4f}, "
        f"under {record['threshold']:g}"
    )


def record_gates(report: dict, gates: list[Gate]) -> list[str]:
    """Record each model's gate results in an eval report ("gates"); one line per failed gate."""
    if gates:
        report["gates"] = check_gates(report["models"], gates)
    return [gate_message(g) for g in report.get("gates", []) if not g["passed"]]
