"""LoRA adapters as task vectors: reading PEFT adapters, every data-free method on them, and the
merge written back as an adapter (checked against PEFT's own merge_and_unload)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_recipe
from divmerge_cli import merge, tiny
from divmerge_cli.adapter_writer import factor
from divmerge_cli.checkpoint import Checkpoint
from divmerge_cli.errors import UserError
from divmerge_cli.lora import LoraExpert, LowRank
from divmerge_cli.models import open_model
from divmerge_cli.recipe import load_recipe

peft = pytest.importorskip("peft")

# three adapters covering what PEFT stores differently: plain targets; rsLoRA with rank and alpha
# patterns; an embedding target plus a whole saved module (lm_head)
ADAPTERS = {
    "a0": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a1": dict(
        r=3,
        lora_alpha=5,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 4},
        alpha_pattern={"k_proj": 2},
    ),
    "a2": dict(
        r=4, lora_alpha=8, target_modules=["gate_proj", "embed_tokens"], modules_to_save=["lm_head"]
    ),
}


def _peft_model(base_dir: Path, adapter: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return model if adapter is None else peft.PeftModel.from_pretrained(model, adapter)


@pytest.fixture(scope="session")
def lora_zoo(tmp_path_factory, llama_zoo, tok) -> dict[str, Path]:
    """Adapters a0..a2 trained (random B, so τ ≠ 0) on llama_zoo's base, and each one's
    merge_and_unload() saved as a full checkpoint a0_full..a2_full."""
    root = tmp_path_factory.mktemp("lora")
    zoo = {"base": llama_zoo["base"]}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        _random_adapter(llama_zoo["base"], cfg, i + 10, 0.1, tok, root / name, zoo)
    return zoo


def _random_adapter(
    base: Path, cfg: dict, seed: int, std: float, tok, out: Path, zoo: dict
) -> None:
    """A LoRA adapter on `base` with random factors (std `std`; saved modules nudged) at zoo[name],
    and its merge_and_unload() as a full checkpoint at zoo[name_full]."""
    model = peft.get_peft_model(_peft_model(base), peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, w in model.named_parameters():
            if "lora_" in n:
                w.copy_(torch.randn(w.shape, generator=g) * std)
            elif "modules_to_save" in n:
                w.add_(torch.randn(w.shape, generator=g) * 0.02)
    model.save_pretrained(out)
    zoo[out.name] = out
    zoo[f"{out.name}_full"] = tiny.save(
        model.merge_and_unload(), tok, out.parent / f"{out.name}_full"
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _merged(recipe: dict, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    plan = merge.plan_merge(load_recipe(write_recipe(tmp_path / f"{name}.yaml", recipe)))
    merge.run_merge(plan, tmp_path / name)
    return weights(tmp_path / name)


def test_adapter_reads_as_its_merged_model_one_tensor_at_a_time(lora_zoo, tmp_path):
    base = open_model(str(lora_zoo["base"]), "base_model")
    for a in ADAPTERS:
        e = open_model(str(lora_zoo[a]), a, base=base)
        dense = open_model(str(lora_zoo[f"{a}_full"]), a)
        assert isinstance(e, LoraExpert)
        for n in base.names:
            assert torch.allclose(e.get(n).float(), dense.get(n).float(), atol=1e-6), (a, n)
            # a row chunk is the same rows of the whole; B[rows] @ A and (B @ A)[rows] are
            # different BLAS calls, equal up to rounding (not bitwise on every CPU)
            rows = e.get(n, 3, 7)
            torch.testing.assert_close(rows.float(), e.get(n).float()[3:7], rtol=1e-6, atol=1e-7)
            tau = e.tau(n, base)
            expect = dense.get(n).float() - base.get(n).float()
            if tau is None:
                assert not expect.any(), (a, n)
            else:
                t = tau.dense() if isinstance(tau, LowRank) else tau
                assert torch.allclose(t, expect, atol=1e-6), (a, n)
    # PEFT ignores fan_in_fan_out on nn.Linear layers (square q_proj would hide a wrong transpose)
    flagged = _adapter_copy(lora_zoo, tmp_path, fan_in_fan_out=True)
    e0, full0 = open_model(str(flagged), "a0", base=base), weights(lora_zoo["a0_full"])
    for n in base.names:
        assert torch.allclose(e0.get(n).float(), full0[n], atol=1e-6), n
    e1 = open_model(str(lora_zoo["a1"]), "a1", base=base)
    q1 = e1.tau("model.layers.1.self_attn.q_proj.weight", base)
    k0 = e1.tau("model.layers.0.self_attn.k_proj.weight", base)
    assert q1.B.shape[1] == 4 and q1.scale == pytest.approx(5 / 2)  # rank_pattern, rsLoRA: α/√r
    assert k0.scale == pytest.approx(2 / 3**0.5)  # alpha_pattern
    e2 = open_model(str(lora_zoo["a2"]), "a2", base=base)
    assert isinstance(e2.tau("model.embed_tokens.weight", base), LowRank)
    assert isinstance(e2.tau("lm_head.weight", base), torch.Tensor)  # modules_to_save: dense τ
    assert e2.tau("model.layers.0.self_attn.q_proj.weight", base) is None


def test_fan_in_fan_out_adapter_on_conv1d_reads_as_its_merged_model(tmp_path):
    """GPT-2 stores Conv1D weights as [in, out]; PEFT's fan_in_fan_out factors are transposed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    with torch.no_grad():
        for n, w in model.named_parameters():
            if "lora_" in n:
                w.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "ad")
    model.merge_and_unload().save_pretrained(tmp_path / "full")
    base = open_model(str(tmp_path / "base"), "base")
    ad, full = open_model(str(tmp_path / "ad"), "ad", base=base), weights(tmp_path / "full")
    assert sum(isinstance(ad.tau(n, base), LowRank) for n in base.names) == 2
    for n in base.names:
        assert torch.allclose(ad.get(n).float(), full[n], atol=1e-6), n


