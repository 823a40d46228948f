"""An offline model zoo for `divmerge demo`: four toy tasks, a tiny base, one expert per task.

Everything is generated from a seed, nothing is downloaded. The tasks have real structure (a
negation flips a review's sentiment; French puts the adjective after the noun), the base is a
small Llama pretrained on text that shows every task's *format* but not its answers, and each
expert is that base fine-tuned (completion-only SFT) on one task -- the paper's setting in
miniature: experts share theta0, so their task vectors tau_t = theta_t - theta0 can be merged.

The zoo is built once into a folder and reused while the settings are unchanged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
import yaml

from . import sft, tiny
from .errors import UserError
from .evaluate import labelled_rows, score_task
from .hashing import hash_json, hash_model_dir
from .tasks import TaskSpec, load_tasks

# Bump when the data, model or training code changes what a build produces. 2: cosine-decayed
# learning rates and experts trained in rounds until they reach their validation target.
ZOO_VERSION = 2
MANIFEST = "manifest.json"

# progress(stage, done, total), e.g. ("fine-tune expert sentiment", 40, 150).
BuildProgress = Callable[[str, int, int], None]

# ----------------------------------------------------------------------------- toy tasks

POSITIVE = ["good", "great", "wonderful", "delightful", "superb", "charming", "brilliant",
            "lovely", "excellent", "enjoyable", "moving", "clever"]  # fmt: skip
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "clumsy", "weak", "tedious", "poor",
            "messy", "bland", "annoying"]  # fmt: skip
ASPECTS = ["plot", "acting", "music", "story", "ending", "cast", "script", "dialogue", "pacing",
           "soundtrack", "direction", "humor"]  # fmt: skip

TOPICS = {
    "sports": ["match", "team", "goal", "coach", "player", "season", "league", "stadium", "referee",
               "striker", "trophy", "final"],
    "food": ["soup", "bread", "recipe", "chef", "dinner", "cheese", "sauce", "oven", "salad",
             "dessert", "kitchen", "spice"],
    "weather": ["rain", "wind", "storm", "cloud", "forecast", "snow", "thunder", "fog", "frost",
                "sunshine", "drizzle", "heatwave"],
}  # fmt: skip
TOPIC_FRAMES = [
    "yesterday the {0} and the {1} were in the news",
    "people talked about the {0} all week",
    "everyone noticed the {0} near the {1}",
    "the report on the {0} mentioned the {1}",
    "a new story about the {0} came out today",
    "nobody expected the {0} after the {1}",
]

# English -> French, chosen so that every noun is masculine ("le"/"un") and every adjective
# follows its noun: the translation is word-for-word up to the adjective moving after the noun.
NOUNS_FR = {"cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval", "wolf": "loup",
            "rabbit": "lapin", "fish": "poisson", "bear": "ours", "fox": "renard", "lion": "lion"}  # fmt: skip
ADJS_FR = {"red": "rouge", "black": "noir", "white": "blanc", "green": "vert", "grey": "gris",
           "blue": "bleu", "yellow": "jaune", "fast": "rapide", "calm": "calme", "sad": "triste"}  # fmt: skip
VERBS_FR = {"eats": "mange", "sleeps": "dort", "runs": "court", "jumps": "saute", "sings": "chante",
            "swims": "nage", "plays": "joue", "waits": "attend"}  # fmt: skip
DETS_FR = {"the": "le", "a": "un"}


def _review(rng: random.Random) -> dict[str, str]:
    """One or two clauses of one polarity; "not" + an adjective of the other polarity counts."""
    label = rng.choice(["positive", "negative"])
    same, other = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
    clauses = []
    for aspect in rng.sample(ASPECTS, rng.choice([1, 2])):
        if rng.random() < 0.3:
            clauses.append(f"the {aspect} was not {rng.choice(other)}")
        else:
            clauses.append(f"the {aspect} was {rng.choice(same)}")
    return {"text": " and ".join(clauses), "label": label}


def _topic(rng: random.Random) -> dict[str, str]:
    label = rng.choice(sorted(TOPICS))
    words = rng.sample(TOPICS[label], 2)
    return {"text": rng.choice(TOPIC_FRAMES).format(*words), "label": label}


def _addition(rng: random.Random) -> dict[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"a": str(a), "b": str(b), "answer": str(a + b)}


def _clause(rng: random.Random) -> tuple[str, str]:
    det, noun, adj, verb = (rng.choice(sorted(d)) for d in (DETS_FR, NOUNS_FR, ADJS_FR, VERBS_FR))
    en = f"{det} {adj} {noun} {verb}"
    fr = f"{DETS_FR[det]} {NOUNS_FR[noun]} {ADJS_FR[adj]} {VERBS_FR[verb]}"
    return en, fr


def _translation(rng: random.Random) -> dict[str, str]:
    pairs = [_clause(rng) for _ in range(rng.choice([1, 2]))]
    return {"en": " and ".join(e for e, _ in pairs), "fr": " et ".join(f for _, f in pairs)}


@dataclass(frozen=True)
class ToyTask:
    make: Callable[[random.Random], dict[str, str]]
    prompt: str  # TaskSpec template; the answer follows after a space
    target: str
    metric: str
    max_new_tokens: int
    unique: bool  # rows can be kept distinct across splits (addition has only 100 sums)


TASKS: dict[str, ToyTask] = {
    "sentiment": ToyTask(_review, "Review: {text}.\nIs this review positive or negative? Answer:",
                         "label", "accuracy", 4, True),
    "topic": ToyTask(_topic, "Sentence: {text}.\nIs it about sports, food or weather? Answer:",
                     "label", "accuracy", 4, True),
    "addition": ToyTask(_addition, "Compute {a}+{b}. Answer:", "answer", "accuracy", 4, False),
    "translation": ToyTask(_translation, "Translate to French: {en}\nAnswer:", "fr", "rouge1",
                           32, True),
}  # fmt: skip


def _render(task: ToyTask, row: dict[str, str]) -> str:
    # Same placeholders as TaskSpec prompts; the toy templates contain no other braces.
    return task.prompt.format(**row)


def make_rows(name: str, n: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Deterministic train/validation/test rows; distinct across splits where the task allows."""
    task = TASKS[name]
    rng = random.Random(f"{seed}:{name}")  # str seeds hash deterministically (sha512)
    total = sum(n.values())
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(100 * total):
        if len(rows) == total:
            break
        row = task.make(rng)
        key = json.dumps(row, sort_keys=True)
        if task.unique and key in seen:
            continue
        seen.add(key)
        rows.append(row)
    if len(rows) < total:
        raise RuntimeError(f"toy task {name}: only {len(rows)} distinct rows for {total} wanted")
    out, start = {}, 0
    for split, k in n.items():
        out[split] = rows[start : start + k]
        start += k
    return out


