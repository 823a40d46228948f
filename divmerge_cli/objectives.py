"""Per-position objectives between a teacher distribution and the student's logits, and batching.

DivMerge (paper Eq. 4, B.1) compares the teacher's distribution at each token it generated with
the student's distribution at the same position: D = JS (default) or KL(teacher || student),
averaged over the positions of a sample, then over samples. AdaMerging's objective is the
Shannon entropy of the student's distribution (no teacher).

The teacher is stored either dense ([..., V]) or as its top-k plus the remaining ("tail") mass.
With top-k, the divergence is computed over k + 1 buckets: the k ids and one bucket for all
other ids. This is the exact divergence if, inside the tail, the teacher's distribution is
proportional to the student's, and a lower bound otherwise (merging outcomes never increases a
divergence). With k = V it equals the dense divergence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # generate imports transformers: a data-free merge does without it
    from .generate import Generation

LN2 = math.log(2.0)
# Stands for log(0) where a finite value is needed: -inf would give 0 * inf = NaN in the
# forward or backward pass; exp(_NEG_LOG) underflows to exactly 0.
_NEG_LOG = -1e9
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class TeacherDist:
    """Teacher distribution: dense `probs` [..., V], or top-k `ids`/`probs` [..., k] + `tail` [...]."""

    probs: Tensor
    ids: Tensor | None = None
    tail: Tensor | None = None

    @classmethod
    def topk(cls, ids: Tensor, probs: Tensor, tail: Tensor) -> TeacherDist:
        return cls(probs=probs, ids=ids, tail=tail)

    @classmethod
    def full(cls, probs: Tensor) -> TeacherDist:
        return cls(probs=probs)

    @property
    def dense(self) -> bool:
        return self.ids is None

    def to(self, device: torch.device | str) -> TeacherDist:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherDist(move(self.probs), move(self.ids), move(self.tail))


def _buckets(teacher: TeacherDist, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(teacher probs, student log-probs) over the same buckets: V ids, or k ids + the tail."""
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    p = teacher.probs.float()
    if teacher.dense:
        return p, log_q
    # log of the student mass outside the teacher's top k, without computing 1 - sum(top k):
    # that difference cancels catastrophically when the student is confident.
    log_q_tail = torch.logsumexp(log_q.scatter(-1, teacher.ids, _NEG_LOG), dim=-1, keepdim=True)
    log_q = torch.cat([log_q.gather(-1, teacher.ids), log_q_tail], dim=-1)
    return torch.cat([p, teacher.tail.float().unsqueeze(-1)], dim=-1), log_q


def _log(p: Tensor) -> Tensor:
    """log p with p = 0 mapped to a finite value; it is only ever multiplied by p (so by 0)."""
    return torch.log(p.clamp_min(_TINY))


def kl(teacher: TeacherDist, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) at each position [...], in nats."""
    p, log_q = _buckets(teacher, student_logits)
    return (p * (_log(p) - log_q)).sum(-1)  # subtract before summing: less cancellation


def js(teacher: TeacherDist, student_logits: Tensor) -> Tensor:
    """Jensen-Shannon divergence at each position [...], in nats (0 <= JS <= ln 2)."""
    p, log_q = _buckets(teacher, student_logits)
    log_p = _log(p)
    log_m = torch.logaddexp(log_p, log_q) - LN2  # log((p + q) / 2), finite even where p = 0
    kl_pm = (p * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def entropy(teacher: TeacherDist | None, student_logits: Tensor) -> Tensor:
    """Shannon entropy of softmax(student_logits) at each position [...]; the teacher is ignored.

    AdaMerging's objective. Takes `teacher` only to share the signature of `OBJECTIVES`.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    return -(log_q.exp() * log_q).sum(-1)


OBJECTIVES = {"js": js, "kl": kl, "entropy": entropy}
DIVERGENCES = ("js", "kl")  # the objectives that compare with a teacher: DivMerge's `divergence`


def sample_means(per_position: Tensor, mask: Tensor) -> Tensor:
    """[B]: each sample's mean over its valid positions (paper B.1: average over positions, then
    the caller averages over samples). A sample with no valid position gives 0."""
    mask = mask.bool()
    # where, not multiply: a NaN at a padded position must not leak into the loss
    return torch.where(mask, per_position, 0.0).sum(-1) / mask.sum(-1).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Batching teacher samples into a student forward pass


