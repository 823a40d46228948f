"""DivMerge / AdaMerging on two real toy experts: a tiny base trained a few dozen steps per task."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import TASKS, run_interrupted, write_recipe
from divmerge_cli import optimize
from divmerge_cli.checkpoint import Checkpoint, human_size
from divmerge_cli.coefficients import groups_for, initial_gamma
from divmerge_cli.errors import UserError
from divmerge_cli.merge import plan_merge
from divmerge_cli.recipe import load_recipe
from divmerge_cli.taskvectors import MODES, TaskVectors


def recipe(toy: Path, tmp: Path, method="divmerge", **params) -> Path:
    return write_recipe(
        tmp / "r.yaml",
        {
            "merge_method": method,
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n), "task": n} for n in TASKS],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"epochs": 3, "samples": 16, "top_k": 16, "lr": 0.05, **params},
            "dtype": "float32",
        },
    )


@pytest.mark.parametrize(
    ("divergence", "granularity"),
    [("js", "task"), ("js", "layer"), ("kl", "task"), ("kl", "layer")],
)
def test_learned_gamma_lowers_the_objective(toy, tmp_path, divergence, granularity):
    r = plan_merge(
        load_recipe(recipe(toy, tmp_path, divergence=divergence, granularity=granularity))
    )
    s = optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    assert sum(s["after"].values()) < sum(s["before"].values()) * 0.98, s
    n_groups = 1 if granularity == "task" else 4  # embeddings, 2 blocks, head
    assert torch.tensor(s["gamma"]).shape == (2, n_groups)
    coeffs = json.loads((tmp_path / "m" / "coefficients.json").read_text())
    assert coeffs["gamma"]["sent"] == dict(zip(coeffs["groups"], s["gamma"][0]))
    log = [json.loads(x) for x in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == s["steps"] == 3 * 4  # 32 samples, batch 4 x 2 tasks
    assert "objective at init" in (tmp_path / "m" / "README.md").read_text()


def test_written_weights_are_theta0_plus_gamma_tau_and_the_mergekit_yaml_reproduces_them(
    toy, tmp_path, cli
):
    r = recipe(toy, tmp_path, granularity="layer", epochs=1)
    code, out, err = cli("run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    gamma = json.loads((tmp_path / "m" / "coefficients.json").read_text())
    w = load_file(tmp_path / "m" / "model.safetensors")
    b, e = (
        load_file(toy / "base" / "model.safetensors"),
        {n: load_file(toy / n / "model.safetensors") for n in TASKS},
    )
    from divmerge_cli.layers import group_of

    for name in b:
        g = group_of(name)
        expect = b[name] + sum(gamma["gamma"][t][g] * (e[t][name] - b[name]) for t in TASKS)
        assert torch.allclose(w[name], expect, atol=1e-6), name
    code, _, err = cli(
        "run", tmp_path / "m" / "mergekit_task_arithmetic.yaml", "-o", tmp_path / "mk"
    )
    assert code == 0, err
    mk = load_file(tmp_path / "mk" / "model.safetensors")
    assert all(torch.allclose(mk[k], w[k], atol=1e-6) for k in w)


def test_adamerging_runs_and_lowers_entropy(toy, tmp_path):
    r = plan_merge(load_recipe(recipe(toy, tmp_path, method="adamerging", granularity="layer")))
    s = optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    assert s["objective"] == "entropy"
    assert sum(s["after"].values()) < sum(s["before"].values())


def test_adamerging_stores_and_estimates_no_teacher_top_k(toy, tmp_path, cli):
    """Entropy reads no teacher distribution: its cache holds token ids only, its disk estimate
    does not grow with top_k (ignored, with a warning), and DivMerge's still does."""
    from safetensors import safe_open

    r = plan_merge(load_recipe(recipe(toy, tmp_path, method="adamerging", top_k=256)))
    optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    entries = list((tmp_path / "cache").glob("*/tensors.safetensors"))
    assert len(entries) == 2  # one per expert
    for e in entries:
        with safe_open(str(e), "pt") as f:
            assert set(f.keys()) == {"prompt_ids", "prompt_offsets", "gen_ids", "gen_offsets"}
    disk = {}
    for method in ("adamerging", "divmerge"):
        for k in (8, 256):
            path = recipe(toy, tmp_path, method=method, top_k=k)
            code, _, err = cli("validate", path, "--json", tmp_path / "v.json")
            assert code == 0, err
            assert ("top_k: ignored" in err) == (method == "adamerging"), err
            disk[method, k] = json.loads((tmp_path / "v.json").read_text())["disk_bytes"]
    assert disk["adamerging", 8] == disk["adamerging", 256] < disk["divmerge", 8]
    assert disk["divmerge", 8] < disk["divmerge", 256]