METHOD_RECIPES = {
    "linear": dict(parameters={"weight": 0.5}, n=3),
    "task_arithmetic": dict(parameters={"lambda": 0.8}, n=3),
    "ties": dict(parameters={"density": 0.5, "lambda": 1.0}, n=3),
    "dare_linear": dict(parameters={"density": 0.6}, n=3),
    "dare_ties": dict(parameters={"density": 0.6}, n=2),
    "slerp": dict(parameters={"t": 0.4}, n=1),
    "multislerp": dict(parameters={}, n=3),
}


@pytest.mark.parametrize("method", list(METHOD_RECIPES))
def test_data_free_methods_on_adapters_equal_the_dense_experts(method, lora_zoo, tmp_path):
    spec = METHOD_RECIPES[method]
    names = list(ADAPTERS)[: spec["n"]]

    def recipe(suffix: str) -> dict:
        models = [
            {"model": str(lora_zoo[a + suffix]), "parameters": {"weight": 1.0 - 0.2 * i}}
            for i, a in enumerate(names)
        ]
        if method == "slerp":
            models = [{"model": str(lora_zoo[names[0] + suffix])}]
        return {
            "merge_method": method,
            "base_model": str(lora_zoo["base"]),
            "models": models,
            "parameters": spec["parameters"],
        }

    ours, dense = _merged(recipe(""), tmp_path, "lora"), _merged(recipe("_full"), tmp_path, "full")
    base = weights(lora_zoo["base"])
    changed, untouched = 0, 0
    for n in dense:
        assert torch.allclose(ours[n], dense[n], atol=2e-6), (method, n)
        changed += not torch.equal(dense[n], base[n])
        if n.endswith("norm.weight"):  # no adapter changes a norm: every method keeps θ0
            untouched += 1
            assert torch.equal(ours[n], base[n]), (method, n)
    assert untouched == 5
    assert changed >= 5  # the merge did something on the adapted tensors


def test_model_plus_adapter_folds_the_adapter_into_that_model(lora_zoo, llama_zoo, tmp_path):
    """mergekit's model+adapter: e0 with a0 folded in; base+a1 is a1's merged model; full
    checkpoints and adapters mix in one recipe."""
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(lora_zoo["base"]),
        "models": [
            {"model": f"{llama_zoo['e0']}+{lora_zoo['a0']}"},
            {"model": f"{lora_zoo['base']}+{lora_zoo['a1']}", "parameters": {"weight": 0.5}},
            {"model": str(lora_zoo["a2"]), "parameters": {"weight": 0.3}},
        ],
    }
    plan = merge.plan_merge(load_recipe(write_recipe(tmp_path / "p.yaml", recipe)))
    assert llama_zoo["e0"] in [c.path for c in plan.inputs]  # -o over e0 is refused, like any input
    got = _merged(recipe, tmp_path, "plus")
    b, e0 = weights(lora_zoo["base"]), weights(llama_zoo["e0"])
    a0, a1, a2 = (weights(lora_zoo[f"a{i}_full"]) for i in range(3))
    for n in b:
        want = b[n] + (e0[n] - b[n] + a0[n] - b[n]) + 0.5 * (a1[n] - b[n]) + 0.3 * (a2[n] - b[n])
        assert torch.allclose(got[n], want, atol=2e-6), n


def _adapter_copy(lora_zoo, tmp_path: Path, **changes) -> Path:
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(lora_zoo["a0"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return out


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, "is a DoRA adapter"),
        ({"peft_type": "IA3"}, "is a IA3 adapter; divmerge reads LoRA adapters only"),
        ({"peft_type": "PROMPT_TUNING"}, "is a PROMPT_TUNING adapter"),
    ],
)
def test_other_adapter_kinds_are_refused_naming_file_and_kind(
    changes, message, lora_zoo, tmp_path, cli
):
    bad = _adapter_copy(lora_zoo, tmp_path, **changes)
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(lora_zoo["base"]),
            "models": [{"model": str(bad)}],
        },
    )
    code, _, err = cli("validate", r)
    assert code == 2 and message in err and str(bad / "adapter_config.json") in err
    assert "Traceback" not in err


