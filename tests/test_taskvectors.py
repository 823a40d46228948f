"""The learned merged model on every kind of task vector: dense in memory, streamed, low rank."""

from __future__ import annotations

import pytest
import torch

from divmerge_cli import tiny
from divmerge_cli.checkpoint import Checkpoint
from divmerge_cli.errors import UserError
from divmerge_cli.taskvectors import LowRank, MergedModel, TaskVectors, pick_mode


class LowRankExpert:
    """A LoRA-like expert: tau = s B A on the q/v projections, zero elsewhere."""

    def __init__(self, base: Checkpoint, seed: int, rank: int = 2):
        g = torch.Generator().manual_seed(seed)
        self.base, self.factors = base, {}
        for n in base.names:
            if n.endswith(("q_proj.weight", "v_proj.weight")):
                out, inp = base.shape(n)
                B, A = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
                self.factors[n] = LowRank(B * 0.1, A * 0.1, scale=2.0)

    def dtype(self, name):
        return torch.float32

    def tau_is_dense(self, name):
        return None

    def tau(self, name, base):
        return self.factors.get(name)


class DenseView:
    """The same expert with its tau densified: what the low-rank path must equal."""

    def __init__(self, lr: LowRankExpert):
        self.lr = lr

    def dtype(self, name):
        return torch.float32

    def tau_is_dense(self, name):
        return None

    def tau(self, name, base):
        f = self.lr.factors.get(name)
        return None if f is None else f.dense()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    model = tiny.tiny_llama(len(tok))
    base = Checkpoint(tiny.save(model, tok, root / "base"), "base_model")
    names = [n for n in base.names if base.dtype(n).is_floating_point]
    return model, base, names


def _logits_and_grad(model, base, names, experts, mode, gamma0):
    state = dict(model.state_dict(keep_vars=True))
    for p in model.parameters():
        p.requires_grad_(False)
    groups = {n: (0 if "layers.0" in n else 1) for n in names}
    tv = TaskVectors.load(
        experts, {n: state[n] for n in names}, base, names, [groups[n] for n in names], mode
    )
    student = MergedModel(model, tv)
    gamma = gamma0.clone().requires_grad_()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    logits = student.logits(gamma, {"input_ids": ids})
    (logits.square().mean()).backward()
    return logits.detach(), gamma.grad, tv


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_low_rank_task_vectors_equal_their_dense_form_without_densifying(setup, tok, mode):
    _, base, names = setup
    gamma0 = torch.tensor([[0.7, -0.3], [0.4, 1.2]])
    fresh = lambda: tiny.tiny_llama(len(tok))  # noqa: E731 - hooks attach to a model: one each
    lows = [LowRankExpert(base, 1), LowRankExpert(base, 2)]
    torch.manual_seed(0)
    a, ga, tv = _logits_and_grad(fresh(), base, names, lows, mode, gamma0)
    assert not tv.stacked and all(len(v) == 2 for n, v in tv.low_rank.items() if v)
    torch.manual_seed(0)
    b, gb, _ = _logits_and_grad(fresh(), base, names, [DenseView(x) for x in lows], mode, gamma0)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_stream_and_memory_give_the_same_logits_and_gradient(setup, tok, tmp_path):
    _, base, names = setup
    experts = []
    for i in range(3):
        torch.manual_seed(0)
        m = tiny.perturbed(tiny.tiny_llama(len(tok)), 0.05, seed=i + 1)
        experts.append(Checkpoint(tiny.save(m, tok, tmp_path / f"e{i}"), f"e{i}"))
    gamma0 = torch.tensor([[0.5, 0.2], [0.1, 0.9], [-0.4, 0.3]])
    out = {}
    for mode in ("memory", "stream"):
        torch.manual_seed(0)
        out[mode] = _logits_and_grad(tiny.tiny_llama(len(tok)), base, names, experts, mode, gamma0)
    assert out["stream"][2].nbytes == 0 < out["memory"][2].nbytes
    assert torch.allclose(out["memory"][0], out["stream"][0], atol=1e-5)
    assert torch.allclose(out["memory"][1], out["stream"][1], atol=1e-5)


def test_an_fsdp_launch_streams_and_refuses_memory_mode(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    mode, reason = pick_mode("auto", 10, 100)  # memory would fit: only sharding makes it stream
    assert mode == "stream" and "sharded across 2 processes" in reason
    with pytest.raises(UserError, match="task_vectors: memory"):
        pick_mode("memory", 10, 100)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard across
    assert pick_mode("auto", 10, 100)[0] == "memory"


def test_stream_classifies_full_checkpoints_from_headers(setup, monkeypatch):
    # reading every expert whole at load (to learn that its tau is dense) took minutes at 1.7B
    model, base, names = setup
    reads = []
    real = Checkpoint.tau
    monkeypatch.setattr(Checkpoint, "tau", lambda self, n, b: reads.append(n) or real(self, n, b))
    state = dict(model.state_dict(keep_vars=True))
    theta0 = {n: state[n] for n in names}
    stream = TaskVectors.load([base, base], theta0, base, names, [0] * len(names), "stream")
    assert reads == [] and all(stream.dense_idx[n] == [0, 1] for n in names)
    TaskVectors.load([base, base], theta0, base, names, [0] * len(names), "memory")
    assert len(reads) == 2 * len(names)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_0_dim_tensor_merges_and_gets_its_gradient(mode):
    class Scalar:  # one expert: a 0-dim tensor (a learned scale) read like a checkpoint's
        def __init__(self, v: float):
            self.v = torch.tensor(v)

        def get(self, name, start=None, stop=None):
            return self.v

        def dtype(self, name):
            return torch.float32

        def tau_is_dense(self, name):
            return True

        def tau(self, name, base):
            return self.v - base.get(name)

    tv = TaskVectors.load(
        [Scalar(1.5), Scalar(0.0)], {"s": torch.tensor(1.0)}, Scalar(1.0), ["s"], [0], mode
    )
    gamma = torch.tensor([[0.5], [0.2]], requires_grad=True)
    out = tv.combine("s", gamma)
    out.backward()
    assert out.shape == () and abs(float(out.detach()) - 1.05) < 1e-6  # 1 + 0.25 - 0.2
    assert gamma.grad[:, 0].tolist() == [0.5, -1.0]  # dGamma_t = tau_t
