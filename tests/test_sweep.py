"""Sweeps (divmerge_cli/sweep/): schema errors, ANP tables by hand, an end-to-end sweep, resume after a crash."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_eval_cli import spy_devices

from divmerge_cli import sft, sweep, tiny
from divmerge_cli.demo_zoo import TASKS as ZOO_TASKS
from divmerge_cli.demo_zoo import build_zoo
from divmerge_cli.errors import UserError
from divmerge_cli.hf import load_model, load_tokenizer

EXAMPLE = Path(__file__).resolve().parent.parent / "recipes" / "sweep.example.yaml"
TASKS3 = ("sentiment", "topic", "translation")


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("sweep_zoo") / "zoo", "small")


@pytest.fixture(scope="session")
def experts(small_zoo, tmp_path_factory) -> dict[str, Path]:
    """The small zoo's base fine-tuned 50 steps on three of its tasks. The zoo's own small experts
    (6 steps) mostly score 0 on their task, which leaves ANP undefined (see test below)."""
    root = tmp_path_factory.mktemp("sweep_experts")
    tok = load_tokenizer(small_zoo.base)
    out = {}
    for i, name in enumerate(TASKS3):
        task = ZOO_TASKS[name]
        rows = [json.loads(x) for x in small_zoo.train_file(name).read_text().splitlines()]
        model = load_model(small_zoo.base)
        examples = [(task.prompt.format(**r), " " + r[task.target]) for r in rows]
        sft.finetune(model, tok, examples, steps=50, batch_size=8, lr=3e-3, seed=1 + i)
        out[name] = tiny.save(model, tok, root / name)
    return out


def write_sweep(folder: Path, zoo, experts: dict[str, Path], **fields) -> Path:
    specs = zoo.task_specs()
    raw = {
        "base_model": str(zoo.base),
        "experts": {t: str(p) for t, p in experts.items()},
        "tasks": {t: specs[t].model_dump(exclude_none=True) for t in experts},
        "k": [2, 3],
        "methods": {"average": {"merge_method": "linear"}},
        "eval": {"limit": 6, "batch_size": 8},
        **fields,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def lines_of(path: Path, kind: str) -> list[dict]:
    return [r for r in sweep.read_results(path) if r.get("type") == kind]


# ----------------------------------------------------------------------------- tables by hand


def cell(label: str, subset: str, anp: float) -> dict:
    s = subset.split("+")
    return {"type": "cell", "label": label, "key": "h", "subset": s, "k": len(s), "anp": anp}


HAND_ROWS = [
    {"type": "reference", "task": "a", "metric": "accuracy", "score": 0.8, "n": 10, "expert": "e"},
    cell("avg", "a+b", 0.9),
    cell("avg", "a+c", 0.8),
    cell("avg", "b+c", 1.0),
    cell("avg", "a+b+c", 0.7),
    cell("ties", "a+b", 0.5),
    cell("ties", "a+c", 0.7),
]


def test_pairwise_table_is_mean_std_and_ci_over_pairs_by_hand():
    t = sweep.pairwise_table(HAND_ROWS)
    assert t.columns == ["method", "pairs", "mean", "std", "ci95"]
    (a_label, a_n, a_mean, a_sd, a_ci), (b_label, b_n, b_mean, b_sd, b_ci) = t.rows
    # avg: 90, 80, 100 -> mean 90, sample std sqrt((0 + 100 + 100) / 2) = 10
    assert (a_label, a_n) == ("avg", 3)
    assert a_mean == pytest.approx(90) and a_sd == pytest.approx(10)
    assert a_ci == pytest.approx(1.96 * 10 / math.sqrt(3))
    # ties: 50, 70 -> mean 60, std sqrt((100 + 100) / 1) = 14.142, ci 1.96 * 14.142 / sqrt(2)
    assert (b_label, b_n) == ("ties", 2)
    assert b_mean == pytest.approx(60) and b_sd == pytest.approx(math.sqrt(200))
    assert b_ci == pytest.approx(19.6)


def test_per_k_table_average_is_mean_of_per_k_means():
    t = sweep.per_k_table(HAND_ROWS)
    assert t.columns == ["k", "avg", "ties"]
    assert t.rows[0] == [2, pytest.approx(90), pytest.approx(60)]
    assert t.rows[1] == [3, pytest.approx(70), None]  # no k = 3 cell for ties
    # (90 + 70) / 2 = 80, as the paper's tables; the mean over all 4 subsets would be 85
    assert t.rows[2] == ["Average", pytest.approx(80), pytest.approx(60)]
    md = sweep.to_markdown(t)
    assert "| k | avg | ties |" in md
    assert "| 3 | 70.00 | - |" in md and "| Average | 80.00 | 60.00 |" in md
    parsed = list(csv.reader(io.StringIO(sweep.to_csv(t))))
    assert parsed[0] == ["k", "avg", "ties"] and parsed[2] == ["3", "70.0", ""]
    assert float(parsed[3][1]) == pytest.approx(80)


def test_paper_table7_average_row():
    """Table 7, model averaging: per-k ANP 97.92, 82.62, 53.38 -> Average 77.97."""
    rows = [
        cell("avg", "+".join("abcd"[:k]), v) for k, v in ((2, 0.9792), (3, 0.8262), (4, 0.5338))
    ]
    assert sweep.per_k_table(rows).rows[-1][1] == pytest.approx(77.97, abs=0.005)


def test_parse_k():
    assert sweep.parse_k("2..4", 4) == [2, 3, 4]
    assert sweep.parse_k(3, 4) == [3]
    assert sweep.parse_k([3, 2, 2], 4) == [2, 3]
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        sweep.parse_k([0, 2], 4)


# ----------------------------------------------------------------------------- sweep files


def test_example_sweep_validates_against_the_small_zoo(tmp_path, small_zoo, monkeypatch):
    shutil.copy(EXAMPLE, tmp_path / "sweep.yaml")
    monkeypatch.setenv("DIVMERGE_ZOO", str(small_zoo.root))  # the example names the demo zoo
    cfg = sweep.load_sweep(tmp_path / "sweep.yaml")
    assert list(cfg.tasks) == list(ZOO_TASKS)
    assert cfg.ks == [2, 3, 4]
    assert cfg.results == (small_zoo.root / "sweep_example" / "results.jsonl").resolve()
    assert cfg.experts["topic"] == (small_zoo.root / "experts" / "topic").resolve()
    assert len(cfg.subsets()) == 6 + 4 + 1
    assert len(cfg.cells()) == 11 * len(cfg.methods)
    assert cfg.methods["ties"] == {
        "merge_method": "ties",
        "parameters": {"density": 0.2, "lambda": 1.0},
    }
    sweep.check_checkpoints(cfg)  # headers of base and experts agree


@pytest.fixture
def fake(tmp_path) -> Path:
    """Folders and data enough to validate a sweep file (no weights are loaded)."""
    for d in ("base", "ea", "eb", "ec"):
        (tmp_path / d).mkdir()
    (tmp_path / "a.jsonl").write_text('{"x": "1", "y": "2"}\n')
    task = {"validation": "a.jsonl", "test": "a.jsonl", "prompt": "{x}", "target": "y"}
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump({t: task for t in "abc"}))
    return tmp_path


GOOD = {
    "base_model": "./base",
    "experts": {"a": "./ea", "b": "./eb", "c": "./ec"},
    "tasks": "tasks.yaml",
    "k": [2],
    "methods": {"avg": {"merge_method": "linear"}},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": {}}, "method: unknown key (did you mean 'methods'?)"),
        ({"base_model": None}, "base_model: Input should be a valid string"),
        ({"k": 4}, "k: 4 is out of range; there are 3 tasks, so k must be in [1, 3]"),
        ({"k": "3..2"}, "k: '3..2' is empty"),
        ({"k": "two"}, "k: 'two' is not a range"),
        ({"experts": {"a": "./ea", "b": "./eb"}}, "experts: no expert for task 'c'"),
        ({"experts": {**GOOD["experts"], "d": "./ea"}}, "experts.d: no task 'd' under tasks"),
        ({"experts": {**GOOD["experts"], "a": "./nope"}}, "experts.a: folder not found"),
        ({"eval": {"split": "dev"}}, "eval.split: Input should be 'validation' or 'test'"),
        ({"eval": {"limt": 3}}, "eval.limt: unknown key (did you mean 'limit'?)"),
        (
            {"methods": {"x": {"merge_method": "tie"}}},
            "methods.x: merge_method: unknown method 'tie' (did you mean 'ties'?)",
        ),
        (
            {"methods": {"x": {"merge_method": "linear", "params": {}}}},
            "methods.x.params: unknown key (did you mean 'parameters'?)",
        ),
        (
            {"methods": {"t": {"merge_method": "ties", "parameters": {"density": 1.5}}}},
            "methods.t: parameters.density: 1.5 is out of range; density must be in (0, 1]",
        ),
        (
            {"methods": {"d": {"merge_method": "divmerge", "parameters": {"epoch": 1}}}},
            "methods.d: parameters.epoch: not a parameter of divmerge (did you mean 'epochs'?)",
        ),
        (
            {"k": [1, 2], "methods": {"s": {"merge_method": "slerp"}}},
            "methods.s: models: slerp interpolates exactly two models",  # base + one expert
        ),
        ({"methods": {"a/b": {"merge_method": "linear"}}}, "methods.a/b: a label names a folder"),
    ],
)
def test_bad_sweep_files_name_the_field(fake, change, message):
    path = fake / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(UserError) as e:
        sweep.load_sweep(path)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_good_fake_sweep_loads(fake):
    path = fake / "sweep.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    cfg = sweep.load_sweep(path)
    assert cfg.subsets() == [("a", "b"), ("a", "c"), ("b", "c")]
    assert cfg.base_model == (fake / "base").resolve()


def test_subsets_per_k_is_a_seeded_sample_in_combination_order(fake):
    path = fake / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "k": "1..3", "subsets_per_k": 2}))
    cfg = sweep.load_sweep(path)
    got = cfg.subsets()
    by_k = {k: [s for s in got if len(s) == k] for k in (1, 2, 3)}
    assert [len(v) for v in by_k.values()] == [2, 2, 1]  # C(3,3) = 1 < 2: kept whole
    for k, picked in by_k.items():
        combos = list(itertools.combinations("abc", k))
        assert all(s in combos for s in picked)
        assert picked == sorted(picked, key=combos.index)  # combination order
    assert sweep.load_sweep(path).subsets() == got  # the same sample on every load
    seeds = {tuple(sweep.load_sweep(_with(path, seed=s)).subsets()) for s in range(20)}
    assert len(seeds) > 1  # the seed decides the sample


def _with(path: Path, **fields) -> Path:
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, **fields}))
    return path


# ----------------------------------------------------------------------------- running


def test_sweep_end_to_end(tmp_path, small_zoo, experts):
    dm = {"granularity": "task", "epochs": 1, "samples": 4, "batch_size": 4, "top_k": 8}
    methods = {
        "average": {"merge_method": "linear"},
        "ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
        "dm": {"merge_method": "divmerge", "parameters": dm},
    }
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[1, 2, 3])
    cfg = sweep.load_sweep(path)
    killed = subprocess.Popen(["true"])
    killed.wait()  # a sweep killed while scoring a cell left its merged model behind
    (tmp_path / "s" / "results-merged" / f".cell-{killed.pid}-x" / "merged").mkdir(parents=True)
    events = []
    out = sweep.run_sweep(cfg, lambda *a: events.append(a), cache_dir=tmp_path / "cache")
    rows = sweep.cell_rows(out)

    refs = {r["task"]: r["score"] for r in lines_of(cfg.results, "reference")}
    assert list(refs) == list(TASKS3) and all(s > 0 for s in refs.values())
    assert lines_of(cfg.results, "cell") == rows
    assert out[:3] == lines_of(cfg.results, "reference")
    assert len(rows) == (3 + 3 + 1) * 3
    assert [(r["label"], tuple(r["subset"])) for r in rows] == cfg.cells()
    for r in rows:  # Eq. 5 by hand from the stored scores
        want = sum(r["scores"][t] / refs[t] for t in r["subset"]) / r["k"]
        assert r["anp"] == pytest.approx(want)
        assert r["k"] == len(r["subset"]) and r["seconds"] > 0
        assert 0 < r["merge_seconds"] < r["seconds"]  # scoring comes after the merge
        assert r["merge_cpu_seconds"] > 0
        if sys.platform == "linux":  # a merge reads at least the tiny experts it merges
            assert r["merge_peak_rss_mb"] > 0
    # one expert averaged alone, or added to theta0 with lambda 1, is that expert: ANP 1
    # (the base is not averaged in: the paper's model averaging is the mean of the experts)
    assert [r["anp"] for r in rows if r["k"] == 1 and r["label"] != "dm"] == [1.0] * 6
    for r in (r for r in rows if r["label"] == "dm"):
        assert list(r["gamma"]) == r["subset"] and r["groups"] == ["all"]
        # 4 samples per task, batch 4, 1 epoch -> k steps; the trace ends at the learned Gamma
        assert [x["step"] for x in r["trace"]] == list(range(1, r["k"] + 1))
        assert r["trace"][-1]["gamma"] == list(r["gamma"].values())
        assert r["steps"] == r["k"] and r["epochs"]["stopped"] == "fixed"
        assert [c["epoch"] for c in r["epochs"]["curve"]] == [0, 1]  # the initial Gamma, then 1
    assert not (tmp_path / "s" / "results-merged").exists()  # merged models were deleted
    assert sum(e[0] == "cell" for e in events) == len(rows)

    written = sweep.write_reports(out, tmp_path / "report")
    names = {p.name for p in written}
    assert names == {"tables.md", "pairwise.csv", "per_k.csv", "anp_vs_k.png", "gamma_trace.png"}
    assert all(p.stat().st_size > 0 for p in written)
    per_k = list(csv.reader((tmp_path / "report" / "per_k.csv").open()))
    assert per_k[0] == ["k", "average", "ta", "dm"] and [r[0] for r in per_k[1:]] == [
        "1",
        "2",
        "3",
        "Average",
    ]
    md = (tmp_path / "report" / "tables.md").read_text()
    assert "| sentiment | accuracy |" in md  # the references table


def test_sweep_prints_what_a_method_ignores_once(tmp_path, small_zoo, experts, cli):
    methods = {"ta": {"merge_method": "task_arithmetic", "parameters": {"density": 0.2}}}
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[1])
    code, _, err = cli("sweep", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    line = f"{path}: methods.ta: parameters.density: ignored; task_arithmetic takes no density"
    assert " ".join(err.split()).count(line) == 1, err


def test_sweep_without_matplotlib_says_once_that_it_drew_no_plot(
    tmp_path, small_zoo, experts, cli, monkeypatch
):
    methods = {"ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}}}
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[1])
    code, _, err = cli("sweep", path, "--cache-dir", tmp_path / "cache")
    assert code == 0 and "warning" not in err and (tmp_path / "s" / "anp_vs_k.png").is_file()
    (tmp_path / "s" / "anp_vs_k.png").unlink()
    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    code, out, err = cli("sweep", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert " ".join(err.split()).count("warning: plots not drawn") == 1, err
    assert "matplotlib is not installed" in err and "divmerge[plot]" in err
    assert not (tmp_path / "s" / "anp_vs_k.png").exists()


def test_sweep_records_each_phase_whole_in_a_log(tmp_path, small_zoo, experts, cli, monkeypatch):
    """Off a terminal: the experts' scoring ends, and a cell's record keeps its whole label."""
    label = "task_arithmetic_with_a_label_longer_than_a_bar"
    methods = {label: {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}}}
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[3])
    monkeypatch.setenv("DIVMERGE_PROGRESS_INTERVAL", "3600")
    code, _, err = cli("sweep", path, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    records = [x for x in err.splitlines() if x.startswith("progress: ")]
    assert records[0] == "progress: experts: started, 0/3 - sentiment"
    assert records[1].startswith("progress: experts: done, 3/3 in ")
    cell = f"{label} sentiment+topic+translation: ANP "
    assert re.fullmatch(
        rf"progress: cells: done, 1/1 in \S+ - {re.escape(cell)}\d+\.\d\d", records[-1]
    )


def test_sweep_method_option_runs_only_those_cells(tmp_path, small_zoo, experts, cli):
    methods = {
        "ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
        "half": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    }
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[1])
    code, _, err = cli("sweep", path, "--cache-dir", tmp_path / "cache", "--method", "half")
    assert code == 0, err
    cells = lines_of(sweep.load_sweep(path).results, "cell")
    assert [r["label"] for r in cells] == ["half"] * 3
    code, _, err = cli("sweep", path, "--cache-dir", tmp_path / "cache", "--method", "haf")
    assert code != 0 and "Traceback" not in err
    assert f"{path}: methods: no method labelled 'haf' (did you mean 'half'?)" in " ".join(
        err.split()
    )
    assert len(lines_of(sweep.load_sweep(path).results, "cell")) == 3  # nothing ran


def test_sweep_scores_on_its_device_and_merges_data_free_on_the_cpu(
    tmp_path, small_zoo, experts, cli, monkeypatch
):
    """`sweep --device cuda` (a pretend device here): the experts and the merged cells are scored
    there, and task arithmetic, a CPU method, still merges (it would fail beside a device)."""
    seen = spy_devices(monkeypatch)
    methods = {"ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}}}
    path = write_sweep(tmp_path / "s", small_zoo, experts, methods=methods, k=[1])
    code, _, err = cli("sweep", path, "--device", "cuda")
    assert code == 0, err
    assert seen == ["cuda:7"] * 6  # three references, three one-expert cells
    assert [r["anp"] for r in lines_of(sweep.load_sweep(path).results, "cell")] == [1.0] * 3


def test_reuse_cells_copies_shared_cells_so_the_sweep_skips_them(
    tmp_path, small_zoo, experts, monkeypatch
):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "zoo_reuse", EXAMPLE.parents[1] / "scripts/zoo/reuse_cells.py"
    )
    reuse = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reuse)
    ta = {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}}
    half = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}}
    src_cfg = sweep.load_sweep(
        write_sweep(tmp_path / "a", small_zoo, experts, methods={"ta": ta}, k=[1])
    )
    src = sweep.cell_rows(sweep.run_sweep(src_cfg))
    path = write_sweep(tmp_path / "b", small_zoo, experts, methods={"ta": ta, "half": half}, k=[1])

    assert reuse.reuse(path, [src_cfg.results]) == 3
    assert reuse.reuse(path, [src_cfg.results]) == 0  # already there
    cfg = sweep.load_sweep(path)
    assert lines_of(cfg.results, "reference") == lines_of(src_cfg.results, "reference")

    def no_scoring(*a, **kw):
        raise AssertionError("a copied cell was scored again")

    monkeypatch.setattr(sweep.run, "evaluate_model", no_scoring)
    rows = sweep.cell_rows(sweep.run_sweep(cfg, only=["ta"]))
    assert rows == src

    other = write_sweep(tmp_path / "c", small_zoo, experts, methods={"ta": ta}, k=[1], seed=3)
    with pytest.raises(UserError, match=rf"^{src_cfg.results} \(from .*\): written with seed = 0"):
        reuse.reuse(other, [src_cfg.results])
    assert not sweep.load_sweep(other).results.exists()  # nothing written


def test_interrupted_sweep_resumes_without_redoing_cells(tmp_path, small_zoo, experts, monkeypatch):
    methods = {
        "ties": {"merge_method": "ties", "parameters": {"density": 0.2}},
        "ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    }
    real = sweep.run.evaluate_model
    expert_dirs = {p.resolve() for p in experts.values()}
    calls = {"expert": 0, "merged": 0}
    fail_after = {"n": None}

    def counting(model_dir, *args, **kw):
        kind = "expert" if Path(model_dir).resolve() in expert_dirs else "merged"
        if kind == "merged" and calls["merged"] == fail_after["n"]:
            raise RuntimeError("killed")
        calls[kind] += 1
        return real(model_dir, *args, **kw)

    monkeypatch.setattr(sweep.run, "evaluate_model", counting)
    n_cells = (3 + 1) * 2

    # uninterrupted, for comparison
    full_cfg = sweep.load_sweep(write_sweep(tmp_path / "full", small_zoo, experts, methods=methods))
    full = sweep.cell_rows(sweep.run_sweep(full_cfg))
    assert calls == {"expert": 3, "merged": n_cells}
    assert any(r["anp"] > 0 for r in full)  # so that equal tables below say something

    cfg = sweep.load_sweep(write_sweep(tmp_path / "cut", small_zoo, experts, methods=methods))
    calls.update(expert=0, merged=0)
    fail_after["n"] = 2
    with pytest.raises(RuntimeError, match="killed"):
        sweep.run_sweep(cfg)
    assert len(lines_of(cfg.results, "cell")) == 2  # the third cell wrote nothing
    assert not (tmp_path / "cut" / "results-merged").exists()  # its model and folder deleted
    with cfg.results.open("a") as f:
        f.write('{"type": "cell", "label": "ta", "ke')  # a crash in the middle of a write

    calls.update(expert=0, merged=0)
    fail_after["n"] = None
    resumed = sweep.cell_rows(sweep.run_sweep(cfg))
    assert calls == {"expert": 0, "merged": n_cells - 2}  # references and 2 cells were reused
    assert len(lines_of(cfg.results, "cell")) == n_cells
    assert sweep.per_k_table(resumed) == sweep.per_k_table(full)
    assert sweep.pairwise_table(resumed) == sweep.pairwise_table(full)
    assert [r["scores"] for r in resumed] == [r["scores"] for r in full]

    calls.update(expert=0, merged=0)
    assert sweep.cell_rows(sweep.run_sweep(cfg)) == resumed
    assert calls == {"expert": 0, "merged": 0}

    # a changed parameter is a new cell key: only that method's cells run again
    methods["ta"]["parameters"]["lambda"] = 0.7
    cfg2 = sweep.load_sweep(write_sweep(tmp_path / "cut", small_zoo, experts, methods=methods))
    rows2 = sweep.cell_rows(sweep.run_sweep(cfg2))
    assert calls == {"expert": 0, "merged": n_cells // 2}
    assert len(rows2) == n_cells  # the lambda 0.5 cells stay in the file but not in the tables
    assert len(lines_of(cfg.results, "cell")) == n_cells + n_cells // 2
    assert [r["key"] for r in rows2 if r["label"] == "ta"] == [
        sweep.method_key(sweep.build_recipe(cfg2, "ta", ("sentiment", "topic")))
    ] * (n_cells // 2)


def test_results_file_from_other_eval_settings_is_refused(tmp_path, small_zoo, experts):
    cfg = sweep.load_sweep(write_sweep(tmp_path, small_zoo, experts))
    sweep.append_row(cfg.results, {**sweep.header_row(cfg), "eval": {"split": "test", "limit": 99}})
    with pytest.raises(UserError, match="written with eval = .* use another `results:` file"):
        sweep.run_sweep(cfg)


def test_expert_scoring_zero_makes_anp_undefined(tmp_path, small_zoo, monkeypatch):
    """An expert that answers nothing right on its task: refused before any merge."""
    from divmerge_cli.evaluate import TaskScore

    real = sweep.run.evaluate_model

    def zero_topic(model_dir, tasks, *a, **k):
        out = real(model_dir, tasks, *a, **k)
        return {t: TaskScore(s.metric, 0.0, s.n) if t == "topic" else s for t, s in out.items()}

    monkeypatch.setattr(sweep.run, "evaluate_model", zero_topic)
    zoo_experts = {t: small_zoo.experts[t] for t in ("sentiment", "topic")}
    cfg = sweep.load_sweep(write_sweep(tmp_path, small_zoo, zoo_experts, k=[2]))
    with pytest.raises(UserError, match="experts.topic scores 0 on its own task 'topic'"):
        sweep.run_sweep(cfg)
    assert lines_of(cfg.results, "cell") == []


def test_method_keys_are_stable_across_spellings_and_versions():
    """A results file names its cells by method_key: a key that changes silently reruns every
    cell of an existing sweep. These are the keys of earlier versions (switches were numbers)."""
    from divmerge_cli.recipe import recipe_from_dict

    def key(method, **params):
        raw = {"merge_method": method, "base_model": "b", "models": [{"model": "x"}]}
        return sweep.method_key(recipe_from_dict({**raw, "parameters": params}, Path("r.yaml")))

    assert key("ties") == key("ties", normalize=True) == key("ties", normalize=1)
    assert key("ties") == "25aa65dbf4ea8d8a"
    assert key("dare_ties", density=0.5) == "f68ac3557575a397"
    assert key("linear") == "c68a872394767972"
    assert key("task_arithmetic", **{"lambda": 0.5}) == "d4b8f285ad4c3db6"
    assert key("ties", normalize=False) != key("ties")


def test_learned_method_keys_ignore_where_task_vectors_live_and_later_defaults():
    from divmerge_cli.recipe import recipe_from_dict

    def key(**params):
        raw = {
            "merge_method": "divmerge",
            "base_model": "b",
            "models": [{"model": "x", "task": "t"}],
            "tasks": {"t": {"validation": "v.jsonl", "prompt": "{text}"}},
        }
        return sweep.method_key(recipe_from_dict({**raw, "parameters": params}, Path("r.yaml")))

    assert key(granularity="task") == "06c191403cb68b8d"  # the key before these parameters
    assert key(granularity="task", task_vectors="stream") == key(granularity="task")
    assert key(granularity="task", base_method="task_arithmetic") == key(granularity="task")
    assert key(granularity="task", base_method="ties") != key(granularity="task")


def test_results_file_keeps_its_references_across_task_fields_added_later(tmp_path):
    from divmerge_cli.hashing import hash_json
    from divmerge_cli.sweep.results import check_results_file, header_row, spec_hash

    for name in ("base", "e"):
        (tmp_path / name).mkdir()
    for split in ("validation", "test"):
        (tmp_path / f"{split}.jsonl").write_text('{"x": "a", "y": "b"}\n')
    task = {"validation": "validation.jsonl", "test": "test.jsonl", "prompt": "{x}", "target": "y"}
    raw = {"base_model": "base", "experts": {"t": "e"}, "tasks": {"t": task}, "k": [1]}
    raw["methods"] = {"ta": {"merge_method": "task_arithmetic"}}
    cfg = sweep.sweep_from_dict(raw, tmp_path / "sweep.yaml")
    spec = cfg.tasks["t"]
    ref = {"type": "reference", "task": "t", "expert": str(cfg.experts["t"])}
    # before `sha256` existed, a task's hash had no such key; then it was hashed as null for a while
    before = hash_json({k: v for k, v in spec.model_dump(mode="json").items() if k != "sha256"})
    assert spec_hash(spec) == before[:16]
    for written in (before[:16], hash_json(spec.model_dump(mode="json"))[:16]):
        check_results_file(cfg, [header_row(cfg), {**ref, "spec": written}])
    other = spec.model_copy(update={"prompt": "{x}?"})
    with pytest.raises(UserError, match="another expert or task definition"):
        check_results_file(cfg, [header_row(cfg), {**ref, "spec": spec_hash(other)}])


# --- issue 23, item 4: two sweeps on one results file, a failing cell, values run refuses -------


def test_a_second_sweep_on_one_results_file_is_refused(tmp_path, small_zoo, experts):
    from test_hardening import HOLD_LOCK, _spawn

    cfg = sweep.load_sweep(write_sweep(tmp_path / "s", small_zoo, experts, k=[2]))
    holder = _spawn([str(cfg.results)], HOLD_LOCK)  # as a running sweep holds it
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"results {cfg.results}: another divmerge run "):
            sweep.run_sweep(cfg)
        assert not cfg.results.exists()  # no cell computed a second time
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("keep", [True, False])
def test_a_cell_whose_merge_is_not_finite_is_named_and_leaves_no_folder(
    keep, tmp_path, small_zoo, experts
):
    two = {t: experts[t] for t in TASKS3[:2]}
    huge = {"merge_method": "task_arithmetic", "parameters": {"lambda": 1e30}}
    methods = {"huge": {**huge, "out_dtype": "float16"}}
    path = write_sweep(tmp_path / "s", small_zoo, two, k=[2], methods=methods, keep_merged=keep)
    cfg = sweep.load_sweep(path)
    with pytest.raises(UserError, match=r"cell huge sentiment\+topic: tensor .* NaN or Inf"):
        sweep.run_sweep(cfg)
    assert not (tmp_path / "s" / "results-merged").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 2**40}, "seed: 1099511627776 is not valid; use an integer in [0, 2**32)"),
        ({"seed": -1}, "seed: -1 is not valid"),
        ({"seed": True}, "seed: True is not valid"),
        ({"eval": {"limit": True}}, "eval.limit: "),
        ({"subsets_per_k": True}, "subsets_per_k: "),
        (
            {"methods": {"t": {"merge_method": "ties", "parameters": {"density": True}}}},
            "parameters.density: True is not a number",
        ),
        (
            {"methods": {"m": {"merge_method": "multislerp", "parameters": {"eps": -1}}}},
            "parameters.eps: -1.0 is out of range; eps must be in (0, inf)",
        ),
        (
            {"methods": {"d": {"merge_method": "divmerge", "parameters": {"epochs": True}}}},
            "parameters.epochs: ",
        ),
    ],
)
def test_a_sweep_refuses_what_run_refuses(fake, change, message):
    path = fake / "sweep.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(UserError) as e:
        sweep.load_sweep(path)
    assert message in str(e.value)
