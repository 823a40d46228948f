"""objectives.py: divergences against hand-computed values, stability, batching, collate."""

from __future__ import annotations

import math

import pytest
import torch
from _fixtures_h2 import PROMPTS, llama, t5, tokenizer

from divmerge_cli.generate import Generation, greedy_generate
from divmerge_cli.objectives import (
    LN2,
    OBJECTIVES,
    TeacherDist,
    collate,
    entropy,
    js,
    kl,
    sample_means,
)


def logits_of(q: list[float]) -> torch.Tensor:
    return torch.tensor(q).log()


def full(p: list[float]) -> TeacherDist:
    return TeacherDist.full(torch.tensor(p))


def as_topk(p: torch.Tensor, k: int) -> TeacherDist:
    probs, ids = p.topk(k, dim=-1)
    return TeacherDist.topk(ids, probs, p.scatter(-1, ids, 0.0).sum(-1))


# --- hand-checked values ---------------------------------------------------------------------


def test_kl_js_hand_values():
    # p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2):
    # KL(p||q) = 2 * 1/2 * ln 2 = ln 2
    # m = (3/8, 3/8, 1/4); KL(p||m) = ln(4/3); KL(q||m) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    # JS = 1/2 (ln(4/3) + 1/2 ln(4/3)) = 3/4 ln(4/3)
    p, q = full([0.5, 0.5, 0.0]), logits_of([0.25, 0.25, 0.5])
    assert kl(p, q).item() == pytest.approx(math.log(2), abs=1e-6)
    assert js(p, q).item() == pytest.approx(0.75 * math.log(4 / 3), abs=1e-6)


def test_topk_one_bucket_hand_value():
    # teacher (0.6, 0.3, 0.1, 0) kept as top-1: buckets p = (0.6, 0.4); student uniform: q = (0.25, 0.75)
    p = torch.tensor([0.6, 0.3, 0.1, 0.0])
    q = logits_of([0.25] * 4)
    t = as_topk(p, 1)
    assert t.tail.item() == pytest.approx(0.4)
    want_kl = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)
    assert kl(t, q).item() == pytest.approx(want_kl, abs=1e-6)
    m = (0.425, 0.575)  # ((0.6 + 0.25) / 2, (0.4 + 0.75) / 2)
    want_js = 0.5 * (
        0.6 * math.log(0.6 / m[0]) + 0.4 * math.log(0.4 / m[1])
        + 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )  # fmt: skip
    assert js(t, q).item() == pytest.approx(want_js, abs=1e-6)
    # merging outcomes can only lose divergence: the bucketed value is a lower bound
    assert kl(t, q) < kl(TeacherDist.full(p), q)
    assert js(t, q) < js(TeacherDist.full(p), q)


def test_topk_exact_when_teacher_tail_proportional_to_student_tail():
    q = torch.tensor([0.1, 0.4, 0.2, 0.3])  # student; teacher keeps ids 0, 1
    p = torch.tensor([0.5, 0.3, 0.2 * 0.2 / 0.5, 0.2 * 0.3 / 0.5])  # tail 0.2 split like q's (2:3)
    t = TeacherDist.topk(torch.tensor([0, 1]), p[:2], torch.tensor(0.2))
    for f in (kl, js):
        assert f(t, q.log()).item() == pytest.approx(
            f(TeacherDist.full(p), q.log()).item(), abs=1e-6
        )