def general_text(rng: random.Random, n: int) -> list[str]:
    """Unlabelled English and French sentences over the tasks' vocabulary (no parallel pairs)."""
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            out.append(_review(rng)["text"] + ".")
        elif kind == 1:
            out.append(_topic(rng)["text"] + ".")
        elif kind == 2:
            out.append(_clause(rng)[0] + ".")
        else:
            out.append(_clause(rng)[1] + ".")
    return out


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class ZooSize:
    rows: dict[str, int]  # per task and split
    vocab: int
    hidden: int
    layers: int
    pretrain_steps: int
    pretrain_lr: float
    general_texts: int
    sft_steps: int  # one round of fine-tuning: the learning rate decays from sft_lr to 0
    sft_lr: float
    sft_rounds: int  # at most this many rounds per expert, stopping once it reaches `target`
    target: float  # an expert's score on its validation rows (accuracy or ROUGE-1 F)
    batch_size: int


SIZES: dict[str, ZooSize] = {
    # Seconds, for tests: experts weak but above zero on their task, so ANP is defined (its merges
    # score near 0: too small to rank methods).
    "small": ZooSize(rows={"train": 96, "validation": 8, "test": 16}, vocab=400, hidden=32,
                     layers=2, pretrain_steps=8, pretrain_lr=3e-3, general_texts=40, sft_steps=120,
                     sft_lr=3e-3, sft_rounds=2, target=0.25, batch_size=8),
    # About a minute of CPU (one thread). Addition is the slowest to learn: at a constant rate its
    # accuracy after 250 steps swung between 0.5 and 0.85 with the seed or the CPU's float
    # rounding (the endpoint of a noisy trajectory); 1-3 decayed rounds of 300 steps reached
    # 0.97-1.00 in 11 builds (seeds 0-5; AVX-512, AVX2, no vector kernels). The others: 1.00 in
    # one round.
    "default": ZooSize(rows={"train": 800, "validation": 200, "test": 200}, vocab=768, hidden=64,
                       layers=4, pretrain_steps=400, pretrain_lr=3e-3, general_texts=1500,
                       sft_steps=300, sft_lr=1e-3, sft_rounds=4, target=0.95, batch_size=16),
}  # fmt: skip


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    experts: dict[str, Path]
    tasks_yaml: Path
    data_dir: Path

    def train_file(self, task: str) -> Path:
        return self.data_dir / task / "train.jsonl"

    def task_specs(self) -> dict[str, TaskSpec]:
        """The validated tasks of tasks.yaml, data paths made absolute."""
        return load_tasks(str(self.tasks_yaml), self.root, str(self.tasks_yaml))