@dataclass
class Batch:
    """One student forward pass over teacher samples.

    `model_inputs` are the keyword arguments of the model's forward. `student_logits(logits)`
    picks, for each sample, the logits that predict its generated tokens, as [B, T, V] aligned
    with `teacher` ([B, T, k] / [B, T, V]) and `mask` [B, T] (False on padding).
    """

    model_inputs: dict[str, Tensor]
    target_index: Tensor  # [B, T] int64, positions in the full (un-trimmed) logits time axis
    full_len: int  # length of that time axis
    mask: Tensor
    teacher: TeacherDist | None  # None: the samples carry no teacher distribution

    def student_logits(self, logits: Tensor) -> Tensor:
        """[B, T, V] from the model's logits, whether or not it honored `logits_to_keep`."""
        idx = self.target_index - (self.full_len - logits.shape[1])
        return logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            model_inputs={
                k: v.to(device) if isinstance(v, Tensor) else v
                for k, v in self.model_inputs.items()
            },
            target_index=self.target_index.to(device),
            mask=self.mask.to(device),
            teacher=None if self.teacher is None else self.teacher.to(device),
        )


def _pad(seqs: Sequence[Tensor], value: float, left: bool = False) -> Tensor:
    """Stack 1-D or N-D tensors along a new batch axis, padding their first axis."""
    n = max(len(s) for s in seqs)
    out = seqs[0].new_full((len(seqs), n, *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        if left:
            out[i, n - len(s) :] = s
        else:
            out[i, : len(s)] = s
    return out


def _padded_teacher(samples: Sequence[Generation]) -> TeacherDist | None:
    if all(s.probs is None and s.topk_ids is None for s in samples):
        return None  # token ids only: for an objective that reads no teacher (entropy)
    if all(s.probs is not None for s in samples):
        return TeacherDist.full(_pad([s.probs for s in samples], 0.0))
    if all(s.topk_ids is not None for s in samples):
        if len({s.topk_ids.shape[-1] for s in samples}) != 1:
            raise ValueError("teacher samples in one batch have different top_k")
        # Padding is "all mass in the tail": a valid distribution, so every value stays finite.
        return TeacherDist.topk(
            _pad([s.topk_ids for s in samples], 0),
            _pad([s.topk_probs for s in samples], 0.0),
            _pad([s.tail for s in samples], 1.0),
        )
    raise ValueError("teacher samples must all carry top-k or all carry dense distributions")


def collate(
    samples: Sequence[Generation],
    pad_id: int,
    is_seq2seq: bool,
    decoder_start_id: int | None = None,
) -> Batch:
    """Student inputs for teacher samples: one forward pass on prompt + generation (paper B.1).

    Decoder-only: input = prompt + gen[:-1], left-padded with explicit position ids, so the
    logits predicting the generated tokens are the last T_b positions of each row and
    `logits_to_keep` = max T spares the LM head everywhere else. T5: encoder input = prompt,
    decoder input = start token + gen[:-1] (right-padded), logits position j predicts gen[j].
    """
    lengths = torch.tensor([len(s.gen_ids) for s in samples])
    t_max = int(lengths.max())
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    if is_seq2seq:
        if decoder_start_id is None:
            raise ValueError("decoder_start_id is needed for encoder-decoder models")
        dec = [torch.cat([torch.tensor([decoder_start_id]), s.gen_ids[:-1]]) for s in samples]
        inputs = {
            "input_ids": _pad([s.prompt_ids for s in samples], pad_id),
            "attention_mask": _pad([torch.ones_like(s.prompt_ids) for s in samples], 0),
            "decoder_input_ids": _pad(dec, pad_id),
            "decoder_attention_mask": _pad([torch.ones_like(d) for d in dec], 0),
        }
        target_index, full_len = torch.arange(t_max).expand(len(samples), -1).clone(), t_max
    else:
        if any(len(s.prompt_ids) == 0 for s in samples):
            raise ValueError(
                "a decoder-only sample has an empty prompt; nothing predicts its first token"
            )
        seqs = [torch.cat([s.prompt_ids, s.gen_ids[:-1]]) for s in samples]
        attention = _pad([torch.ones_like(q) for q in seqs], 0, left=True)
        full_len = attention.shape[1]
        inputs = {
            "input_ids": _pad(seqs, pad_id, left=True),
            "attention_mask": attention,
            # as generate() does for left padding: positions count real tokens only
            "position_ids": (attention.cumsum(-1) - 1).clamp_min(0),
            "logits_to_keep": t_max,
        }
        # sample b's generated token j is predicted at index full_len - T_b + j
        target_index = (full_len - lengths[:, None] + torch.arange(t_max)[None, :]).clamp_max(
            full_len - 1
        )
        target_index = torch.where(mask, target_index, full_len - 1)
    return Batch(
        model_inputs=inputs,
        target_index=target_index,
        full_len=full_len,
        mask=mask,
        teacher=_padded_teacher(samples),
    )
