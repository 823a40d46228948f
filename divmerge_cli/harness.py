"""lm-evaluation-harness tasks on local checkpoints, through lm-eval's Python API.

lm-eval is an optional extra (`pip install 'divmerge[harness]'`). The model is loaded from its
local folder by divmerge and handed to lm-eval's HFLM as an object, so lm-eval never resolves a
hub id; a task YAML whose data is a local file (`dataset_path: json`, `dataset_kwargs:
{data_files: ...}`) runs without a network. Task names from lm-eval's registry download their
data sets the way lm-eval does (hub access or its cache).
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, suggest
from .evaluate import TaskScore
from .models import load_scored

INSTALL = "pip install 'divmerge[harness]'"

# progress(done, total, info): batches of model calls finished for one request type.
HarnessProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class HarnessScore(TaskScore):
    """The task's first metric as `score`; every metric lm-eval reported in `metrics`."""

    metrics: dict[str, float] = field(default_factory=dict)
    source: str = "lm-eval"


@dataclass(frozen=True)
class HarnessTasks:
    """Validated --harness items: what lm-eval loads, and the task names they stand for."""

    items: list[str]  # registry names or absolute YAML paths
    names: list[str]
    manager: Any  # lm_eval.tasks.TaskManager, indexed once


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--harness needs lm-evaluation-harness: {INSTALL}") from None
    # Library code does not print: lm-eval logs at INFO/WARNING through its own loggers.
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets

    datasets.disable_progress_bars()  # lm-eval loads its data sets through `datasets`
    datasets.logging.set_verbosity_error()  # "Using the latest cached version ..."
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one "Retrying in 8s" warning per attempt, offline
    # `datasets` sends a download-count HEAD request to S3 for every load, even of a local JSON
    # file; a local task must not touch the network.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return lm_eval


def _is_yaml(item: str) -> bool:
    return item.endswith((".yaml", ".yml")) or Path(item).is_file()


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's `!function module.name` tags as plain strings."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: tag)


def _yaml_task_name(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"--harness {path}: file not found (a task name or a task YAML)")
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"--harness {path}: not valid YAML{at} ({getattr(e, 'problem', e)})"
        ) from None
    name = cfg.get("task") if isinstance(cfg, dict) else None
    if not isinstance(name, str):
        raise UserError(f"--harness {path}: no `task:` name (a task YAML names its task)")
    return name


def resolve_tasks(items: list[str]) -> HarnessTasks:
    """Check every --harness item (a registry name or a task YAML) and load each task once.

    Loading builds the data set, so a missing data file or an unreachable hub data set is
    reported here, before any model runs.
    """
    _lm_eval()
    from lm_eval.tasks import TaskManager

    entries = []  # (what lm-eval loads, the task name it stands for)
    for item in items:
        if _is_yaml(item):
            path = Path(item).resolve()
            entries.append((str(path), _yaml_task_name(path)))
        else:
            entries.append((item, item))
    dirs = sorted({str(Path(e).parent) for e, _ in entries if _is_yaml(e)})
    # The registry index takes seconds to build; skip it when only local YAMLs are asked for.
    registry = any(not _is_yaml(e) for e, _ in entries)
    manager = TaskManager(include_path=dirs or None, include_defaults=registry)
    known = set(manager.all_tasks)
    for item, name in entries:
        if not _is_yaml(item) and name not in known:
            raise UserError(
                f"--harness {item}: not an lm-eval task, group or tag{suggest(item, known)}; "
                "pass a task name or the path of a task YAML"
            )
    for item, _ in entries:
        _load(manager, item)
    return HarnessTasks([e for e, _ in entries], [n for _, n in entries], manager)


def only(tasks: HarnessTasks, names: set[str]) -> HarnessTasks:
    """The subset of `tasks` named in `names` (to score a reference on its own task)."""
    keep = [(i, n) for i, n in zip(tasks.items, tasks.names) if n in names]
    return HarnessTasks([i for i, _ in keep], [n for _, n in keep], tasks.manager)


LOCAL_YAML = (
    "a local task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: ...}` needs "
    "no network"
)


