"""`divmerge run` / `validate` end to end on tiny fixture models, and the bad inputs it refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from conftest import write_recipe
from divmerge_cli import __version__, merge, tiny
from divmerge_cli.recipe import load_recipe


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ta_recipe(zoo, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo["e0"])},
            {"model": str(zoo["e1"]), "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 0.8},
        **extra,
    }


def test_run_writes_a_loadable_checkpoint_with_the_right_tensors(tmp_path, llama_zoo, cli):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo, dtype="float32"))
    code, out, err = cli("run", r, "-o", tmp_path / "m")
    assert code == 0, err
    w, b = weights(tmp_path / "m"), weights(llama_zoo["base"])
    e0, e1 = weights(llama_zoo["e0"]), weights(llama_zoo["e1"])
    for n in b:
        assert torch.allclose(
            w[n], b[n] + 0.8 * ((e0[n] - b[n]) + 0.5 * (e1[n] - b[n])), atol=1e-6
        ), n
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "divmerge_recipe.yaml",
        "README.md",
        "generation_config.json",
    } <= files
    assert "task_arithmetic" in (tmp_path / "m" / "README.md").read_text()
    assert load_recipe(tmp_path / "m" / "divmerge_recipe.yaml").parameters["lambda"] == 0.8
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    gen = model.generate(
        **tok(["the movie"], return_tensors="pt"), max_new_tokens=4, do_sample=False
    )
    assert gen.shape[1] > 2
    assert not list(tmp_path.glob(".m.divmerge-*"))


def test_t5_merge_reloads_as_seq2seq(tmp_path, t5_zoo, cli):
    r = write_recipe(
        tmp_path / "r.yaml",
        {**ta_recipe(t5_zoo), "merge_method": "ties", "parameters": {"density": 0.5}},
    )
    code, _, err = cli("run", r, "-o", tmp_path / "m")
    assert code == 0, err
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.generate(**tok(["the film"], return_tensors="pt"), max_new_tokens=3).shape[1] >= 2


def test_sharded_output_equals_single_file_and_out_dtype(tmp_path, llama_zoo, cli):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo, out_dtype="bfloat16"))
    assert cli("run", r, "-o", tmp_path / "one")[0] == 0
    assert cli("run", r, "-o", tmp_path / "many", "--out-shard-size", "20KB")[0] == 0
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    one, many = weights(tmp_path / "one"), weights(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert all(v.dtype == torch.bfloat16 for v in one.values())
    assert json.loads((tmp_path / "one" / "config.json").read_text())["dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(tmp_path / "many")


def test_tied_embeddings_stay_tied(tmp_path, tok, cli):
    base = tiny.tiny_llama(len(tok), tie_word_embeddings=True)
    b = tiny.save(base, tok, tmp_path / "b")
    e = tiny.save(tiny.perturbed(base, 0.02, 1), tok, tmp_path / "e")
    r = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "task_arithmetic", "base_model": str(b), "models": [{"model": str(e)}]},
    )
    assert cli("run", r, "-o", tmp_path / "m")[0] == 0
    assert "lm_head.weight" not in weights(tmp_path / "m")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_slerp_multislerp_linear_dare_run(tmp_path, llama_zoo, cli):
    z = llama_zoo
    recipes = {
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(z["base"]),
            "models": [{"model": str(z["e0"])}],
            "parameters": {"t": [0.0, 0.5, 1.0]},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": str(z["base"]),
            "models": [{"model": str(z[k])} for k in ("e0", "e1", "e2")],
        },
        "linear": {
            "merge_method": "linear",
            "models": [{"model": str(z[k])} for k in ("e0", "e1")],
        },
        "dare_ties": {**ta_recipe(z), "merge_method": "dare_ties", "parameters": {"density": 0.5}},
    }
    for name, rec in recipes.items():
        r = write_recipe(tmp_path / f"{name}.yaml", rec)
        code, _, err = cli("run", r, "-o", tmp_path / name)
        assert code == 0, (name, err)
    lin, e0, e1 = weights(tmp_path / "linear"), weights(z["e0"]), weights(z["e1"])
    assert all(torch.allclose(lin[k], (e0[k] + e1[k]) / 2, atol=1e-6) for k in lin)
    # slerp's t runs from 0 at block 0 to 1 at the last block; outside the blocks t = 0 (mergekit)
    s, b = weights(tmp_path / "slerp"), weights(z["base"])
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.allclose(s[k], b[k], atol=1e-6), k
    assert torch.allclose(
        s["model.layers.1.mlp.up_proj.weight"], e0["model.layers.1.mlp.up_proj.weight"], atol=1e-6
    )
    # dare is seeded: the same seed gives the same tensors, another seed different ones
    r = tmp_path / "dare_ties.yaml"
    assert cli("run", r, "-o", tmp_path / "d2", "--seed", "0")[0] == 0
    assert cli("run", r, "-o", tmp_path / "d3", "--seed", "1")[0] == 0
    d1, d2, d3 = (weights(tmp_path / n) for n in ("dare_ties", "d2", "d3"))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    assert not all(torch.equal(d1[k], d3[k]) for k in d1)


@pytest.mark.parametrize("threads", [1, 3])
def test_failure_mid_write_leaves_nothing_and_keeps_the_old_output(
    tmp_path, llama_zoo, monkeypatch, threads
):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo)))
    plan = merge.plan_merge(recipe)
    out = tmp_path / "m"
    out.mkdir()
    (out / "divmerge_recipe.yaml").write_text("# an earlier divmerge output\n")
    (out / "precious.txt").write_text("keep me")
    real, calls = merge.tensor_stages, []

    def failing(plan, name, gen, device):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return (yield from real(plan, name, gen, device))

    monkeypatch.setattr(merge, "tensor_stages", failing)
    with pytest.raises(RuntimeError):
        merge.run_merge(plan, out, force=True, threads=threads)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.yaml"]
    calls.clear()
    with pytest.raises(RuntimeError):
        merge.run_merge(plan, tmp_path / "fresh", threads=threads)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.yaml"]


def test_pickled_weights_need_allow_pickle(tmp_path, llama_zoo, cli):
    legacy = tmp_path / "legacy"
    shutil.copytree(llama_zoo["e0"], legacy)
    sd = load_file(legacy / "model.safetensors")
    (legacy / "model.safetensors").unlink()
    torch.save(sd, legacy / "pytorch_model.bin")
    r = write_recipe(
        tmp_path / "r.yaml", {**ta_recipe(llama_zoo), "models": [{"model": str(legacy)}]}
    )
    code, _, err = cli("run", r, "-o", tmp_path / "m")
    assert code == 2 and "--allow-pickle" in err
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--allow-pickle")
    assert code == 0, err
    w, b, e = weights(tmp_path / "m"), weights(llama_zoo["base"]), sd
    assert all(torch.allclose(w[k], b[k] + 0.8 * (e[k] - b[k]), atol=1e-6) for k in w)


# --- bad inputs: exit 2, one line naming the problem, nothing written -------------------------


def _mutants(z: dict, tmp: Path) -> dict[str, tuple[dict | str, str]]:
    ok = ta_recipe(z)
    wide = tmp / "wide"
    if not wide.exists():
        tok = AutoTokenizer.from_pretrained(z["base"])
        tiny.save(tiny.tiny_llama(len(tok), hidden=48), tok, wide)
    nan = tmp / "nan"
    if not nan.exists():
        shutil.copytree(z["e1"], nan)
        sd = load_file(nan / "model.safetensors")
        sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(sd, nan / "model.safetensors", metadata={"format": "pt"})
    vocab = tmp / "vocab"
    if not vocab.exists():
        tok = AutoTokenizer.from_pretrained(z["base"])
        tiny.save(tiny.tiny_llama(len(tok) + 8), tok, vocab)
    models = lambda *ps: [{"model": str(p)} for p in ps]  # noqa: E731
    return {
        "unknown method": ({**ok, "merge_method": "tie"}, "did you mean 'ties'"),
        "misspelled key": ({**ok, "base_modle": "x"}, "did you mean 'base_model'"),
        "misspelled model key": ({**ok, "models": [{"modle": "x"}]}, "models[0].modle"),
        "missing model": ({**ok, "models": models(tmp / "nope")}, "models[0].model"),
        "shape mismatch": ({**ok, "models": models(wide)}, "has shape"),
        "vocab mismatch": ({**ok, "models": models(vocab)}, "vocabulary sizes differ"),
        "slerp three": (
            {
                "merge_method": "slerp",
                "base_model": str(z["base"]),
                "models": models(z["e0"], z["e1"], z["e2"]),
            },
            "exactly two",
        ),
        "density 0": (
            {**ok, "merge_method": "ties", "parameters": {"density": 0}},
            "density must be in (0, 1]",
        ),
        "density 1.5": (
            {
                **ok,
                "merge_method": "ties",
                "models": [{"model": str(z["e0"]), "parameters": {"density": 1.5}}],
            },
            "models[0].parameters.density",
        ),
        "unknown parameter": (
            {**ok, "merge_method": "ties", "parameters": {"densty": 0.5}},
            "did you mean 'density'",
        ),
        "no base": ({**ok, "base_model": None}, "needs a base model"),
        "bad dtype": ({**ok, "dtype": "float64"}, "dtype"),
        "slices and models": ({**ok, "slices": []}, "slices: give either `models:`"),
        "not a mapping": ("- just\n- a list\n", "must be a YAML mapping"),
        "bad yaml": ("merge_method: ties\n  models: [\n", "not valid YAML"),
        "nan tensor": ({**ok, "models": models(nan)}, "model.layers.1.mlp.up_proj.weight"),
        "empty gradient": (
            {**ok, "models": [{"model": str(z["e0"]), "parameters": {"weight": []}}]},
            "an empty list",
        ),
        "string weight": (
            {**ok, "models": [{"model": str(z["e0"]), "parameters": {"weight": "heavy"}}]},
            "is not a number",
        ),
        "model type": ({**ok, "models": models(z["t5"])}, "model_type"),
    }


@pytest.fixture(scope="module")
def bad_zoo(llama_zoo, t5_zoo, tmp_path_factory):
    return {**llama_zoo, "t5": t5_zoo["e0"], "_tmp": tmp_path_factory.mktemp("bad")}


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "misspelled key",
        "misspelled model key",
        "missing model",
        "shape mismatch",
        "vocab mismatch",
        "slerp three",
        "density 0",
        "density 1.5",
        "unknown parameter",
        "no base",
        "bad dtype",
        "slices and models",
        "not a mapping",
        "bad yaml",
        "nan tensor",
        "empty gradient",
        "string weight",
        "model type",
    ],
)
def test_bad_recipe_exits_2_with_a_one_line_message(case, bad_zoo, tmp_path, cli):
    recipe, expected = _mutants(bad_zoo, bad_zoo["_tmp"])[case]
    path = tmp_path / "r.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe)
    else:
        write_recipe(path, {k: v for k, v in recipe.items() if v is not None})
    code, _, err = cli("run", path, "-o", tmp_path / "out")
    assert code == 2, err
    assert expected in err, err
    lines = [x for x in err.strip().splitlines() if not x.startswith("progress: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_level_errors(tmp_path, llama_zoo, cli):
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("x")
    code, _, err = cli("run", r, "-o", tmp_path / "out")
    assert code == 2 and "--force" in err and (tmp_path / "out" / "mine.txt").exists()
    code, _, err = cli("run", r, "-o", llama_zoo["e0"], "--force")
    assert (
        code == 2
        and "overlaps the input" in err
        and (llama_zoo["e0"] / "model.safetensors").exists()
    )
    code, _, err = cli("run", tmp_path / "missing.yaml", "-o", tmp_path / "o2")
    assert code == 2 and "recipe file not found" in err
    code, _, err = cli("run", r, "-o", tmp_path / "o3", "--out-shard-size", "lots")
    assert code == 2 and "--out-shard-size" in err
    code, _, err = cli("run", r, "-o", tmp_path / "o4", "--device", "tpu")
    assert code == 2 and "--device" in err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_validate_reads_headers_only(tmp_path, llama_zoo, cli, monkeypatch):
    from divmerge_cli import checkpoint

    monkeypatch.setattr(
        checkpoint.Checkpoint, "get", lambda *a: pytest.fail("validate read a tensor")
    )
    r = write_recipe(tmp_path / "r.yaml", ta_recipe(llama_zoo))
    code, out, err = cli("validate", r)
    assert code == 0 and "ok" in out, err


def test_methods_lists_every_method(cli, monkeypatch):
    from divmerge_cli import cli as cli_module

    monkeypatch.setattr(cli_module.out, "width", 400)  # one line per method
    code, out, _ = cli("methods")
    assert code == 0 and all(m in out for m in ("ties", "dare_linear", "multislerp"))
    assert "normalize=true" in out and "rescale=true" in out  # switches as a recipe spells them
    # learned methods list every parameter they take, the Remark 3 base method and its density
    for key in ("base_method=task_arithmetic", "task_vectors=auto", "granularity=layer"):
        assert key in out, key


def test_hub_id_offline_says_to_pass_a_local_folder(tmp_path, llama_zoo, cli, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = write_recipe(
        tmp_path / "r.yaml", {**ta_recipe(llama_zoo), "base_model": "some-org/some-model"}
    )
    code, _, err = cli("validate", r)
    assert code == 2 and "some-org/some-model" in err and "pass the local folder" in err


def test_unknown_option_is_a_usage_error(cli):
    code, _, err = cli("run", "--bogus")
    assert code == 2 and "No such option" in err


def test_model_card_names_the_inputs_as_read_not_as_variables(
    tmp_path, llama_zoo, cli, monkeypatch
):
    import yaml

    monkeypatch.setenv("DIVMERGE_TEST_ZOO", str(llama_zoo["base"].parent))
    base = llama_zoo["base"]
    recipe = ta_recipe(llama_zoo, base_model=f"$DIVMERGE_TEST_ZOO/{base.name}")
    recipe["models"][0]["model"] = f"${{DIVMERGE_TEST_ZOO}}/{llama_zoo['e0'].name}"
    code, _, err = cli("run", write_recipe(tmp_path / "r.yaml", recipe), "-o", tmp_path / "m")
    assert code == 0, err
    card = (tmp_path / "m" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"tags": ["merge", "divmerge"], "base_model": str(base.resolve())}
    assert "$DIVMERGE_TEST_ZOO" not in card and f"- `{llama_zoo['e0'].resolve()}`" in card


def test_the_command_ends_with_its_exit_code_its_exit_handlers_run_and_its_output_flushed(
    tmp_path,
):
    # main() ends the process without the interpreter's teardown: what the teardown would have
    # done that matters (exit handlers, flushed pipes, the exit code) still happens
    code = "import atexit; atexit.register(print, 'bye'); from divmerge_cli.cli import main; main()"
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.split() == ["divmerge", __version__, "bye"], ok
    args = ["run", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o")]
    bad = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert bad.returncode == 2 and "recipe file not found" in bad.stderr, bad
    assert bad.stdout.split() == ["bye"]