def test_adapter_checks_from_headers(lora_zoo, tmp_path, tok, cli):
    # an adapter trained on a wider model does not fit this base
    other = tmp_path / "other_base"
    tiny.save(tiny.tiny_llama(len(tok), hidden=48), tok, other)
    wide = peft.get_peft_model(_peft_model(other), peft.LoraConfig(**ADAPTERS["a0"]))
    wide.save_pretrained(tmp_path / "wide")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(lora_zoo["base"]),
        "models": [{"model": str(tmp_path / "wide")}],
    }
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 2 and "do not fit the base's model.layers.0" in err
    # an adapter without a base model to sit on
    r = write_recipe(
        tmp_path / "nb.yaml",
        {"merge_method": "multislerp", "models": [{"model": str(lora_zoo["a0"])}]},
    )
    code, _, err = cli("validate", r)
    assert code == 2 and "is a LoRA adapter; set base_model" in err
    # an adapter naming another base: a warning, the merge still runs
    named = _adapter_copy(lora_zoo, tmp_path, base_model_name_or_path="org/another-model")
    recipe["models"] = [{"model": str(named)}]
    code, _, err = cli("validate", write_recipe(tmp_path / "w.yaml", recipe))
    assert code == 0 and "warning" in err and "trained on org/another-model" in err
    assert f"is applied to {lora_zoo['base']}" in " ".join(err.split())


def test_model_plus_adapter_warning_names_the_model_it_is_applied_to(
    lora_zoo, llama_zoo, tmp_path, cli
):
    e1 = llama_zoo["e1"]  # not the recipe's base: the adapter is folded into e1
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(lora_zoo["base"]),
        "models": [{"model": f"{e1}+{lora_zoo['a0']}"}, {"model": str(llama_zoo["e0"])}],
    }
    code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    warning = " ".join(err.split())
    assert code == 0 and f"was trained on {lora_zoo['base']}" in warning, err
    assert f"is applied to {e1}" in warning and "recipe's base" not in warning, err


def _ta(lora_zoo, models: list[str], **params) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(lora_zoo["base"]),
        "models": [
            {"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.7, 0.4, 1.1))
        ],
        "parameters": {"lambda": 0.8, **params},
    }


def _merge_and_unload(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = _peft_model(base, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_as_adapter_at_exact_rank_equals_the_full_model(method, lora_zoo, tmp_path, cli):
    recipe = _ta(lora_zoo, [lora_zoo[a] for a in ADAPTERS])
    if method == "linear":
        recipe.update(merge_method="linear", parameters={})
    r = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("run", r, "-o", tmp_path / "full")
    assert code == 0, err
    code, out, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter")
    assert code == 0, err
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["lm_head"]
    assert cfg["task_type"] == "CAUSAL_LM"
    ranks = {
        k.split(".lora_")[0]: v.shape for k, v in weights(tmp_path / "ad").items() if "lora_A" in k
    }
    assert ranks["base_model.model.model.layers.1.self_attn.q_proj"][0] == 2 + 4  # Σ r_t
    full, got = weights(tmp_path / "full"), _merge_and_unload(lora_zoo["base"], tmp_path / "ad")
    for n in full:
        assert torch.allclose(got[n], full[n], atol=2e-6), n
    card = (tmp_path / "ad" / "README.md").read_text()
    assert "0.000e+00" in card and "modules_to_save" in card
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad").merge_and_unload()
    assert torch.allclose(auto.state_dict()["lm_head.weight"], full["lm_head.weight"], atol=2e-6)


def test_as_adapter_svd_truncation_reports_the_true_error(lora_zoo, llama_zoo, tmp_path, cli):
    """Full checkpoints need --adapter-rank; the card's per-module error is the real one."""
    recipe = _ta(lora_zoo, [llama_zoo["e0"], lora_zoo["a0"]])
    r = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter")
    assert code == 2 and "is a full checkpoint" in err and "--adapter-rank" in err
    assert not (tmp_path / "ad").exists()
    code, _, err = cli("run", r, "-o", tmp_path / "full")
    assert code == 0, err
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--adapter-rank", "3")
    assert code == 0, err
    full, base = weights(tmp_path / "full"), weights(lora_zoo["base"])
    got = _merge_and_unload(lora_zoo["base"], tmp_path / "ad")
    card = (tmp_path / "ad" / "README.md").read_text()
    n = "model.layers.0.self_attn.q_proj.weight"
    delta, approx = full[n] - base[n], got[n] - base[n]
    err_true = float((delta - approx).norm() / delta.norm())
    assert 0.05 < err_true < 1
    assert f"| `model.layers.0.self_attn.q_proj` | 3 | {err_true:.3e} |" in card
    assert max(v.shape[0] for k, v in weights(tmp_path / "ad").items() if "lora_A" in k) == 3
    for k in ("model.norm.weight", "model.layers.1.input_layernorm.weight"):  # 1-D: saved whole
        assert torch.allclose(got[k], full[k], atol=1e-6)


def test_a_lossy_adapter_rank_warns_naming_the_modules_that_lose_most(llama_zoo, tmp_path, cli):
    """TIES on dense experts at rank 1: exit 0, one warning naming the worst modules (as the
    card measures them); a rank that keeps everything says nothing."""
    import re

    recipe = {
        "merge_method": "ties",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo[e])} for e in ("e0", "e1", "e2")],
        "parameters": {"density": 0.2},
    }
    r = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--adapter-rank", "1")
    assert code == 0, err
    card = (tmp_path / "ad" / "README.md").read_text()
    errors = {m: float(e) for m, e in re.findall(r"\| `(.+?)` \| \d+ \| (\S+) \|", card)}
    worst = sorted(errors, key=errors.get, reverse=True)
    lossy = [m for m in worst if errors[m] > 0.5]
    assert lossy, errors
    warning = " ".join(err.split())
    assert warning.count("warning:") == 1
    head = f"--adapter-rank 1: {len(lossy)} of {len(errors)} modules have a relative error above"
    assert f"{head} 0.5" in warning, err
    assert f"{worst[0]} ({errors[worst[0]]:.2f}), {worst[1]} ({errors[worst[1]]:.2f})" in warning
    code, _, err = cli(
        "run", r, "-o", tmp_path / "ad", "--force", "--as-adapter", "--adapter-rank", "32"
    )
    assert code == 0 and "warning" not in err, err