def test_one_expert_js_goes_to_zero_at_gamma_one(toy, tmp_path):
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / "sent"), "task": "sent"}],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"granularity": "task", "samples": 16, "top_k": "full"},
        },
    )
    pb = optimize.prepare(plan_merge(load_recipe(r)), cache_dir=tmp_path / "cache")
    at = lambda g: optimize.task_objectives(pb, torch.tensor([[g]]), "cpu")["sent"]  # noqa: E731
    assert at(1.0) < 1e-6 < at(0.5) and at(0.0) > at(0.5)


def test_an_expert_equal_to_the_base_leaves_the_objective_flat_in_its_gamma(toy, tmp_path):
    shutil.copytree(toy / "base", tmp_path / "same")
    r = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "divmerge",
            "base_model": str(toy / "base"),
            "models": [
                {"model": str(toy / "sent"), "task": "sent"},
                {"model": str(tmp_path / "same"), "task": "rev"},
            ],
            "tasks": str(toy / "tasks.yaml"),
            "parameters": {"granularity": "layer", "samples": 8, "top_k": 16},
        },
    )
    pb = optimize.prepare(plan_merge(load_recipe(r)), cache_dir=tmp_path / "cache")
    gamma = initial_gamma(0.5, 2, len(pb.groups)).requires_grad_()
    optimize.per_sample_loss(pb, gamma, pb.samples, "cpu").sum().backward()
    assert gamma.grad[0].abs().sum() > 1e-4
    assert torch.all(gamma.grad[1] == 0)


def test_resume_after_interruption_equals_an_uninterrupted_run(toy, tmp_path, monkeypatch):
    r = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer", epochs=2)))
    full = optimize.run_optimized(r, tmp_path / "full", cache_dir=tmp_path / "cache")
    run_interrupted(monkeypatch, r, tmp_path / "part", tmp_path / "cache", 4)
    assert not (tmp_path / "part").exists() and optimize.state_dir_for(tmp_path / "part").exists()
    resumed = optimize.run_optimized(
        r, tmp_path / "part", cache_dir=tmp_path / "cache", resume=True
    )
    assert torch.allclose(torch.tensor(resumed["gamma"]), torch.tensor(full["gamma"]), atol=1e-7)
    assert not optimize.state_dir_for(tmp_path / "part").exists()


def test_the_state_of_a_run_on_a_gpu_resumes_without_one(toy, tmp_path, monkeypatch):
    """A run on a GPU saves Adam's moments where they live, on the GPU. Re-saved here with every
    tensor tagged cuda:0 as such a file is: without a GPU, torch.load refuses it unless told to
    read onto the CPU, and --resume called it damaged. Read onto the CPU, Adam's
    load_state_dict puts the moments beside Gamma, on whatever device the run resumes."""
    r = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer", epochs=2)))
    full = optimize.run_optimized(r, tmp_path / "full", cache_dir=tmp_path / "cache")
    run_interrupted(monkeypatch, r, tmp_path / "part", tmp_path / "cache", 4)
    state = optimize.state_dir_for(tmp_path / "part") / "state.pt"
    saved = torch.load(state, weights_only=True)
    with monkeypatch.context() as m:  # the tag is dropped again after this save
        m.setattr(
            torch.serialization, "_package_registry", [*torch.serialization._package_registry]
        )
        torch.serialization.register_package(0, lambda _: "cuda:0", lambda obj, _: obj)
        torch.save(saved, state)
    resumed = optimize.run_optimized(
        r, tmp_path / "part", cache_dir=tmp_path / "cache", resume=True
    )
    assert torch.allclose(torch.tensor(resumed["gamma"]), torch.tensor(full["gamma"]), atol=1e-7)


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_gamma(
    toy, tmp_path, monkeypatch
):
    r = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="task", epochs=1)))
    real, calls = optimize.per_sample_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 5 else out  # 2 init evals + 2 good steps

    monkeypatch.setattr(optimize, "per_sample_loss", poisoned)
    with pytest.raises(UserError, match="step 3: the loss is not finite"):
        optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    state = torch.load(optimize.state_dir_for(tmp_path / "m") / "state.pt", weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["gamma"]).all()
    assert not (tmp_path / "m").exists()


