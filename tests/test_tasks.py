"""tasks.py: loading the `tasks:` mapping, reading rows, rendering prompts, pre-flight checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divmerge_cli.errors import UserError
from divmerge_cli.tasks import TaskSpec, check_task, load_rows, load_tasks, render_prompt


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"text": f"review {i}", "label": "positive" if i % 2 else "negative"} for i in range(50)]


# --- load_tasks ------------------------------------------------------------------------------


def test_inline_tasks_resolve_paths_against_base_dir(tmp_path):
    raw = {
        "sst2": {
            "validation": "data/val.jsonl",
            "test": "/abs/test.csv",
            "prompt": "Review: {text}",
        }
    }
    tasks = load_tasks(raw, tmp_path, "recipe.yaml")
    assert list(tasks) == ["sst2"]
    assert tasks["sst2"].validation == str((tmp_path / "data/val.jsonl").resolve())
    assert tasks["sst2"].test == str(Path("/abs/test.csv").resolve())
    assert tasks["sst2"].max_new_tokens == 16 and tasks["sst2"].metric == "accuracy"
    assert load_tasks(None, tmp_path, "recipe.yaml") == {}


def test_tasks_file_paths_are_relative_to_that_file(tmp_path):
    sub = tmp_path / "tasks"
    sub.mkdir()
    (sub / "tasks.yaml").write_text(
        "news:\n  validation: news.jsonl\n  prompt: '{body}'\n  metric: rouge1\n"
    )
    tasks = load_tasks("tasks/tasks.yaml", tmp_path, "recipe.yaml")
    assert tasks["news"].validation == str((sub / "news.jsonl").resolve())
    assert tasks["news"].metric == "rouge1"


def test_missing_field_names_file_and_field(tmp_path):
    with pytest.raises(UserError) as e:
        load_tasks({"sst2": {"validation": "v.jsonl"}}, tmp_path, "recipe.yaml")
    assert str(e.value) == "recipe.yaml: tasks.sst2.prompt: required field is missing"


def test_missing_field_in_tasks_file_names_that_file(tmp_path):
    (tmp_path / "t.yaml").write_text("sst2:\n  validation: v.jsonl\n")
    with pytest.raises(UserError) as e:
        load_tasks("t.yaml", tmp_path, "recipe.yaml")
    assert str(e.value) == f"{tmp_path / 't.yaml'}: sst2.prompt: required field is missing"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError) as e:
        load_tasks({"sst2": {"promt": "{text}"}}, tmp_path, "recipe.yaml")
    msg = str(e.value)
    assert msg.startswith("recipe.yaml: tasks.sst2.promt: unknown key (did you mean 'prompt'?)")
    assert "valid keys: validation, test, prompt, target, metric, max_new_tokens" in msg


def test_bad_metric_and_template(tmp_path):
    with pytest.raises(
        UserError, match=r"recipe.yaml: tasks.t.metric: .*'accuracy' or 'rouge1'.*'bleu'"
    ):
        load_tasks({"t": {"prompt": "{x}", "metric": "bleu"}}, tmp_path, "recipe.yaml")
    with pytest.raises(UserError, match=r"recipe.yaml: tasks.t.prompt: bad template"):
        load_tasks({"t": {"prompt": "Review: {text"}}, tmp_path, "recipe.yaml")
    with pytest.raises(UserError, match=r"tasks.t.prompt: placeholders must name a field"):
        load_tasks({"t": {"prompt": "Review: {}"}}, tmp_path, "recipe.yaml")


def test_tasks_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="recipe.yaml: tasks: expected a mapping"):
        load_tasks(["sst2"], tmp_path, "recipe.yaml")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"recipe.yaml: tasks.sst2: expected a mapping of fields"):
        load_tasks({"sst2": "x"}, tmp_path, "recipe.yaml")
    with pytest.raises(UserError, match=r"recipe.yaml: tasks: file not found: .*nope.yaml"):
        load_tasks("nope.yaml", tmp_path, "recipe.yaml")


# --- load_rows -------------------------------------------------------------------------------


def test_jsonl_and_csv_rows_are_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 1, "ok": true}\n\n{"text": "b", "label": 0, "ok": null}\n')
    assert load_rows(p) == [
        {"text": "a", "label": "1", "ok": "true"},
        {"text": "b", "label": "0", "ok": "null"},
    ]
    c = tmp_path / "d.csv"
    c.write_text('text,label\n"hello, world",1\nbye,0\n', encoding="utf-8")
    assert load_rows(c) == [{"text": "hello, world", "label": "1"}, {"text": "bye", "label": "0"}]


def test_row_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing.jsonl: data file not found"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty.jsonl: no rows \(empty data file\)"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"empty.csv: no rows"):
        load_rows(tmp_path / "empty.csv")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(
        UserError, match=r"d.parquet: unknown data format '.parquet'; use one of .jsonl, .csv"
    ):
        load_rows(tmp_path / "d.parquet")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON"):
        load_rows(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["b"]\n')
    with pytest.raises(UserError, match=r"list.jsonl:2: each line must be a JSON object, got list"):
        load_rows(tmp_path / "list.jsonl")
    (tmp_path / "ragged.csv").write_text("text,label\na,1,extra\n")
    with pytest.raises(UserError, match=r"ragged.csv:2: row has more fields than the header"):
        load_rows(tmp_path / "ragged.csv")


def test_seeded_subset_deterministic_nested_and_seed_dependent(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a, b = load_rows(p, limit=10, seed=0), load_rows(p, limit=10, seed=0)
    assert a == b and len(a) == 10
    assert load_rows(p, limit=10, seed=1) != a
    # file order kept, and a larger draw with the same seed contains the smaller one
    idx = [ROWS.index(r) for r in a]
    assert idx == sorted(idx)
    assert all(r in load_rows(p, limit=20, seed=0) for r in a)
    assert load_rows(p, limit=50) == ROWS and load_rows(p, limit=500) == ROWS
    with pytest.raises(UserError, match="must be >= 1"):
        load_rows(p, limit=0)


# --- render_prompt / check_task ----------------------------------------------------------------


def test_render_prompt():
    spec = TaskSpec(prompt="Review: {text}\nIs it {{positive}}? Answer:")
    assert (
        render_prompt("sst2", spec, {"text": "fine", "label": "1"})
        == "Review: fine\nIs it {positive}? Answer:"
    )
    with pytest.raises(UserError) as e:
        render_prompt("sst2", TaskSpec(prompt="Review: {txt}"), {"text": "a", "label": "1"})
    assert (
        str(e.value)
        == "task 'sst2': prompt placeholder {txt} is not a field of the row; fields: label, text"
    )


def test_check_task(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a"}, {"text": "b"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    spec = TaskSpec(validation=str(val), test=str(test), prompt="{text}", target="label")
    check_task("t", spec, "validation")
    with pytest.raises(
        UserError, match=r"test.jsonl:2: task 't': no target field 'label'; fields: text"
    ):
        check_task("t", spec, "test")
    with pytest.raises(UserError, match=r"val.jsonl:1: task 't': prompt placeholder \{body\}"):
        check_task("t", spec.model_copy(update={"prompt": "{body}"}), "validation")
    with pytest.raises(UserError, match=r"task 't': no `test` file given"):
        check_task("t", spec.model_copy(update={"test": None}), "test")
    with pytest.raises(UserError, match=r"task 't': `target` .* is needed for eval"):
        check_task("t", spec.model_copy(update={"target": None}), "test")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl: no rows"):
        check_task(
            "t", spec.model_copy(update={"validation": str(tmp_path / "empty.jsonl")}), "validation"
        )
    with pytest.raises(UserError, match=r"gone.jsonl: data file not found"):
        check_task(
            "t", spec.model_copy(update={"validation": str(tmp_path / "gone.jsonl")}), "validation"
        )