def test_entropy_values():
    assert entropy(None, torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    assert entropy(None, logits_of([0.5, 0.25, 0.25])).item() == pytest.approx(
        1.5 * math.log(2), abs=1e-6
    )
    assert entropy(None, torch.tensor([0.0, 200.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)


# --- properties --------------------------------------------------------------------------------


def test_js_symmetric_bounded_zero_on_identical():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 11, generator=g) * 3, torch.randn(5, 11, generator=g) * 3
    ab = js(TeacherDist.full(a.softmax(-1)), b)
    ba = js(TeacherDist.full(b.softmax(-1)), a)
    assert torch.allclose(ab, ba, atol=1e-6)
    assert (ab > 0).all() and (ab <= LN2).all()
    assert js(TeacherDist.full(a.softmax(-1)), a).abs().max() < 1e-6
    assert kl(TeacherDist.full(a.softmax(-1)), a).abs().max() < 1e-6
    # disjoint supports reach the bound
    assert js(full([1.0, 0.0]), torch.tensor([-100.0, 100.0])).item() == pytest.approx(
        LN2, abs=1e-6
    )


def test_sparse_with_k_equal_V_equals_dense():
    g = torch.Generator().manual_seed(1)
    p = (torch.randn(3, 4, 13, generator=g) * 2).softmax(-1)
    q = torch.randn(3, 4, 13, generator=g) * 2
    t = as_topk(p, 13)
    assert (t.tail == 0).all()  # the mass outside all V ids is exactly zero, not a rounding residue
    for f in (kl, js):
        assert torch.allclose(f(t, q), f(TeacherDist.full(p), q), atol=1e-6)


@pytest.mark.parametrize("name", ["js", "kl", "entropy"])
def test_gradient_finite_with_zero_teacher_probs(name):
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    q = torch.tensor(
        [[0.0, 300.0, -300.0, 5.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True
    )
    f = OBJECTIVES[name]
    for teacher in (TeacherDist.full(p), as_topk(p, 5), as_topk(p, 2)):
        (grad,) = torch.autograd.grad(f(teacher, q).sum(), q)
        assert torch.isfinite(grad).all() and torch.isfinite(f(teacher, q)).all()
        assert grad.abs().sum() > 0


def test_objectives_share_signature_and_shapes():
    p = torch.full((2, 3, 6), 1 / 6)
    q = torch.randn(2, 3, 6)
    for f in OBJECTIVES.values():
        assert f(TeacherDist.full(p), q).shape == (2, 3)
    assert sorted(OBJECTIVES) == ["entropy", "js", "kl"]


# --- sample_means ----------------------------------------------------------------------------


def test_sample_means_average_each_samples_valid_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, float("nan"), 9.0, 9.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # 3 (mean of four), 4 (padding ignored, its NaN too), 0 (no valid position)
    assert sample_means(x, mask).tolist() == pytest.approx([3.0, 4.0, 0.0])
    xg = x.clone().requires_grad_(True)
    sample_means(xg, mask).sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert xg.grad[0, 0].item() == pytest.approx(0.25) and xg.grad[1, 0].item() == 1.0
    assert xg.grad[1, 1].item() == 0.0 and xg.grad[2].abs().sum() == 0


# --- collate ---------------------------------------------------------------------------------


def check_teacher_reproduced(model, top_k):
    """The teacher's own forward through collate reproduces its stored distributions (JS ~ 0)."""
    tok = tokenizer()
    seq2seq = model.config.is_encoder_decoder
    gens = greedy_generate(model, tok, PROMPTS, 8, batch_size=3, top_k=top_k)
    lengths = [len(g.gen_ids) for g in gens]
    assert min(lengths) < max(lengths)  # padding is exercised
    batch = collate(
        gens, tok.pad_token_id, seq2seq, getattr(model.config, "decoder_start_token_id", None)
    )
    assert batch.mask.sum(1).tolist() == lengths
    with torch.no_grad():
        logits = model(**batch.model_inputs).logits
        student = batch.student_logits(logits)
        per_pos = js(batch.teacher, student)
    assert per_pos[batch.mask].abs().max() < 1e-5
    assert sample_means(per_pos, batch.mask).abs().max() < 1e-5
    # the student's argmax at each kept position is the token the teacher generated
    gen = torch.nn.utils.rnn.pad_sequence([g.gen_ids for g in gens], batch_first=True)
    assert (student.argmax(-1) == gen)[batch.mask].all()
    # a different model is far from 0, so the check above is not vacuous
    other = torch.randn_like(student) * 3
    assert sample_means(js(batch.teacher, other), batch.mask).min() > 1e-3
    return batch, logits


@pytest.mark.parametrize("top_k", [5, "full"])
def test_collate_llama_teacher_reproduced(top_k):
    batch, kept = check_teacher_reproduced(llama(), top_k)
    assert kept.shape[1] == batch.model_inputs["logits_to_keep"]
    # without logits_to_keep the model returns every position; the same logits are picked
    inputs = {k: v for k, v in batch.model_inputs.items() if k != "logits_to_keep"}
    with torch.no_grad():
        all_logits = llama()(**inputs).logits
    assert all_logits.shape[1] == batch.full_len
    assert torch.allclose(batch.student_logits(all_logits), batch.student_logits(kept), atol=1e-5)


@pytest.mark.parametrize("top_k", [5, "full"])
def test_collate_t5_teacher_reproduced(top_k):
    batch, _ = check_teacher_reproduced(t5(), top_k)
    assert batch.model_inputs["decoder_input_ids"][:, 0].eq(0).all()  # T5 decoder start token


def test_collate_layout_decoder_only_by_hand():
    a = Generation(torch.tensor([5, 6, 7]), torch.tensor([8, 1]), "", probs=torch.eye(10)[[8, 1]])
    b = Generation(torch.tensor([9]), torch.tensor([4, 4, 1]), "", probs=torch.eye(10)[[4, 4, 1]])
    batch = collate([a, b], pad_id=0, is_seq2seq=False)
    # rows: prompt + gen[:-1], left-padded to length 4
    assert batch.model_inputs["input_ids"].tolist() == [[5, 6, 7, 8], [0, 9, 4, 4]]
    assert batch.model_inputs["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert batch.target_index.tolist() == [[2, 3, 3], [1, 2, 3]]
    assert batch.mask.tolist() == [[True, True, False], [True, True, True]]
    t5b = collate([a, b], pad_id=0, is_seq2seq=True, decoder_start_id=0)
    assert t5b.model_inputs["decoder_input_ids"].tolist() == [[0, 8, 0], [0, 4, 4]]
    assert t5b.model_inputs["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]


def test_collate_rejects_mixed_teachers():
    a = Generation(torch.tensor([5]), torch.tensor([1]), "", probs=torch.ones(1, 4) / 4)
    b = Generation(torch.tensor([5]), torch.tensor([1]), "", topk_ids=torch.zeros(1, 1).long(),
                   topk_probs=torch.ones(1, 1), tail=torch.zeros(1))  # fmt: skip
    with pytest.raises(ValueError, match="all carry"):
        collate([a, b], 0, False)