def test_as_adapter_nonlinear_methods_need_a_rank(lora_zoo, tmp_path, cli):
    recipe = _ta(lora_zoo, [lora_zoo["a0"], lora_zoo["a1"]])
    recipe.update(merge_method="ties", parameters={"density": 0.5})
    r = write_recipe(tmp_path / "r.yaml", recipe)
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter")
    assert code == 2 and "ties is not linear" in err and "--adapter-rank" in err
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--adapter-rank", "64")
    assert code == 0, err
    code, _, err = cli("run", r, "-o", tmp_path / "full")
    full, got = weights(tmp_path / "full"), _merge_and_unload(lora_zoo["base"], tmp_path / "ad")
    for n in full:  # rank 64 >= every weight's size: the SVD is exact
        assert torch.allclose(got[n], full[n], atol=1e-5), n
    code, _, err = cli("run", r, "-o", tmp_path / "x", "--adapter-rank", "4")
    assert code == 2 and "needs --as-adapter" in err


def test_factor_truncates_low_rank_without_densifying():
    g = torch.Generator().manual_seed(0)
    lr = LowRank(torch.randn(20, 6, generator=g), torch.randn(6, 15, generator=g), 0.5)
    d = lr.dense()
    b, a, err = factor(lr, 3)
    s = torch.linalg.svdvals(d)
    assert torch.allclose(b @ a, factor(d, 3)[0] @ factor(d, 3)[1], atol=1e-4)
    assert err == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4)
    assert float((d - b @ a).norm() / d.norm()) == pytest.approx(err, rel=1e-4)
    b, a, err = factor(lr, None)
    assert err == 0 and torch.allclose(b @ a, d, atol=1e-5)