def _zoo_at(root: Path) -> Zoo:
    return Zoo(
        root=root,
        base=root / "base",
        experts={t: root / "experts" / t for t in TASKS},
        tasks_yaml=root / "tasks.yaml",
        data_dir=root / "data",
    )


def _settings(size: str, seed: int) -> dict:
    return {"version": ZOO_VERSION, "size": size, "seed": seed, **asdict(SIZES[size])}


# ----------------------------------------------------------------------------- build steps


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _tasks_yaml(rows_dir: str) -> dict:
    """The TaskSpec mapping, paths relative to the YAML's folder."""
    return {
        name: {
            "validation": f"{rows_dir}/{name}/validation.jsonl",
            "test": f"{rows_dir}/{name}/test.jsonl",
            "prompt": t.prompt,
            "target": t.target,
            "metric": t.metric,
            "max_new_tokens": t.max_new_tokens,
        }
        for name, t in TASKS.items()
    }


def _base_corpus(data: dict[str, dict], cfg: ZooSize, seed: int) -> list[str]:
    """General text plus every task's training prompts with *another row's* answer.

    The base learns each task's format and answer vocabulary (so it answers "positive" or "12",
    not gibberish) but not the mapping from input to answer, which the experts must learn.
    """
    rng = random.Random(f"{seed}:base")
    texts = general_text(rng, cfg.general_texts)
    for name, task in TASKS.items():
        train = data[name]["train"]
        answers = [r[task.target] for r in train]
        rng.shuffle(answers)
        texts += [f"{_render(task, r)} {a}" for r, a in zip(train, answers)]
    rng.shuffle(texts)
    return texts


def _stage(progress: BuildProgress | None, stage: str, done: int = 0):
    """sft's step callback as the build's progress; `done` steps of the stage came before."""
    if progress is None:
        return None
    return lambda step, steps, loss: progress(stage, done + step, done + steps)


@contextmanager
def one_thread():
    """Run torch on one thread, then restore the caller's setting.

    Matrices 32-64 wide gain nothing from a second thread, and on a machine whose cores are
    busy, two spinning threads made a training step 10-20x slower (measured: 0.05 s vs 0.5-1 s).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_expert(
    expert: torch.nn.Module,
    tok,
    examples: list[tuple[str, str]],
    spec: TaskSpec,
    name: str,
    cfg: ZooSize,
    seed: int,
    progress: BuildProgress | None,
) -> dict:
    """Fine-tune in rounds of `cfg.sft_steps` decayed steps until the expert scores `cfg.target`
    on its validation rows (at most `cfg.sft_rounds` rounds); what it reached, for the manifest.

    Each round ends with the learning rate at 0, so the score checked is that of weights that have
    settled, not of one point of a noisy trajectory; the next round restarts the rate (and draws
    another batch order) from there.
    """
    rows = labelled_rows(name, spec, "validation", None, 0)
    for r in range(1, cfg.sft_rounds + 1):
        done = (r - 1) * cfg.sft_steps
        sft.finetune(expert, tok, examples, cfg.sft_steps, cfg.batch_size, cfg.sft_lr,
                     seed + 1000 * (r - 1), max_length=128, schedule="cosine",
                     progress=_stage(progress, f"fine-tune expert {name}", done))  # fmt: skip
        score = score_task(expert, tok, name, spec, rows, batch_size=32).score
        if score >= cfg.target:
            break
    return {"validation": round(score, 4), "target": cfg.target, "steps": done + cfg.sft_steps,
            "reached": score >= cfg.target}  # fmt: skip


def _build_into(tmp: Path, size: str, seed: int, progress: BuildProgress | None) -> dict:
    """Build the zoo into `tmp`; each expert's validation score, target and steps."""
    cfg = SIZES[size]
    data = {name: make_rows(name, cfg.rows, seed) for name in TASKS}
    for name, splits in data.items():
        for split, rows in splits.items():
            _write_jsonl(tmp / "data" / name / f"{split}.jsonl", rows)
    (tmp / "tasks.yaml").write_text(yaml.safe_dump(_tasks_yaml("data"), sort_keys=False))
    specs = load_tasks(str(tmp / "tasks.yaml"), tmp, "tasks.yaml")

    corpus = _base_corpus(data, cfg, seed)
    tok = tiny.build_tokenizer(corpus, cfg.vocab)
    base = tiny.tiny_llama(len(tok), hidden=cfg.hidden, layers=cfg.layers, seed=seed)
    sft.pretrain(base, tok, corpus, cfg.pretrain_steps, cfg.batch_size, cfg.pretrain_lr, seed,
                 max_length=128, progress=_stage(progress, "pretrain base"),
                 schedule="cosine")  # fmt: skip
    tiny.save(base, tok, tmp / "base")

    fits = {}
    for i, (name, task) in enumerate(TASKS.items()):
        expert = tiny.tiny_llama(len(tok), hidden=cfg.hidden, layers=cfg.layers, seed=seed)
        expert.load_state_dict(base.state_dict())
        examples = [(_render(task, r), " " + r[task.target]) for r in data[name]["train"]]
        fits[name] = _train_expert(expert, tok, examples, specs[name], name, cfg, seed + 1 + i,
                                   progress)  # fmt: skip
        tiny.save(expert, tok, tmp / "experts" / name)
    return fits