def _load(manager, item: str) -> dict:
    """The task, its data set from the local caches if they hold it, else from the hub, if the
    hub answers: offline, a hub load retries for most of a minute before it fails."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set by the user
    try:
        with _hub_offline():
            return manager.load([item])
    except Exception as e:  # not in the caches (or broken: said below, or by the online load)
        local_error = e
    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
        raise UserError(
            f"--harness {item}: lm-eval could not load the task from the local caches "
            f"({_first_line(local_error)}) and {why}; {LOCAL_YAML}"
        ) from None
    try:
        return manager.load([item])
    except Exception as e:  # data set download, missing data file, bad template ...
        raise UserError(
            f"--harness {item}: lm-eval could not load the task ({_first_line(e)}); {LOCAL_YAML}"
        ) from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub and `datasets` in offline mode: loads come from the local caches only."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host takes a connection within TIMEOUT. Behind a proxy a direct
    connection says nothing: assumed reachable."""
    import os
    import socket

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what lm-eval prints on its own: the per-document tqdm bar and `git describe`."""
    import lm_eval.api.task as task_mod
    import lm_eval.evaluator as evaluator_mod

    saved = task_mod.tqdm, evaluator_mod.get_git_commit_hash
    task_mod.tqdm = lambda it, *a, **k: it  # building requests; lm-eval offers no switch
    evaluator_mod.get_git_commit_hash = lambda: None  # its subprocess writes to stderr
    try:
        yield
    finally:
        task_mod.tqdm, evaluator_mod.get_git_commit_hash = saved


def _progress_lm(model, tokenizer, batch_size: int, progress: HarnessProgress | None):
    """An HFLM around a loaded model that reports each batch instead of drawing tqdm bars."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        def _run(self, kind: str, requests, **kw):
            self._kind, self._done = kind, 0
            self._total = max(1, math.ceil(len(requests) / batch_size))
            out = getattr(super(), kind)(requests, disable_tqdm=True, **kw)
            if progress:
                progress(self._total, self._total, kind)
            return out

        def _tick(self) -> None:
            self._done += 1
            if progress:
                progress(min(self._done, self._total), self._total, self._kind)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._run("loglikelihood", requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._run("loglikelihood_rolling", requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._run("generate_until", requests)

        def _model_call(self, *a, **k):
            out = super()._model_call(*a, **k)
            self._tick()
            return out

        def _model_generate(self, *a, **k):
            out = super()._model_generate(*a, **k)
            self._tick()
            return out

    return ProgressLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _primary(name: str, res: dict, configs: dict) -> tuple[str, float, dict[str, float]]:
    """(first metric of the task's metric_list, its value, every numeric metric)."""
    metrics = {
        k: float(v)
        for k, v in res.items()
        if "," in k and "_stderr" not in k and isinstance(v, int | float)
    }
    if not metrics:
        raise UserError(f"--harness {name}: lm-eval reported no numeric metric")
    wanted = [m.get("metric") for m in configs.get(name, {}).get("metric_list") or []]
    for key in metrics:
        if wanted and key.split(",")[0] == wanted[0]:
            return key, metrics[key], metrics
    key = next(iter(metrics))
    return key, metrics[key], metrics


def harness_scores(
    model_dir: str | Path,
    tasks: HarnessTasks,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: HarnessProgress | None = None,
    device: str = "cpu",
) -> dict[str, HarnessScore]:
    """Run the lm-eval tasks on the checkpoint in `model_dir` (or an adapter, folded in:
    lora.scored_model): {task: its first metric}."""
    from lm_eval import simple_evaluate

    model, tokenizer = load_scored(model_dir, str(model_dir))
    model.to(device)  # HFLM runs on the model's device
    with _quiet():
        lm = _progress_lm(model, tokenizer, batch_size, progress)
        res = simple_evaluate(
            model=lm,
            tasks=list(tasks.items),
            task_manager=tasks.manager,
            limit=limit,
            bootstrap_iters=0,  # stderr by bootstrap costs minutes and is not reported
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    n = res.get("n-samples", {})
    out = {}
    for name, r in res["results"].items():
        key, score, metrics = _primary(name, r, res.get("configs", {}))
        count = n.get(name, {}).get("effective", r.get("sample_len", 0))
        out[name] = HarnessScore(key, score, int(count), metrics)
    return out
