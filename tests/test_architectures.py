"""Learned merges on every architecture family people merge, built from transformers' own config
classes (hidden 64, 2 blocks, a word-level vocabulary of a few dozen): dense, tied and untied,
renamed on load (GPT-NeoX), fused on load (Mixtral, Qwen2-MoE, Qwen3-MoE), and checkpoints that
store buffers, a 0-dim tensor, or a tied embedding under both names. For each: `validate` agrees
with `run`; DivMerge at layer level learns the same Gamma with task vectors in memory and
streamed; the output loads in transformers with no missing, unexpected or mismatched key and
finite logits; every stored tensor is theta0 + sum Gamma tau with the group the layout gives it,
and the exported mergekit recipe reproduces it; a data-free task arithmetic is theta0 + sum
lambda tau on every stored tensor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from divmerge_cli import tiny
from divmerge_cli.layers import block_of

WORDS = "the cat dog sat ran on a mat log red blue big small one two three yes no".split()
TEXTS = [" ".join(WORDS[i : i + 4]) for i in range(len(WORDS) - 4)]
DENSE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (config class, its arguments, how the stored checkpoint is altered)
ARCHS: dict[str, tuple[str, dict, str | None]] = {
    "llama": ("LlamaConfig", DENSE, None),
    "llama_tied": ("LlamaConfig", {**DENSE, "tie_word_embeddings": True}, None),
    "llama_tied_both_stored": ("LlamaConfig", {**DENSE, "tie_word_embeddings": True}, "both"),
    "llama_tied_head_stored": ("LlamaConfig", {**DENSE, "tie_word_embeddings": True}, "head"),
    "llama_inv_freq": ("LlamaConfig", DENSE, "inv_freq"),
    "llama_0_dim": ("LlamaConfig", DENSE, "scalar"),
    "qwen2": ("Qwen2Config", DENSE, None),
    "qwen3": ("Qwen3Config", {**DENSE, "head_dim": 16}, None),
    "gemma2": ("Gemma2Config", {**DENSE, "head_dim": 16}, None),
    "gemma3_text": ("Gemma3TextConfig", {**DENSE, "head_dim": 16, "sliding_window": 16}, None),
    "phi3": ("Phi3Config", DENSE, None),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64), "attn_bias"),
    "olmo2": ("Olmo2Config", DENSE, None),
    "falcon": (
        "FalconConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        None,
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        None,
    ),
    "mixtral": ("MixtralConfig", {**DENSE, "num_local_experts": 4, "num_experts_per_tok": 2}, None),
    "qwen2_moe": ("Qwen2MoeConfig", {**DENSE, **MOE, "shared_expert_intermediate_size": 64}, None),
    "qwen3_moe": ("Qwen3MoeConfig", {**DENSE, **MOE, "head_dim": 16}, None),
}
TASK_NAMES = ("a", "b")


def _build(arch: str, root: Path) -> dict[str, Path]:
    """base + two experts (the base plus noise) of one architecture, as transformers saves them,
    then altered as ARCHS says; their tasks file."""
    cls, kw, alter = ARCHS[arch]
    if not hasattr(transformers, cls):
        pytest.skip(f"transformers {transformers.__version__} has no {cls}")
    tok = tiny.build_word_tokenizer(TEXTS)
    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    try:
        cfg = getattr(transformers, cls)(vocab_size=len(tok), **ids, **kw)
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    except Exception as e:  # noqa: BLE001 - what this transformers cannot build is skipped
        pytest.skip(f"transformers {transformers.__version__} cannot build {cls}: {e}")
    zoo = {"base": tiny.save(base, tok, root / "base")}
    for i, t in enumerate(TASK_NAMES):
        zoo[t] = tiny.save(tiny.perturbed(base, 0.05, seed=i + 1), tok, root / t)
    for i, path in enumerate(zoo.values()):
        w = load_file(path / "model.safetensors")
        w = ALTER[alter](w, i) if alter else w
        save_file(w, path / "model.safetensors", metadata={"format": "pt"})
    rows = [{"text": t} for t in TEXTS[:4]]
    for t in TASK_NAMES:
        (root / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = {
        t: {"validation": f"{t}.jsonl", "prompt": "{text}", "target": "text", "max_new_tokens": 2}
        for t in TASK_NAMES
    }
    zoo["tasks"] = write_recipe(root / "tasks.yaml", tasks)
    return zoo


def _both(w: dict, i: int) -> dict:  # a tied head stored beside its embedding (older saves)
    return {**w, "lm_head.weight": w["model.embed_tokens.weight"].clone()}


def _head(w: dict, i: int) -> dict:  # a tied weight stored under the head's name only
    head = w["model.embed_tokens.weight"]
    return {
        **{k: v for k, v in w.items() if k != "model.embed_tokens.weight"},
        "lm_head.weight": head,
    }


def _inv_freq(w: dict, i: int) -> dict:  # per-block rotary buffers (older Llama-family uploads)
    inv = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    return {
        **w,
        **{f"model.layers.{b}.self_attn.rotary_emb.inv_freq": inv.clone() for b in range(2)},
    }


def _scalar(w: dict, i: int) -> dict:  # a 0-dim tensor that differs between the models
    return {**w, "model.logit_scale": torch.tensor(1.0 + 0.25 * i)}


def _attn_bias(w: dict, i: int) -> dict:  # GPT-2's stored causal mask and masked_bias
    mask = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    extra = {f"transformer.h.{b}.attn.bias": mask.clone() for b in range(2)}
    extra |= {f"transformer.h.{b}.attn.masked_bias": torch.tensor(-1e4) for b in range(2)}
    return {**w, **extra}


ALTER = {
    "both": _both,
    "head": _head,
    "inv_freq": _inv_freq,
    "scalar": _scalar,
    "attn_bias": _attn_bias,
}
# stored tensors the module does not hold, per alteration: merged at each task's mean Gamma
UNUSED = {
    "inv_freq": r"rotary_emb\.inv_freq$",
    "scalar": r"^model\.logit_scale$",
    "attn_bias": r"\.attn\.(bias|masked_bias)$",
}


def _recipe(zoo: dict, tmp: Path, name: str, **params) -> Path:
    return write_recipe(
        tmp / f"{name}.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(zoo["base"]),
            "models": [{"model": str(zoo[t]), "task": t} for t in TASK_NAMES],
            "tasks": str(zoo["tasks"]),
            "parameters": {
                "granularity": "layer",
                "epochs": 1,
                "samples": 4,
                "batch_size": 4,
                "top_k": 8,
                "lr": 0.05,
                **params,
            },
            "dtype": "float32",
        },
    )


def _group(arch: str, stored: str, groups: list[str]) -> str | None:
    """The group a stored tensor must take, worked out from its name and the architecture (None:
    each task's mean Gamma): a block's tensors, its experts and router included, take the
    block's; outside blocks, embeddings and the head; a tied head stored beside its embedding,
    and GPT-NeoX's embed_out (the module's lm_head), as the module uses them."""
    alter = ARCHS[arch][2]
    if alter in UNUSED and re.search(UNUSED[alter], stored):
        return None
    if stored == "lm_head.weight" and alter in ("both", "head"):  # the tied embedding matrix
        return "embeddings"
    if stored == "embed_out.weight":
        return "head"
    b = block_of(stored)
    if b:
        assert f"{b[0]}.{b[1]}" in groups, (stored, groups)
        return f"{b[0]}.{b[1]}"
    return "embeddings" if re.search(r"embed|wte|wpe|word_embeddings", stored) else "head"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_learned_merge_on_every_architecture(arch, tmp_path, cli):
    zoo = _build(arch, tmp_path / "zoo")
    cache = tmp_path / "cache"
    gammas = {}
    for mode in ("memory", "stream"):
        r = _recipe(zoo, tmp_path, mode, task_vectors=mode)
        code, _, verr = cli("validate", r)
        assert code == 0, verr
        code, _, err = cli("run", r, "-o", tmp_path / mode, "--cache-dir", cache)
        assert code == 0, err
        warned = [x for x in err.splitlines() if "not tensors of the" in x]
        assert warned == [x for x in verr.splitlines() if "not tensors of the" in x]
        assert bool(warned) == (ARCHS[arch][2] in UNUSED), err  # one line, when there are some
        coeffs = json.loads((tmp_path / mode / "coefficients.json").read_text())
        gammas[mode] = torch.tensor([list(coeffs["gamma"][t].values()) for t in TASK_NAMES])
    assert torch.allclose(gammas["memory"], gammas["stream"], atol=1e-5), arch
    out = tmp_path / "memory"
    groups = coeffs["groups"]
    assert groups[0] == "embeddings" and groups[-1] == "head" and len(groups) == 4, groups

    # every stored tensor, in the stored names: theta0 + sum Gamma tau with its group's Gamma
    base = load_file(zoo["base"] / "model.safetensors")
    experts = [load_file(zoo[t] / "model.safetensors") for t in TASK_NAMES]
    merged = load_file(out / "model.safetensors")
    assert sorted(merged) == sorted(base), arch  # per-expert tensors stay per expert
    g = gammas["memory"]
    for name, theta0 in base.items():
        group = _group(arch, name, groups)
        c = g.mean(1) if group is None else g[:, groups.index(group)]
        want = theta0.float() + sum(
            c[t] * (e[name].float() - theta0.float()) for t, e in enumerate(experts)
        )
        assert merged[name].shape == theta0.shape
        assert torch.allclose(merged[name].float(), want, atol=1e-6), (arch, name, group)

    # the output loads as its inputs do (a stored tensor the module lacks stays unexpected,
    # nothing else), and runs
    auto = transformers.AutoModelForCausalLM
    _, want = auto.from_pretrained(zoo["base"], output_loading_info=True)
    model, info = auto.from_pretrained(out, output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert info[k] == want[k], (arch, k, info[k])
        assert not info[k] or k == "unexpected_keys" and ARCHS[arch][2] in UNUSED, (arch, k)
    assert torch.isfinite(model(torch.tensor([[2, 5, 6, 7]])).logits).all()

    # the exported mergekit recipe reproduces every tensor when rerun through divmerge
    code, _, err = cli("run", out / "mergekit_task_arithmetic.yaml", "-o", tmp_path / "mk")
    assert code == 0, err
    again = load_file(tmp_path / "mk" / "model.safetensors")
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged), arch

    # divmerge_recipe.yaml (Gamma fixed from coefficients.json, no model loaded) writes the same
    code, _, err = cli("run", out / "divmerge_recipe.yaml", "-o", tmp_path / "fixed")
    assert code == 0, err
    fixed = load_file(tmp_path / "fixed" / "model.safetensors")
    assert all(torch.equal(fixed[k], merged[k]) for k in merged), arch

    # AdaMerging, one Gamma per module tensor (a fused expert tensor is one), streamed
    r = _recipe(zoo, tmp_path, "ada", granularity="tensor", task_vectors="stream")
    raw = yaml.safe_load(r.read_text())
    code, _, err = cli(
        "run", write_recipe(r, {**raw, "merge_method": "adamerging"}), "-o", tmp_path / "ada"
    )
    assert code == 0, err
    ada_groups = json.loads((tmp_path / "ada" / "coefficients.json").read_text())["groups"]
    assert sorted(ada_groups) == sorted(n for n, _ in model.named_parameters()), arch
    ada = load_file(tmp_path / "ada" / "model.safetensors")
    assert sorted(ada) == sorted(base) and all(
        torch.isfinite(t.float()).all() for t in ada.values()
    )
    code, _, err = cli(
        "run", tmp_path / "ada" / "mergekit_task_arithmetic.yaml", "-o", tmp_path / "adamk"
    )
    assert code == 0, err
    again = load_file(tmp_path / "adamk" / "model.safetensors")
    assert all(torch.allclose(again[k], ada[k], atol=1e-6) for k in ada), arch

    # a data-free task arithmetic of the same inputs: theta0 + sum lambda tau on every tensor
    raw = yaml.safe_load(_recipe(zoo, tmp_path, "ta").read_text())
    raw.update(merge_method="task_arithmetic", parameters={"lambda": 0.7})
    raw["models"] = [
        {"model": str(zoo[t]), "parameters": {"weight": w}} for t, w in zip(TASK_NAMES, (0.3, 0.9))
    ]
    raw.pop("tasks")
    code, _, err = cli("run", write_recipe(tmp_path / "ta.yaml", raw), "-o", tmp_path / "ta")
    assert code == 0, err
    ta = load_file(tmp_path / "ta" / "model.safetensors")
    for name, theta0 in base.items():
        want = theta0.float() + 0.7 * sum(
            w * (e[name].float() - theta0.float()) for w, e in zip((0.3, 0.9), experts)
        )
        assert torch.allclose(ta[name].float(), want, atol=1e-6), (arch, name)


def _drop(name: str):
    def mutate(zoo: dict) -> None:
        for t in ("base", *TASK_NAMES):
            w = load_file(zoo[t] / "model.safetensors")
            del w[name]
            save_file(w, zoo[t] / "model.safetensors", metadata={"format": "pt"})

    return mutate


def _model_type(zoo: dict) -> None:
    for t in ("base", *TASK_NAMES):
        cfg = json.loads((zoo[t] / "config.json").read_text())
        (zoo[t] / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchmodel"}))


def _conv1d_lora(zoo: dict) -> None:
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(zoo["base"])
    cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    peft.get_peft_model(model, cfg).save_pretrained(zoo["a"].parent / "lora")
    zoo["a"] = zoo["a"].parent / "lora"


@pytest.mark.parametrize(
    ("arch", "mutate", "expected"),
    [
        # one layer's experts incomplete: the fused tensor would have 3 rows of 4
        ("mixtral", _drop("model.layers.1.block_sparse_moe.experts.3.w1.weight"), "convert"),
        ("llama", _drop("model.norm.weight"), "has a parameter model.norm.weight that no stored"),
        ("llama", _model_type, "cannot build the model"),
        ("gpt2", _conv1d_lora, "belongs to a Conv1D"),
    ],
)
def test_validate_refuses_what_run_would_before_any_teacher_runs(
    arch, mutate, expected, tmp_path, cli
):
    zoo = _build(arch, tmp_path / "zoo")
    mutate(zoo)
    r = _recipe(zoo, tmp_path, "r")
    code, _, verr = cli("validate", r)
    assert code == 2 and expected in verr, verr
    code, _, err = cli("run", r, "-o", tmp_path / "out", "--cache-dir", tmp_path / "cache")
    assert code == 2 and err.strip() == verr.strip(), err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_filters_match_the_stored_or_the_module_name_of_an_expert_tensor(tmp_path, cli):
    zoo = _build("mixtral", tmp_path / "zoo")
    # mergekit under transformers 5 names Mixtral's experts by the module (mlp.experts.*), the
    # checkpoint by block_sparse_moe.experts.N.wK: a filter written either way reaches them
    weight = [{"filter": "w2", "value": 2.0}, {"filter": "mlp.experts", "value": 0.5}]
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["a"]), "parameters": {"weight": [*weight, {"value": 1.0}]}}],
    }
    code, _, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "-o", tmp_path / "out")
    assert code == 0, err
    base = load_file(zoo["base"] / "model.safetensors")
    a = load_file(zoo["a"] / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name in base:
        w = 2.0 if ".w2." in name else 0.5 if ".experts." in name else 1.0  # router: fallback
        want = base[name] + w * (a[name] - base[name])
        assert torch.allclose(out[name], want, atol=1e-6), name


@pytest.mark.parametrize("arch", ["llama_tied_both_stored", "llama_tied_head_stored", "mixtral"])
def test_the_exported_recipe_reproduces_the_merge_through_mergekit(arch, tmp_path, cli):
    """mergekit 0.1.5 (an oracle, not a dependency) on the exported recipe: every tensor it
    writes equals ours. It names tensors by the module (Mixtral's experts fused), so ours are
    converted by transformers' loader before the comparison."""
    mk = pytest.importorskip("mergekit.merge", reason="mergekit (and its deps) not importable")
    from mergekit.config import MergeConfiguration

    zoo = _build(arch, tmp_path / "zoo")
    out = tmp_path / "out"
    code, _, err = cli("run", _recipe(zoo, tmp_path, "r"), "-o", out, "--cache-dir", tmp_path / "c")
    assert code == 0, err
    recipe = yaml.safe_load((out / "mergekit_task_arithmetic.yaml").read_text())
    mk.run_merge(
        MergeConfiguration.model_validate(recipe),
        str(tmp_path / "mk"),
        options=mk.MergeOptions(copy_tokenizer=False, lazy_unpickle=False),
    )
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert "model.embed_tokens.weight" in theirs
    for name, t in theirs.items():
        assert torch.allclose(t.float(), ours[name].float(), atol=1e-6), (arch, name)


@pytest.mark.parametrize(
    ("arch", "targets"),
    [
        ("qwen2_moe", ["q_proj", "v_proj", "shared_expert.up_proj"]),
        ("gpt_neox", ["query_key_value", "lm_head"]),  # lm_head is stored as embed_out
    ],
)
def test_lora_experts_on_moe_and_renamed_architectures(arch, targets, tmp_path, cli):
    peft = pytest.importorskip("peft")
    zoo = _build(arch, tmp_path / "zoo")
    full = {}
    for i, t in enumerate(TASK_NAMES):
        model = transformers.AutoModelForCausalLM.from_pretrained(zoo["base"])
        lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, w in lora.named_parameters():
                if "lora_" in n:
                    w.copy_(torch.randn(w.shape, generator=g) * 0.2)
        lora.save_pretrained(tmp_path / f"lora_{t}")
        zoo[t] = tmp_path / f"lora_{t}"
        lora.merge_and_unload().save_pretrained(tmp_path / f"full_{t}")
        full[t] = load_file(tmp_path / f"full_{t}" / "model.safetensors")
    gammas = {}
    for mode in ("memory", "stream"):
        r = _recipe(zoo, tmp_path, mode, task_vectors=mode)
        code, _, err = cli("run", r, "-o", tmp_path / mode, "--cache-dir", tmp_path / "cache")
        assert code == 0, err
        coeffs = json.loads((tmp_path / mode / "coefficients.json").read_text())
        gammas[mode] = torch.tensor([list(coeffs["gamma"][t].values()) for t in TASK_NAMES])
    assert torch.allclose(gammas["memory"], gammas["stream"], atol=1e-5), arch
    base = load_file(zoo["base"] / "model.safetensors")
    merged = load_file(tmp_path / "memory" / "model.safetensors")
    assert sorted(merged) == sorted(base)
    groups = coeffs["groups"]
    changed = 0
    for name, theta0 in base.items():
        c = gammas["memory"][:, groups.index(_group(arch, name, groups))]
        taus = [full[t][name] - theta0 for t in TASK_NAMES]
        changed += any(bool(tau.any()) for tau in taus)
        want = theta0 + sum(ct * tau for ct, tau in zip(c, taus))
        assert torch.allclose(merged[name], want, atol=1e-5), (arch, name)
    assert changed >= 3, changed  # the adapters' targets, the renamed head included


@pytest.mark.skipif(sys.platform == "win32", reason="gloo CPU processes")
def test_theta0_sharded_by_fsdp_on_a_moe_gives_the_same_gamma(tmp_path, cli):
    """FSDP shards each block's theta0 by rows: a fused expert tensor is converted from its
    stored experts, then this process's rows are taken."""
    zoo = _build("mixtral", tmp_path / "zoo")
    r = _recipe(zoo, tmp_path, "r", batch_size=1, samples=3)
    code, _, err = cli("run", r, "-o", tmp_path / "one", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version"]
    cmd = [*launch, "2", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "divmerge_cli.cli", "run", str(r)]
    cmd += ["-o", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (
        json.loads((tmp_path / d / "coefficients.json").read_text()) for d in ("one", "two")
    )
    got = [torch.tensor([list(c["gamma"][t].values()) for t in TASK_NAMES]) for c in (one, two)]
    assert torch.allclose(got[0], got[1], atol=1e-5)
    assert "sharded across 2 processes" in (tmp_path / "two" / "README.md").read_text()


def test_the_estimate_counts_a_fused_expert_group_as_loaded_and_converted(tmp_path):
    """Measured on a Mixtral (hidden 512, 8 experts, 4 blocks, 205 MB): loading theta0 held the
    stored experts' pages beside their fused copies (0.94 GB after from_pretrained against 0.48
    GB for a Llama of the same size), so the estimate adds them, and a fused group read whole."""
    import dataclasses
    import math

    from divmerge_cli import optimize
    from divmerge_cli.merge import plan_merge
    from divmerge_cli.recipe import load_recipe

    zoo = _build("mixtral", tmp_path / "zoo")
    plan = plan_merge(load_recipe(_recipe(zoo, tmp_path, "r")))
    est = optimize.preflight(plan)
    plain = optimize.preflight(dataclasses.replace(plan, layout=None))
    experts = sum(4 * math.prod(plan.base.shape(n)) for n in plan.names if ".experts." in n)
    assert est.stream_bytes - plain.stream_bytes >= experts
    assert est.memory_bytes - plain.memory_bytes >= experts


def test_a_tied_weight_takes_the_embeddings_group_whichever_copy_is_stored(tmp_path, cli):
    """The same tied model saved with only the embedding and with only the head: one rule (the
    shared weight is the embedding matrix), so the same groups, Gamma and merged weight."""
    got = {}
    for arch in ("llama_tied", "llama_tied_head_stored"):
        zoo = _build(arch, tmp_path / arch)
        out = tmp_path / f"out_{arch}"
        code, _, err = cli("run", _recipe(zoo, tmp_path, arch), "-o", out, "--cache-dir", tmp_path)
        assert code == 0, err
        coeffs = json.loads((out / "coefficients.json").read_text())
        merged = load_file(out / "model.safetensors")
        shared = merged.pop("model.embed_tokens.weight", None)
        shared = merged.pop("lm_head.weight") if shared is None else shared
        got[arch] = (coeffs["groups"], coeffs["gamma"], shared, merged)
    (g1, gamma1, w1, rest1), (g2, gamma2, w2, rest2) = got.values()
    assert g1 == g2 and g1[0] == "embeddings", (g1, g2)
    gamma1, gamma2 = ([list(g[t].values()) for t in TASK_NAMES] for g in (gamma1, gamma2))
    assert torch.allclose(torch.tensor(gamma1), torch.tensor(gamma2), atol=1e-6)
    assert torch.allclose(w1, w2, atol=1e-6)
    assert sorted(rest1) == sorted(rest2)


def _check_adapter(base: Path, adapter: Path, dense: Path, unmerged: bool = True) -> None:
    """PEFT applies the adapter to the base as the dense merge: logits unmerged, every tensor
    after merge_and_unload. `unmerged` False for a tied weight: PEFT's unmerged forward adds its
    LoRA to the embedding's output only (ensure_weight_tying would merge it twice)."""
    peft = pytest.importorskip("peft")
    auto = transformers.AutoModelForCausalLM
    want = auto.from_pretrained(dense).eval()
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(base), str(adapter)).eval()
    x = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        if unmerged:
            assert torch.allclose(model(input_ids=x).logits, want(x).logits, atol=1e-5)
        merged = model.merge_and_unload().state_dict()
    for name, t in want.state_dict().items():
        assert torch.allclose(merged[name], t, atol=1e-5), name


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_neox", "llama_tied_both_stored"])
def test_an_adapter_output_applies_under_the_module_names(arch, tmp_path, cli):
    """--as-adapter writes module names and tensors (a MoE layer's fused experts saved whole,
    GPT-NeoX's embed_out as lm_head, a tied weight once): PEFT ignores names it cannot find, so
    stored per-expert names left the experts unmerged."""
    zoo = _build(arch, tmp_path / "zoo")
    raw = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo[t]), "parameters": {"weight": w}}
            for t, w in zip(TASK_NAMES, (0.3, 0.9))
        ],
        "parameters": {"lambda": 0.7},
        "dtype": "float32",
    }
    r = write_recipe(tmp_path / "ta.yaml", raw)
    code, _, err = cli("run", r, "-o", tmp_path / "dense")
    assert code == 0, err
    code, _, err = cli("run", r, "-o", tmp_path / "ad", "--as-adapter", "--adapter-rank", "64")
    assert code == 0, err
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["modules_to_save"]
    module = dict(transformers.AutoModelForCausalLM.from_pretrained(zoo["base"]).named_modules())
    assert all(m in module for m in saved or ()), saved
    _check_adapter(zoo["base"], tmp_path / "ad", tmp_path / "dense", "tied" not in arch)


def test_a_learned_adapter_output_on_a_moe_applies_as_the_learned_model(tmp_path, cli):
    zoo = _build("mixtral", tmp_path / "zoo")
    r = _recipe(zoo, tmp_path, "r")
    cache = tmp_path / "cache"
    code, _, err = cli("run", r, "-o", tmp_path / "dense", "--cache-dir", cache)
    assert code == 0, err
    code, _, err = cli(
        "run",
        r,
        "-o",
        tmp_path / "ad",
        "--cache-dir",
        cache,
        "--as-adapter",
        "--adapter-rank",
        "64",
    )
    assert code == 0, err
    _check_adapter(zoo["base"], tmp_path / "ad", tmp_path / "dense")