def test_peft_cat_equals_our_task_arithmetic(lora_zoo, tmp_path):
    """PEFT's add_weighted_adapter(combination_type='cat', weights 1) is task arithmetic, weights 1."""
    model = _peft_model(lora_zoo["base"], str(lora_zoo["a0"]))
    model.load_adapter(str(lora_zoo["a1"]), adapter_name="a1")
    model.add_weighted_adapter(["default", "a1"], [1.0, 1.0], "cat", combination_type="cat")
    model.set_adapter("cat")
    theirs = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    recipe = _ta(lora_zoo, [lora_zoo["a0"], lora_zoo["a1"]])
    for m in recipe["models"]:
        m["parameters"]["weight"] = 1.0
    recipe["parameters"] = {}
    ours = _merged(recipe, tmp_path, "ta")
    base = weights(lora_zoo["base"])
    assert sum(not torch.equal(ours[n], base[n]) for n in ours) >= 10
    for n in ours:
        assert torch.allclose(theirs[n], ours[n], atol=2e-6), n


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_learned_loop_applies_adapters_low_rank_and_matches_the_dense_merge(
    mode, lora_zoo, tmp_path
):
    """The adapter side of the learned merge: core's MergedModel takes LoraExpert's LowRank τ
    through its Linear hooks (never densified) and gives the logits of the dense task-arithmetic
    merge with weights Γ."""
    from divmerge_cli.taskvectors import MergedModel, TaskVectors

    gamma = torch.tensor([[0.7], [0.4], [1.1]])
    recipe = _ta(lora_zoo, [lora_zoo[a] for a in ADAPTERS])  # a2: an embedding target too
    recipe["parameters"] = {}
    _merged(recipe, tmp_path, "ta")
    dense = _peft_model(tmp_path / "ta")
    base = open_model(str(lora_zoo["base"]), "base_model")
    experts = [open_model(str(lora_zoo[a]), a, base=base) for a in ADAPTERS]
    model = _peft_model(lora_zoo["base"])
    state = dict(model.state_dict(keep_vars=True))
    names = base.names
    tv = TaskVectors.load(
        experts, {n: state[n] for n in names}, base, names, [0] * len(names), mode
    )
    assert set(tv.stacked) == ({"lm_head.weight"} if mode == "memory" else set())  # saved whole
    assert sum(len(v) for v in tv.low_rank.values()) == 6 + 8 + 3
    assert len(tv.low_rank["model.embed_tokens.weight"]) == 1
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = MergedModel(model, tv).logits(gamma, {"input_ids": ids})
        want = dense(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_the_low_rank_hooks_make_every_tensor_on_their_inputs_device(lora_zoo):
    """The Linear and Embedding hooks run with the default device set to meta: a tensor made in
    them without `device=` would land there and fail beside the (CPU) activations and Gamma; on
    a GPU it would be a CPU tensor beside CUDA ones."""
    from divmerge_cli.taskvectors import MergedModel, TaskVectors

    base = open_model(str(lora_zoo["base"]), "base_model")
    experts = [open_model(str(lora_zoo[a]), a, base=base) for a in ADAPTERS]
    model = _peft_model(lora_zoo["base"])
    state = dict(model.state_dict(keep_vars=True))
    names = base.names
    tv = TaskVectors.load(experts, {n: state[n] for n in names}, base, names, [0] * len(names))
    merged = MergedModel(model, tv)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    out = {}
    for device in ("cpu", "meta"):
        gamma = torch.tensor([[0.7], [0.4], [1.1]], requires_grad=True)
        with torch.device(device):
            logits = merged.logits(gamma, {"input_ids": ids})
            logits.square().mean().backward()
        out[device] = (logits.detach(), gamma.grad)
    assert out["meta"][0].device.type == "cpu"
    assert all(map(torch.equal, out["meta"], out["cpu"]))


# --- DivMerge / AdaMerging on adapters: low-rank τ in the loop, the teacher folded from the adapter


@pytest.fixture(scope="session")
def toy_lora(toy, tmp_path_factory) -> dict[str, Path]:
    """A random LoRA adapter per toy task on the toy base (all linear layers and the embedding),
    and each one's merge_and_unload() as a full checkpoint (`<task>_full`)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("toy_lora")
    tok = AutoTokenizer.from_pretrained(toy / "base")
    zoo = {}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, task in enumerate(("sent", "rev")):
        cfg = dict(r=4, lora_alpha=8, target_modules=targets + ["embed_tokens"] * i)
        _random_adapter(toy / "base", cfg, i + 20, 0.3, tok, root / task, zoo)
    return zoo


def _learned(toy, toy_lora, tmp_path: Path, models: dict[str, Path], **params) -> Path:
    return write_recipe(
        tmp_path / "learned.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [{"model": str(m), "task": t} for t, m in models.items()],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"epochs": 2, "samples": 8, "top_k": 16, "lr": 0.05, **params},
            "dtype": "float32",
        },
    )


def _optimized(recipe: Path, out: Path, cache: Path, mode: str | None = None) -> dict:
    from divmerge_cli import optimize

    plan = merge.plan_merge(load_recipe(recipe))
    return optimize.run_optimized(plan, out, cache_dir=cache, mode=(mode, "test") if mode else None)


@pytest.mark.parametrize("method", ["divmerge", "adamerging"])
def test_learned_objective_drops_on_adapter_experts(method, toy, toy_lora, tmp_path):
    ad = {t: toy_lora[t] for t in ("sent", "rev")}
    r = _learned(toy, toy_lora, tmp_path, ad, granularity="layer", epochs=3)
    if method == "adamerging":
        text = r.read_text().replace("merge_method: divmerge", "merge_method: adamerging")
        r.write_text(text)
    s = _optimized(r, tmp_path / "m", tmp_path / "cache")
    # the toy base is near uniform (entropy ≈ log V): AdaMerging's entropy moves little
    drop = 0.98 if method == "divmerge" else 1.0
    assert sum(s["after"].values()) < sum(s["before"].values()) * drop, s
    assert s["objective"] == ("js" if method == "divmerge" else "entropy")
    assert torch.tensor(s["gamma"]).shape == (2, 4)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_gamma_from_adapters_equals_gamma_from_the_dense_experts(mode, toy, toy_lora, tmp_path):
    """Same teachers (the adapter folded in float32 vs its saved merge_and_unload), same loop:
    the low-rank hooks give the Γ the dense task vectors give."""
    got = {}
    for kind in ("", "_full"):
        models = {t: toy_lora[t + kind] for t in ("sent", "rev")}
        r = _learned(toy, toy_lora, tmp_path, models, granularity="layer")
        got[kind] = _optimized(r, tmp_path / f"m{kind}", tmp_path / "cache", mode)
    assert got[""]["task_vectors"] == mode
    assert got[""]["before"] == pytest.approx(got["_full"]["before"], abs=1e-5)
    assert torch.allclose(
        torch.tensor(got[""]["gamma"]), torch.tensor(got["_full"]["gamma"]), atol=1e-5
    )
    assert got[""]["gamma"] != got[""]["gamma"][:1] * 2  # learned, not the init
    ours, theirs = weights(tmp_path / "m"), weights(tmp_path / "m_full")
    for n in theirs:
        assert torch.allclose(ours[n], theirs[n], atol=1e-5), n


def test_mixed_recipe_adapter_and_full_checkpoint_learns(toy, toy_lora, tmp_path):
    r = _learned(toy, toy_lora, tmp_path, {"sent": toy_lora["sent"], "rev": toy / "rev"})
    s = _optimized(r, tmp_path / "m", tmp_path / "cache")
    assert sum(s["after"].values()) < sum(s["before"].values()), s
    assert (tmp_path / "m" / "model.safetensors").is_file()
    mk = yaml.safe_load((tmp_path / "m" / "mergekit_task_arithmetic.yaml").read_text())
    assert [m["model"] for m in mk["models"]] == [
        f"{toy / 'base'}+{toy_lora['sent']}",
        str(toy / "rev"),
    ]


def test_teacher_of_an_adapter_is_keyed_on_the_adapter_and_its_base(toy, toy_lora, tmp_path):
    from divmerge_cli.models import content_hash

    base = open_model(str(toy / "base"), "base_model")
    on_base = open_model(str(toy_lora["sent"]), "a", base=base)
    on_other = open_model(str(toy_lora["sent"]), "a", base=Checkpoint(toy / "rev", "b"))
    other = open_model(str(toy_lora["rev"]), "a", base=base)
    keys = {content_hash(x) for x in (on_base, on_other, other, toy / "base")}
    assert len(keys) == 4
    assert content_hash(base) == content_hash(toy / "base")  # a full model: its folder's hash


def test_adapter_bytes_are_what_memory_mode_holds(lora_zoo):
    from divmerge_cli.taskvectors import TaskVectors

    base = open_model(str(lora_zoo["base"]), "base_model")
    model = _peft_model(lora_zoo["base"])
    state = dict(model.state_dict(keep_vars=True))
    names = base.names
    for a in ADAPTERS:
        e = open_model(str(lora_zoo[a]), a, base=base)
        tv = TaskVectors.load([e], {n: state[n] for n in names}, base, names, [0] * len(names))
        # a2's saved embedding equals θ0 (PEFT saves it beside an embedding target): counted,
        # since only its bytes could tell
        extra = 0 if a != "a2" else 4 * math.prod(base.shape("model.embed_tokens.weight"))
        assert e.adapter_bytes == tv.nbytes + extra, a


def test_learned_as_adapter_at_exact_rank_equals_the_full_model(toy, toy_lora, tmp_path, cli):
    models = {t: toy_lora[t] for t in ("sent", "rev")}
    r = _learned(toy, toy_lora, tmp_path, models, granularity="layer", epochs=1)
    cache = ("--cache-dir", tmp_path / "cache")
    code, _, err = cli("run", r, "-o", tmp_path / "full", *cache)
    assert code == 0, err
    code, out, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", *cache)
    assert code == 0, err
    ad = tmp_path / "ad"
    for f in (
        "coefficients.json",
        "train_log.jsonl",
        "divmerge_recipe.yaml",
        "adapter_config.json",
    ):
        assert (ad / f).is_file(), f
    assert (ad / "coefficients.json").read_text() == (
        tmp_path / "full" / "coefficients.json"
    ).read_text()
    assert "objective at init" in (ad / "README.md").read_text()
    full, got = weights(tmp_path / "full"), _merge_and_unload(toy / "base", ad)
    for n in full:
        assert torch.allclose(got[n], full[n], atol=1e-5), n
    # its divmerge_recipe.yaml reproduces it (Γ fixed from coefficients.json, nothing learned)
    code, _, err = cli("run", ad / "divmerge_recipe.yaml", "-o", tmp_path / "again", "--as-adapter")
    assert code == 0, err
    again = weights(tmp_path / "again")
    assert again.keys() == weights(ad).keys()
    assert all(torch.allclose(again[k], v, atol=1e-6) for k, v in weights(ad).items())


def test_learned_as_adapter_refuses_dense_experts_before_learning(toy, toy_lora, tmp_path, cli):
    r = _learned(toy, toy_lora, tmp_path, {"sent": toy_lora["sent"], "rev": toy / "rev"})
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--cache-dir", tmp_path)
    assert code == 2 and "is a full checkpoint" in err and "--adapter-rank" in err
    assert not list(tmp_path.glob("*/meta.json"))  # refused before any teacher generated
    r = _learned(
        toy, toy_lora, tmp_path, {t: toy_lora[t] for t in ("sent", "rev")}, base_method="ties"
    )
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter")
    assert code == 2 and "base_method ties" in err


def test_learned_loop_on_a_tied_embedding_adapter_changes_embedding_and_head(tmp_path, tok):
    """With tie_word_embeddings an embedding target's τ is the head's too: both users of the one
    weight get a hook, so Γ = 1 gives the expert itself (its merge_and_unload checkpoint)."""
    from divmerge_cli.taskvectors import MergedModel, TaskVectors

    base_dir = tiny.save(tiny.tiny_llama(len(tok), tie_word_embeddings=True), tok, tmp_path / "b")
    zoo: dict = {}
    cfg = dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    _random_adapter(base_dir, cfg, 5, 0.3, tok, tmp_path / "t", zoo)
    base = open_model(str(base_dir), "base_model")
    expert = open_model(str(zoo["t"]), "t", base=base)
    model = _peft_model(base_dir)
    state = dict(model.state_dict(keep_vars=True))
    names = [n for n in base.names if n in state and n != "lm_head.weight"]
    tv = TaskVectors.load([expert], {n: state[n] for n in names}, base, names, [0] * len(names))
    assert len(tv.low_rank["model.embed_tokens.weight"]) == 1
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = MergedModel(model, tv).logits(torch.tensor([[1.0]]), {"input_ids": ids})
        want = _peft_model(zoo["t_full"])(input_ids=ids).logits
        plain = _peft_model(base_dir)(input_ids=ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    assert torch.allclose(got, want, atol=1e-5)


# --- adapters as the experts of evaluation and sweeps; PEFT's combinations beside ours -------


@pytest.fixture(scope="session")
def trained_lora(toy, tmp_path_factory) -> dict[str, Path]:
    """A LoRA adapter (r 4, every linear layer) fine-tuned on each toy task, and its
    merge_and_unload() as a full checkpoint (`<task>_full`)."""
    from transformers import AutoTokenizer

    from conftest import TASKS
    from divmerge_cli.sft import finetune

    root = tmp_path_factory.mktemp("trained_lora")
    tok = AutoTokenizer.from_pretrained(toy / "base")
    out = {}
    for i, (task, (make, prompt, target)) in enumerate(TASKS.items()):
        rng = random.Random(100 + i)
        rows = [make(rng) for _ in range(120)]
        torch.manual_seed(i)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
        model = peft.get_peft_model(_peft_model(toy / "base"), cfg)
        ex = [(prompt.format(**r), " " + r[target]) for r in rows]
        finetune(model, tok, ex, steps=60, batch_size=8, lr=1e-2, seed=i)
        model.save_pretrained(root / task)
        out[task] = root / task
        out[f"{task}_full"] = tiny.save(model.merge_and_unload(), tok, root / f"{task}_full")
    return out


def test_folding_an_adapter_leaks_no_library_future_warning(lora_zoo):
    """PEFT reads a property transformers 5 deprecated; scoring an adapter must not show it."""
    import warnings

    from divmerge_cli.models import load_scored

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_scored(f"{lora_zoo['base']}+{lora_zoo['a0']}", "eval")
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], seen


def test_an_adapter_scores_as_its_folded_model(toy, trained_lora, tmp_path):
    from divmerge_cli.evaluate import evaluate_model
    from divmerge_cli.tasks import load_tasks

    specs = load_tasks(str(toy / "tasks.yaml"), toy, "tasks.yaml")
    base = toy / "base"
    full = evaluate_model(trained_lora["sent_full"], specs, "test")
    assert full["sent"].score > 0.5  # a real expert, so equal scores mean something
    # the adapter folder (its config names the local base) and mergekit's model+adapter
    for ref in (trained_lora["sent"], f"{base}+{trained_lora['sent']}"):
        assert evaluate_model(ref, specs, "test") == full
    moved = _adapter_copy({"a0": trained_lora["sent"]}, tmp_path, base_model_name_or_path="x/y")
    with pytest.raises(
        UserError, match=r"not a local folder; name the model it applies to as BASE\+"
    ):
        evaluate_model(moved, specs, "test")


def test_sweep_on_adapters_and_peft_cat_equal_task_arithmetic(toy, trained_lora, tmp_path):
    import subprocess
    import sys

    from divmerge_cli import sweep

    tasks = yaml.safe_load((toy / "tasks.yaml").read_text())
    for spec in tasks.values():
        for split in ("validation", "test"):
            spec[split] = str(toy / spec[split])
    dm = {"granularity": "task", "epochs": 1, "samples": 4, "batch_size": 4, "top_k": 8}
    raw = {
        "base_model": str(toy / "base"),
        "experts": {t: str(trained_lora[t]) for t in ("sent", "rev")},
        "tasks": tasks,
        "k": 2,
        "methods": {
            "ta": {"merge_method": "task_arithmetic", "parameters": {"lambda": 1.0}},
            "dm": {"merge_method": "divmerge", "parameters": dm},
        },
        "eval": {"limit": 12, "batch_size": 8},
    }
    path = write_recipe(tmp_path / "sweep.yaml", raw)
    cfg = sweep.load_sweep(path)
    rows = sweep.run_sweep(cfg, cache_dir=tmp_path / "cache")
    refs = {r["task"]: r["score"] for r in rows if r["type"] == "reference"}
    assert refs["sent"] > 0.5 and refs["rev"] > 0
    cells = {r["label"]: r for r in sweep.cell_rows(rows)}
    assert list(cells["dm"]["gamma"]) == ["sent", "rev"]  # learned on the adapters' factors
    script = Path(__file__).resolve().parent.parent / "scripts" / "zoo" / "peft_merges.py"
    for _ in range(2):  # the second run finds its cell and does nothing
        subprocess.run(
            [sys.executable, str(script), str(path), "--types", "cat"], check=True,
            capture_output=True,
        )  # fmt: skip
    peft_rows = [json.loads(x) for x in (tmp_path / "results-peft.jsonl").read_text().splitlines()]
    assert len(peft_rows) == 1 and peft_rows[0]["label"] == "peft_cat"
    assert peft_rows[0]["scores"] == cells["ta"]["scores"]  # cat with weights 1 is our TA
    assert peft_rows[0]["anp"] == pytest.approx(cells["ta"]["anp"])


def test_eval_cli_scores_adapters_and_takes_them_as_references(toy, trained_lora, tmp_path, cli):
    base, sent = toy / "base", trained_lora["sent"]
    args = ("--tasks", toy / "tasks.yaml", "--split", "test", "--json", tmp_path / "s.json")
    code, _, err = cli("eval", f"{base}+{sent}", *args, "--reference", f"sent={sent}")
    assert code == 0, err
    entry = json.loads((tmp_path / "s.json").read_text())["models"][f"{base}+{sent}"]
    assert entry["tasks"]["sent"]["score"] > 0.5 and entry["anp"] == pytest.approx(1.0)
    code, _, err = cli("eval", toy / "sent.val.jsonl", *args)
    assert code == 2 and "nor a LoRA adapter folder" in err


# --- adapter_config.json and factors PEFT would not load (issue 23, item 4) -------------------


def _config_written(folder: Path, cfg: object) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _bad_adapter(case: str, lora_zoo, tmp_path: Path) -> tuple[Path, str]:
    """A copy of adapter a0 broken one way; returns it and what the message must name."""
    from safetensors.torch import save_file

    bad = _adapter_copy(lora_zoo, tmp_path)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    st = bad / "adapter_model.safetensors"
    factors = load_file(st)
    if case in ("a list", "null"):
        _config_written(bad, [cfg] if case == "a list" else None)
        return bad, "adapter_config.json is not a JSON object"
    changes = {
        "lora_alpha as text": ({"lora_alpha": "8"}, "lora_alpha: '8'"),
        "lora_alpha NaN": ({"lora_alpha": float("nan")}, "lora_alpha: nan"),
        "a bad alpha_pattern regex": ({"alpha_pattern": {"q_proj(": 2}}, "alpha_pattern:"),
        "r 0": ({"r": 0}, "r: 0"),
        "r true": ({"r": True}, "r: True"),
        "r not the factors' rank": ({"r": 3}, "have rank 2, but"),
        "a rank_pattern that disagrees": ({"rank_pattern": {"v_proj": 4}}, "says 4"),
        "target_modules naming no module": ({"target_modules": ["c_attn"]}, "names no module"),
        "target_modules missing a factor's module": (
            {"target_modules": ["q_proj", "down_proj"]},
            "which",
        ),
        "target_modules a number": ({"target_modules": 5}, "target_modules: 5"),
    }
    if case in changes:
        change, expected = changes[case]
        _config_written(bad, {**cfg, **change})
        return bad, expected
    if case == "no tensors":
        save_file({}, st)
        return bad, "holds no LoRA factors"
    if case == "integer factors":
        save_file({k: (v * 100).to(torch.int32) for k, v in factors.items()}, st)
        return bad, "floating point"
    raise AssertionError(case)


BAD_ADAPTERS = [
    "a list", "null", "lora_alpha as text", "lora_alpha NaN", "a bad alpha_pattern regex", "r 0",
    "r true", "r not the factors' rank", "a rank_pattern that disagrees",
    "target_modules naming no module", "target_modules missing a factor's module",
    "target_modules a number", "no tensors", "integer factors",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_adapter_configs_and_factors_peft_would_refuse_exit_2(case, lora_zoo, tmp_path, cli):
    bad, expected = _bad_adapter(case, lora_zoo, tmp_path)
    r = write_recipe(tmp_path / "r.yaml", _ta(lora_zoo, [bad]))
    for args in (["validate", r], ["run", r, "-o", tmp_path / "m"]):
        code, _, err = cli(*args)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert expected in err and str(bad) in err, err
    assert not (tmp_path / "m").exists()


def test_model_plus_adapter_spelled_wrong_is_named_precisely(lora_zoo, tmp_path, cli):
    base, a0 = lora_zoo["base"], lora_zoo["a0"]
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        (a0 / "adapter_model.safetensors").read_bytes()
    )
    cases = {
        f"+{a0}": "names no model before '+'",
        f"{base}+": "names no adapter after '+'",
        f"{base}+{no_config}": "is not a LoRA adapter folder: it has no adapter_config.json",
        str(no_config): "holds adapter_model.safetensors but no adapter_config.json",
    }
    for ref, expected in cases.items():
        recipe = {**_ta(lora_zoo, []), "models": [{"model": ref}]}
        code, _, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
        assert code == 2 and expected in err and "has no config.json" not in err, (ref, err)