def test_optimized_recipe_errors(toy, tmp_path, cli):
    base = {
        "merge_method": "divmerge",
        "base_model": str(toy / "base"),
        "tasks": str(toy / "tasks.yaml"),
    }
    cases = {
        "undefined task": (
            {**base, "models": [{"model": str(toy / "sent"), "task": "nope"}]},
            "models[0].task: 'nope' is not defined",
        ),
        "no task": ({**base, "models": [{"model": str(toy / "sent")}]}, "models[0].task"),
        "bad divergence": (
            {
                **base,
                "models": [{"model": str(toy / "sent"), "task": "sent"}],
                "parameters": {"divergence": "l2"},
            },
            "parameters.divergence",
        ),
        "bad granularity": (
            {
                **base,
                "models": [{"model": str(toy / "sent"), "task": "sent"}],
                "parameters": {"granularity": "row"},
            },
            "parameters.granularity",
        ),
        "no tasks": (
            {**base, "tasks": None, "models": [{"model": str(toy / "sent"), "task": "sent"}]},
            "tasks:",
        ),
    }
    for name, (rec, expected) in cases.items():
        path = write_recipe(tmp_path / "r.yaml", {k: v for k, v in rec.items() if v is not None})
        code, _, err = cli("run", path, "-o", tmp_path / "o")
        assert code == 2 and expected in err, (name, err)
        assert not (tmp_path / "o").exists()


def test_groups_and_gamma_shapes():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.a",
        "model.layers.1.a",
        "model.layers.10.a",
        "model.norm.weight",
    ]
    groups, idx = groups_for(names, "layer")
    assert groups == ["embeddings", "model.layers.0", "model.layers.1", "model.layers.10", "head"]
    assert idx == [0, 1, 2, 3, 4]
    assert groups_for(names, "task") == (["all"], [0] * 5)
    assert initial_gamma("uniform", 4, 2).eq(0.25).all()


def test_task_vectors_merge_matches_formula_and_keeps_storage_dtype():
    from divmerge_cli.checkpoint import Checkpoint  # noqa: F401 - the type loaded in real runs

    class Fake:
        def __init__(self, d):
            self.d = d

        def get(self, n, start=None, stop=None):
            return self.d[n]

        def dtype(self, n):
            return self.d[n].dtype

        def tau_is_dense(self, n):
            return True

        def tau(self, n, base):
            return self.get(n).float() - base.get(n).float()

    b = {"w": torch.randn(3, 2).to(torch.bfloat16)}
    es = [
        Fake({"w": (b["w"].float() + torch.randn(3, 2) * 0.1).to(torch.bfloat16)}) for _ in range(2)
    ]
    for mode in MODES:
        tv = TaskVectors.load(es, {"w": b["w"].float()}, Fake(b), ["w"], [0], mode)
        assert mode == "stream" or tv.stacked["w"].dtype == torch.bfloat16
        gamma = torch.tensor([[0.3], [0.9]], requires_grad=True)
        expect = b["w"].float() + sum(
            g * (e.get("w").float() - b["w"].float()) for g, e in zip([0.3, 0.9], es)
        )
        got = tv.combine("w", gamma)
        assert torch.allclose(got, expect, atol=1e-2)
        got.sum().backward()  # dGamma_t = <tau_t, 1>
        want = torch.stack([(e.get("w").float() - b["w"].float()).sum() for e in es])
        assert torch.allclose(gamma.grad[:, 0], want, atol=1e-2), mode


@pytest.mark.skipif(sys.platform == "win32", reason="gloo CPU processes")
@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_two_cpu_processes_give_the_same_gamma_as_one(toy, tmp_path, mode):
    r = recipe(toy, tmp_path, granularity="layer", epochs=1, task_vectors=mode)
    one = optimize.run_optimized(
        plan_merge(load_recipe(r)), tmp_path / "one", cache_dir=tmp_path / "cache"
    )
    # torchrun, not `accelerate launch --cpu` (which starts a single process): two real ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "divmerge_cli.cli", "run", str(r), "-o", str(tmp_path / "two")]
    cmd += ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "coefficients.json").read_text())
    got = torch.tensor([list(two["gamma"][t].values()) for t in TASKS])
    assert torch.allclose(got, torch.tensor(one["gamma"]), atol=1e-5)