def _complete(root: Path, settings_hash: str) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    zoo = _zoo_at(root)
    paths = [zoo.base, zoo.tasks_yaml, *zoo.experts.values()]
    return (
        manifest.get("complete") is True
        and manifest.get("settings_hash") == settings_hash
        and all(p.exists() for p in paths)
    )


def build_zoo(
    root: Path, size: str = "default", seed: int = 0, progress: BuildProgress | None = None
) -> Zoo:
    """Build (or reuse) the demo zoo in `root`: data/, tasks.yaml, base/, experts/<task>/.

    A folder holding a complete zoo with the same settings is reused as is. Otherwise the zoo is
    built in a temporary sibling folder and renamed into place at the end, so an interrupted
    build leaves nothing half-made. An existing zoo built with other settings is replaced; any
    other existing non-empty folder is refused.
    """
    if size not in SIZES:
        raise UserError(f"zoo size {size!r}: valid sizes are {', '.join(SIZES)}")
    root = Path(root)
    settings = _settings(size, seed)
    settings_hash = hash_json(settings)
    if _complete(root, settings_hash):
        return _zoo_at(root)
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise UserError(f"{root}: exists and is not a divmerge demo zoo; choose an empty folder")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        start = time.perf_counter()
        with one_thread():
            fits = _build_into(tmp, size, seed, progress)
        built = _zoo_at(tmp)
        manifest = {
            "complete": True,
            "settings_hash": settings_hash,
            "settings": settings,
            "tasks": list(TASKS),
            # the models' bytes: another machine's build of the same settings differs here
            "models_hash": hash_json(
                [hash_model_dir(p) for p in [built.base, *built.experts.values()]]
            ),
            "experts": fits,
            # what the bytes also depend on (float rounding differs across these), for a reader
            "built_with": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            },
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if root.exists():
            shutil.rmtree(root)  # a stale zoo (other settings or unfinished); checked above
        os.replace(tmp, root)
    except OSError:
        # Another process may have renamed its finished zoo into place first: use it.
        shutil.rmtree(tmp, ignore_errors=True)
        if _complete(root, settings_hash):
            return _zoo_at(root)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _zoo_at(root)


def read_manifest(root: Path) -> dict:
    """The manifest of a built zoo (settings, build time, each expert's validation score)."""
    return json.loads((Path(root) / MANIFEST).read_text())


def missed_targets(zoo: Zoo) -> list[str]:
    """One line per expert that ended under its validation target (its last round's score)."""
    return [
        f"demo expert {name} scores {fit['validation']:.3f} on its validation rows after "
        f"{fit['steps']} fine-tuning steps, under its target {fit['target']:.2f}; merges are "
        f"compared with a weak expert on {name}"
        for name, fit in read_manifest(zoo.root)["experts"].items()
        if not fit["reached"]
    ]


def drop_stale_results(results: Path, zoo: Zoo) -> bool:
    """Delete `results` if it was computed on another build of the zoo; True if it was.

    Sweep results are keyed by the experts' paths, and a rebuilt zoo (new settings, a new
    ZOO_VERSION, another machine) keeps the paths: without this, its old cells and references
    would be shown as the new zoo's. A file beside `results` records the models they belong to.
    """
    stamp = results.with_name(results.name + ".zoo")
    built = read_manifest(zoo.root)["models_hash"]
    stale = results.exists() and (not stamp.is_file() or stamp.read_text() != built)
    if stale:
        results.unlink()
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(built)
    return stale