def test_theta0_sharded_by_fsdp_across_two_processes_gives_the_same_gamma(toy, tmp_path):
    # batch 1 over 2 processes: one process has no sample at each step and must still gather
    r = recipe(toy, tmp_path, granularity="layer", epochs=1, batch_size=1, samples=6)
    one = optimize.run_optimized(
        plan_merge(load_recipe(r)), tmp_path / "one", cache_dir=tmp_path / "cache"
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version"]
    cmd = [*launch, "2", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "-m", "divmerge_cli.cli", "run", str(r)]
    cmd += ["-o", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "coefficients.json").read_text())
    got = torch.tensor([list(two["gamma"][t].values()) for t in TASKS])
    assert torch.allclose(got, torch.tensor(one["gamma"]), atol=1e-5)
    assert "sharded across 2 processes" in (tmp_path / "two" / "README.md").read_text()


@pytest.mark.parametrize(
    ("divergence", "granularity"), [("js", "task"), ("kl", "layer"), ("js", "tensor")]
)
def test_streamed_task_vectors_learn_the_same_gamma_as_memory(
    toy, tmp_path, divergence, granularity
):
    got = {}
    for mode in ("memory", "stream"):
        r = plan_merge(
            load_recipe(
                recipe(
                    toy,
                    tmp_path,
                    divergence=divergence,
                    granularity=granularity,
                    epochs=1,
                    task_vectors=mode,
                )
            )
        )
        got[mode] = optimize.run_optimized(r, tmp_path / mode, cache_dir=tmp_path / "cache")
        assert got[mode]["task_vectors"] == mode
    assert torch.allclose(
        torch.tensor(got["memory"]["gamma"]), torch.tensor(got["stream"]["gamma"]), atol=1e-5
    )
    a = load_file(tmp_path / "memory" / "model.safetensors")
    b = load_file(tmp_path / "stream" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_stream_mode_holds_no_task_vector_and_auto_streams_under_a_small_limit(toy, tmp_path):
    r = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer")))
    pb = optimize.prepare(r, cache_dir=tmp_path / "cache", available=10**12)
    assert pb.tv.mode == "memory" and pb.tv.nbytes > 0 and "auto chose memory" in pb.mode_reason
    pb = optimize.prepare(r, cache_dir=tmp_path / "cache", available=1000)
    assert pb.tv.mode == "stream" and pb.tv.nbytes == 0 and "auto chose stream" in pb.mode_reason


def test_validate_json_reports_the_preflight_estimate(toy, tmp_path, cli):
    r = recipe(toy, tmp_path, granularity="layer")
    code, out, err = cli("validate", r, "--json", tmp_path / "v.json")
    assert code == 0, err
    v = json.loads((tmp_path / "v.json").read_text())
    for key in ("peak_memory_bytes", "device_memory_bytes", "disk_bytes"):
        assert v[key] > 0, key
    assert v["task_vectors"] in ("memory", "stream")
    assert v["device"] == "cpu" and v["device_memory_bytes"] == v["peak_memory_bytes"]  # one memory
    assert "estimate: peak memory" in out


def test_on_a_gpu_the_estimate_splits_device_and_host(toy, tmp_path, monkeypatch):
    from divmerge_cli import estimate

    monkeypatch.setattr(estimate, "gpu_free", lambda device: 10**6)  # no CUDA here: a tiny GPU
    plan = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer")))
    cpu, gpu = optimize.preflight(plan), optimize.preflight(plan, device="cuda")
    assert cpu.device_peak("memory") == cpu.peak("memory") and cpu.too_big("memory") is None
    # theta0, the merged weights and the activations on the device; the runtime and the held
    # tau on the host
    rt = estimate.RUNTIME_BYTES
    assert gpu.device_memory_bytes < cpu.memory_bytes - rt and gpu.device_stream_bytes == (
        cpu.stream_bytes - rt
    )
    host = gpu.host_learn_bytes["memory"]
    assert rt < host < cpu.memory_bytes  # the runtime and the held tau, not the activations
    assert gpu.peak("memory") == max(host, gpu.teacher_bytes, gpu.process_bytes)
    assert gpu.memory_mode_need() == (gpu.device_memory_bytes, 10**6)
    msg = gpu.too_big("memory")
    need = human_size(gpu.device_memory_bytes)
    assert msg.startswith(f"this merge needs about {need} of cuda")
    assert "1.00 MB free" in msg and "task_vectors: stream" in msg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_estimate_covers_the_measured_device_peak(toy, tmp_path):
    plan = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer", epochs=1)))
    for mode in ("memory", "stream"):
        est = optimize.preflight(plan, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        optimize.run_optimized(
            plan, tmp_path / mode, cache_dir=tmp_path / "cache", device="cuda", mode=(mode, "test")
        )
        assert torch.cuda.max_memory_allocated() <= est.device_peak(mode)


def _on_cpu(fn):
    """fn with the CPU as the default device."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    return call


@pytest.mark.parametrize(("method", "mode"), [("divmerge", "stream"), ("adamerging", "memory")])
def test_the_learning_loop_makes_every_tensor_on_its_inputs_device(
    toy, tmp_path, monkeypatch, method, mode
):
    """No GPU here: with the default device set to meta, a tensor made without `device=` in the
    loop lands there and the next operation with theta0, Gamma or a batch (on the CPU) fails; on a
    GPU it would be a CPU tensor beside CUDA ones. What makes its tensors on the CPU by design
    (the batch before it moves, the initial Gamma before it moves, the schedule, disk reads,
    Adam's step counter) runs with the CPU as default device."""
    r = recipe(toy, tmp_path, method, granularity="layer", epochs=2, holdout=0.25)
    plan = plan_merge(load_recipe(r))
    pb = optimize.prepare(plan, cache_dir=tmp_path / "cache", mode=mode)
    acc = Accelerator(cpu=True)
    want, _, _ = optimize.train(pb, 0, tmp_path / "cpu", False, acc)
    for where, name in [
        (optimize, "collate"),
        (optimize, "initial_gamma"),
        (optimize, "batches"),
        (Checkpoint, "get"),
        (torch.optim.Adam, "step"),
    ]:
        monkeypatch.setattr(where, name, _on_cpu(getattr(where, name)))
    with torch.device("meta"):
        got, _, _ = optimize.train(pb, 0, tmp_path / "meta", False, acc)
    assert got.device.type == "cpu" and torch.equal(got, want)


def test_default_teacher_batch_is_lowered_until_the_teacher_fits(toy, tmp_path, monkeypatch):
    plan = plan_merge(load_recipe(recipe(toy, tmp_path, granularity="layer")))
    est = {g: optimize.preflight(_with_gen_batch(plan, g)) for g in (16, 8, 4)}
    assert est[16].teacher_bytes > est[8].teacher_bytes > est[4].teacher_bytes
    monkeypatch.setenv("DIVMERGE_MAX_MEMORY", str(est[4].teacher_bytes))  # 8 does not fit
    fitted, got, note = optimize.fit_teacher_batch(plan)
    assert (
        fitted.recipe.parameters["gen_batch_size"] == 4
        and got.teacher_bytes == est[4].teacher_bytes
    )
    assert note == "parameters.gen_batch_size 16 -> 4: the teacher phase fits in memory"
    # a value the recipe gives is the user's: kept (run then refuses, naming the knob)
    given = _with_gen_batch(plan, 16)
    assert optimize.fit_teacher_batch(given)[0].recipe.parameters["gen_batch_size"] == 16
    monkeypatch.setenv("DIVMERGE_MAX_MEMORY", str(10**15))  # fits: nothing changes
    assert optimize.fit_teacher_batch(plan)[2] is None
    monkeypatch.setenv("DIVMERGE_MAX_MEMORY", "1000")  # not even 1 fits: no claim that it does
    kept, _, note = optimize.fit_teacher_batch(plan)
    assert note is None and "gen_batch_size" not in kept.recipe.parameters
    # --resume continues a run whose teacher batch was lowered differently (samples are keyed)
    from types import SimpleNamespace

    def key(p):
        return optimize.run_key(SimpleNamespace(plan=p, samples=[]), 0)

    assert key(_with_gen_batch(plan, 2)) == key(plan)


def _with_gen_batch(plan, size: int):
    import dataclasses

    params = {**plan.recipe.parameters, "gen_batch_size": size}
    return dataclasses.replace(plan, recipe=plan.recipe.model_copy(update={"parameters": params}))


def test_run_refuses_a_merge_that_cannot_fit_before_reading_weights(
    toy, tmp_path, cli, monkeypatch
):
    monkeypatch.setenv("DIVMERGE_MAX_MEMORY", "1000")
    r = recipe(toy, tmp_path, granularity="layer", task_vectors="stream")
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert code == 2 and "MB of memory" in err and "batch_size" in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "cache").exists()


def test_bfloat16_recipe_trains_in_bf16_and_writes_the_requested_dtype(toy, tmp_path):
    raw = recipe(toy, tmp_path, granularity="layer", epochs=1)
    text = raw.read_text().replace("dtype: float32", "dtype: bfloat16\nout_dtype: float16")
    raw.write_text(text)
    r = plan_merge(load_recipe(raw))
    pb = optimize.prepare(r, cache_dir=tmp_path / "cache")
    assert next(pb.student.model.parameters()).dtype == torch.bfloat16
    s = optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    assert sum(s["after"].values()) < sum(s["before"].values())
    w = load_file(tmp_path / "m" / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in w.values())


@pytest.mark.parametrize(
    "base_method, own",
    [
        ("ties", {}),
        ("dare_ties", {}),
        ("breadcrumbs", {"gamma": 0.05}),
        ("breadcrumbs_ties", {"gamma": 0.05}),
        ("della", {"epsilon": 0.2}),
        ("della_linear", {"epsilon": 0.1, "rescale": False}),
    ],
)
def test_base_method_at_gamma_one_equals_the_data_free_method(toy, tmp_path, cli, base_method, own):
    params = {"density": 0.5, "lambda": 1.0, "normalize": False, **own}
    free = write_recipe(
        tmp_path / "free.yaml",
        {
            "merge_method": base_method,
            "base_model": str(toy / "base"),
            "models": [{"model": str(toy / n)} for n in TASKS],
            "parameters": params,
            "dtype": "float32",
        },
    )
    code, _, err = cli("run", free, "-o", tmp_path / "free", "--seed", "3")
    assert code == 0, err
    want = load_file(tmp_path / "free" / "model.safetensors")
    r = plan_merge(load_recipe(recipe(toy, tmp_path, base_method=base_method, density=0.5, **own)))
    pb = optimize.prepare(r, seed=3, cache_dir=tmp_path / "cache", work_dir=tmp_path / "w")
    ones = torch.ones(2, len(pb.groups))
    for name, w in want.items():
        coeff = optimize.stored_coefficients(pb.plan, pb.stored_index, ones)
        got = optimize.merged_tensor(pb.plan, pb.experts, coeff, name)
        assert torch.allclose(got, w, atol=1e-6), name
    # the processed vectors are sparse: TIES keeps at most half of each tau (DELLA about half)
    tau = pb.tv.experts[0].tau("model.layers.0.mlp.up_proj.weight", None)
    assert 0 < (tau != 0).float().mean() <= 0.55


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_divmerge_ties_lowers_the_objective(toy, tmp_path, granularity):
    r = plan_merge(
        load_recipe(recipe(toy, tmp_path, base_method="ties", density=0.5, granularity=granularity))
    )
    s = optimize.run_optimized(r, tmp_path / "m", cache_dir=tmp_path / "cache")
    assert sum(s["after"].values()) < sum(s["before"].values()), s
    assert not (tmp_path / "m" / "mergekit_task_arithmetic.yaml").exists()
    assert "Remark 3" in (tmp_path / "m" / "README.md").read_text()
    assert not optimize.state_dir_for(tmp_path / "m").exists()  # processed vectors removed


def test_dare_processed_vectors_are_reproducible_from_the_seed(toy, tmp_path):
    r = plan_merge(load_recipe(recipe(toy, tmp_path, base_method="dare_linear", density=0.3)))
    params = optimize.optimize_params(r.recipe)
    name = "model.layers.1.self_attn.q_proj.weight"
    get = lambda seed, d: optimize.task_vector_sources(r, params, seed, tmp_path / d)[1].tau(  # noqa: E731
        name, None
    )
    a, b, c = get(0, "a"), get(0, "b"), get(1, "c")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.1 < (a != 0).float().mean() < 0.5  # about density 0.3 kept


def test_base_method_parameters_are_checked(toy, tmp_path, cli):
    bad = recipe(toy, tmp_path, base_method="ties", density=1.5)
    code, _, err = cli("validate", bad)
    assert code == 2 and "density" in err and "(0, 1]" in err, err
    raw = yaml.safe_load(recipe(toy, tmp_path, base_method="ties").read_text())
    raw["models"][0]["parameters"] = {"weight": 2.0}  # Gamma is learned: ignored, with a warning
    code, _, err = cli("validate", write_recipe(tmp_path / "w.yaml", raw))
    assert code == 0 and "warning: " in err and "models[0].parameters.weight: ignored" in err, err
    raw["models"][0]["parameters"] = {"wieght": 2.0}  # no method takes it: an error
    code, _, err = cli("validate", write_recipe(tmp_path / "w.yaml", raw))
    assert code == 2 and "models[0].parameters.wieght" in err and "density" in err, err
    raw["models"][0]["parameters"] = {"density": 0.3}
    code, _, err = cli("validate", write_recipe(tmp_path / "ok.yaml", raw))
    assert code == 0, err


def test_output_recipe_reproduces_a_learned_ties_merge_from_anywhere(
    toy, tmp_path, cli, monkeypatch
):
    r = recipe(toy, tmp_path, base_method="ties", density=0.5, granularity="layer", epochs=1)
    code, _, err = cli("run", r, "-o", tmp_path / "m", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "m", moved)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("run", moved / "divmerge_recipe.yaml", "-o", tmp_path / "again")
    assert code == 0 and "Gamma from a file" in out, err
    a = load_file(tmp_path / "m" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_tied_embedding_stored_under_both_names_is_merged_once(toy, tmp_path, cli, mode):
    from safetensors.torch import save_file

    tied = {}
    for name in ("base", *TASKS):
        d = tmp_path / "tied" / name
        shutil.copytree(toy / name, d)
        w = load_file(d / "model.safetensors")
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
        save_file(w, d / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
        tied[name] = d
    raw = yaml.safe_load(
        recipe(toy, tmp_path, granularity="layer", epochs=1, task_vectors=mode).read_text()
    )
    raw["base_model"] = str(tied["base"])
    raw["models"] = [{"model": str(tied[t]), "task": t} for t in TASKS]
    code, _, err = cli(
        "run",
        write_recipe(tmp_path / "t.yaml", raw),
        "-o",
        tmp_path / "m",
        "--cache-dir",
        tmp_path / "cache",
    )
    assert code == 0, err
    w = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])
    assert not torch.equal(
        w["lm_head.weight"], load_file(tied["base"] / "model.safetensors")["lm_head.weight"]
    )


def test_a_dare_output_recipe_records_its_seed(toy, tmp_path, cli):
    r = recipe(toy, tmp_path, base_method="dare_linear", density=0.5, granularity="task", epochs=1)
    code, _, err = cli(
        "run", r, "-o", tmp_path / "m", "--seed", "7", "--cache-dir", tmp_path / "cache"
    )
    assert code == 0, err
    assert (
        yaml.safe_load((tmp_path / "m" / "divmerge_recipe.yaml").read_text())["parameters"]["seed"]
        == 7
    )
    code, _, err = cli("run", tmp_path / "m" / "divmerge_recipe.yaml", "-o", tmp_path / "again")
    assert code == 0, err
    a, b = (
        load_file(tmp_path / "m" / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_warned(toy, tmp_path, cli, monkeypatch, native):
    monkeypatch.setattr(optimize, "native_low_precision", lambda dtype: native)
    raw = recipe(toy, tmp_path, granularity="layer")
    raw.write_text(raw.read_text().replace("dtype: float32", "dtype: bfloat16"))
    code, _, err = cli("validate", raw, "--json", tmp_path / "v.json")
    assert code == 0, err
    warned = "slow fallback, hundreds of times slower than float32" in " ".join(err.split())
    assert warned is not native
    assert (
        any("slow fallback" in w for w in json.loads((tmp_path / "v.json").read_text())["warnings"])
        is not native
    )
    raw.write_text(raw.read_text().replace("dtype: bfloat16", "dtype: float32"))
    assert optimize.slow_dtype_warning(load_recipe(raw), "cpu") is None  # float32: never warned
