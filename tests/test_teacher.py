"""generate.py and teacher.py: greedy generation vs a naive loop, and the teacher cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _fixtures_h2 import EOS, PROMPTS, llama, llama_dir, naive_greedy, t5, t5_dir, tokenizer  # noqa: F401
from safetensors.torch import load_file, save_file

from divmerge_cli import hf, teacher
from divmerge_cli.errors import UserError
from divmerge_cli.generate import greedy_generate
from divmerge_cli.teacher import (
    META,
    TENSORS,
    default_cache_dir,
    load_or_build_teacher,
    teacher_cache_key,
)

MAX_NEW = 8

# --- greedy_generate -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [llama, t5], ids=["llama", "t5"])
def test_batched_generation_equals_naive_argmax_loop(make):
    model, tok = make(), tokenizer()
    dense = greedy_generate(model, tok, PROMPTS, MAX_NEW, batch_size=3, top_k="full")
    sparse = greedy_generate(model, tok, PROMPTS, MAX_NEW, batch_size=3, top_k=4)
    lengths = []
    for prompt, d, s in zip(PROMPTS, dense, sparse):
        ids, probs = naive_greedy(model, prompt, MAX_NEW)
        lengths.append(len(ids))
        assert d.gen_ids.tolist() == ids == s.gen_ids.tolist()
        assert d.prompt_ids.tolist() == tok(prompt)["input_ids"]
        assert d.probs.shape == probs.shape and d.probs.dtype == torch.float32
        assert torch.allclose(d.probs, probs, atol=1e-5)
        ref_p, ref_ids = probs.topk(4, dim=-1)
        assert s.topk_ids.dtype == torch.int64 and s.topk_ids.shape == (len(ids), 4)
        assert torch.equal(s.topk_ids, ref_ids)
        assert torch.allclose(s.topk_probs, ref_p, atol=1e-5)
        assert torch.allclose(s.tail, 1 - ref_p.sum(-1), atol=1e-5)
        assert d.text == tok.decode(ids, skip_special_tokens=True).strip()
    # both stopping rules happen: EOS kept as the last token, or the max_new_tokens cap
    assert MAX_NEW in lengths and min(lengths) < MAX_NEW
    for g in dense:
        assert EOS not in g.gen_ids[:-1].tolist()


def test_generation_ignores_checkpoint_sampling_settings():
    model, tok = llama(), tokenizer()
    want = greedy_generate(model, tok, PROMPTS[:4], MAX_NEW, top_k="full")
    saved = model.generation_config
    try:
        model.generation_config = saved.__class__(
            do_sample=True, top_k=2, temperature=5.0, repetition_penalty=10.0, no_repeat_ngram_size=1,
            eos_token_id=EOS, bos_token_id=2, pad_token_id=0,
        )  # fmt: skip
        cfg = model.generation_config
        got = greedy_generate(model, tok, PROMPTS[:4], MAX_NEW, top_k="full")
        assert model.generation_config is cfg  # restored
    finally:
        model.generation_config = saved
    for w, g in zip(want, got):
        assert torch.equal(w.gen_ids, g.gen_ids) and torch.allclose(w.probs, g.probs, atol=1e-6)


def test_generation_order_progress_and_top_k_check():
    model, tok = llama(), tokenizer()
    calls = []
    gens = greedy_generate(
        model, tok, PROMPTS, 3, batch_size=3, progress=lambda d, n: calls.append((d, n))
    )
    assert calls == [(0, 8), (3, 8), (6, 8), (8, 8)]  # a start, then after each batch
    assert gens[0].topk_ids is None and gens[0].probs is None
    # batched by length internally, but each output belongs to its prompt
    one = greedy_generate(model, tok, [PROMPTS[5]], 3)[0]
    assert torch.equal(one.gen_ids, gens[5].gen_ids)
    with pytest.raises(UserError, match=r"top_k: expected an integer in 1..300"):
        greedy_generate(model, tok, PROMPTS[:1], 3, top_k=301)


# --- teacher cache ---------------------------------------------------------------------------


def build(model_dir, cache, prompts=PROMPTS, max_new=MAX_NEW, top_k=4):
    return load_or_build_teacher(model_dir, "sst2", prompts, max_new, top_k, cache, batch_size=4)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.task == y.task and x.text == y.text
        for f in ("prompt_ids", "gen_ids", "topk_ids", "topk_probs", "tail", "probs"):
            u, v = getattr(x, f), getattr(y, f)
            assert (u is None and v is None) or (torch.equal(u, v) and u.dtype == v.dtype), f


def forbid_loading(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the expert was loaded although the cache should hit")

    monkeypatch.setattr(hf, "load_model", fail)


def test_cache_hit_does_not_load_the_model(llama_dir, tmp_path, monkeypatch):  # noqa: F811
    first, hit = build(llama_dir, tmp_path)
    assert not hit and len(first) == len(PROMPTS)
    assert first[0].task == "sst2" and first[0].topk_ids.dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == [
        teacher_cache_key(llama_dir, PROMPTS, MAX_NEW, 4)
    ]
    forbid_loading(monkeypatch)
    again, hit = build(llama_dir, tmp_path)
    assert hit
    assert_same(first, again)
    # the cached targets are what the expert produces, probabilities stored as float16 (11-bit
    # mantissa: relative error <= 2**-11) and rescaled so top-k + tail is a distribution again
    # generated at another batch size than the cache was built with: the same tokens and ids,
    # probabilities equal up to float rounding (batched matmuls differ in the last bit)
    direct = greedy_generate(llama(), tokenizer(), PROMPTS, MAX_NEW, batch_size=3, top_k=4)
    for d, s in zip(direct, again):
        assert torch.equal(d.gen_ids, s.gen_ids) and torch.equal(d.topk_ids, s.topk_ids)
        assert torch.allclose(d.tail, s.tail, rtol=1e-5, atol=1e-7)
        assert torch.allclose(d.topk_probs, s.topk_probs, rtol=2**-10, atol=1e-7)
        assert torch.allclose(s.topk_probs.sum(-1) + s.tail, torch.ones(len(s.tail)), atol=1e-6)


def test_cache_key_changes_with_every_input(llama_dir, tmp_path):  # noqa: F811
    key = teacher_cache_key(llama_dir, PROMPTS, MAX_NEW, 4)
    assert key == teacher_cache_key(llama_dir, list(PROMPTS), MAX_NEW, 4)
    changed = {
        teacher_cache_key(llama_dir, PROMPTS[:-1] + ["film!"], MAX_NEW, 4),
        teacher_cache_key(llama_dir, PROMPTS[::-1], MAX_NEW, 4),
        teacher_cache_key(llama_dir, PROMPTS, MAX_NEW + 1, 4),
        teacher_cache_key(llama_dir, PROMPTS, MAX_NEW, 5),
        teacher_cache_key(llama_dir, PROMPTS, MAX_NEW, "full"),
    }
    # a weight, the config, the tokenizer
    other = shutil.copytree(llama_dir, tmp_path / "copy")
    assert teacher_cache_key(other, PROMPTS, MAX_NEW, 4) == key  # location does not matter
    w = load_file(other / "model.safetensors")
    w["model.norm.weight"][0] += 1e-3
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    changed.add(teacher_cache_key(other, PROMPTS, MAX_NEW, 4))
    cfg = json.loads((llama_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    changed.add(teacher_cache_key(other, PROMPTS, MAX_NEW, 4))
    (other / "tokenizer_config.json").write_text(
        (other / "tokenizer_config.json").read_text() + " "
    )
    changed.add(teacher_cache_key(other, PROMPTS, MAX_NEW, 4))
    assert key not in changed and len(changed) == 8


@pytest.mark.parametrize(
    "change",
    [{"prompts": PROMPTS[:-1] + ["film!"]}, {"max_new": 5}, {"top_k": 6}, {"weights": True}],
    ids=["prompt", "max_new_tokens", "k", "weight"],
)
def test_cache_miss_after_a_change(change, llama_dir, tmp_path):  # noqa: F811
    model_dir = llama_dir
    build(model_dir, tmp_path / "cache")
    if change.pop("weights", False):
        model_dir = shutil.copytree(llama_dir, tmp_path / "expert")
        w = load_file(model_dir / "model.safetensors")
        w["lm_head.weight"][5, 0] += 1.0
        save_file(w, model_dir / "model.safetensors", metadata={"format": "pt"})
    samples, hit = build(model_dir, tmp_path / "cache", **change)
    assert not hit
    assert len(list((tmp_path / "cache").iterdir())) == 2
    if "top_k" in change:
        assert samples[0].topk_ids.shape[1] == 6
    if "max_new" in change:
        assert max(len(s.gen_ids) for s in samples) <= 5


def damage_truncate(entry):
    f = entry / TENSORS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def damage_flip(entry):
    f = entry / TENSORS
    b = bytearray(f.read_bytes())
    for i in (10, len(b) // 2, len(b) - 3):  # header, data, last value
        b[i] ^= 0xFF
    f.write_bytes(bytes(b))


def damage_meta(entry):
    (entry / META).write_text('{"format": 1, "n": ')


def damage_shapes(entry):
    # a well-formed file with the right checksum but inconsistent offsets
    t = load_file(entry / TENSORS)
    t["gen_offsets"] = t["gen_offsets"].clone()
    t["gen_offsets"][-1] += 1
    save_file(t, entry / TENSORS)
    meta = json.loads((entry / META).read_text())
    meta["sha256"] = teacher._file_sha256(entry / TENSORS)
    (entry / META).write_text(json.dumps(meta))


def damage_meta_shape(entry):
    (entry / META).write_text("[1, 2]")  # valid JSON, not the mapping meta.json holds


def damage_missing_file(entry):
    (entry / TENSORS).unlink()


def damage_file_not_folder(entry):
    shutil.rmtree(entry)
    entry.write_text("not a cache entry")


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_flip,
        damage_meta,
        damage_shapes,
        damage_meta_shape,
        damage_missing_file,
        damage_file_not_folder,
    ],
)
def test_damaged_entry_is_rebuilt(damage, t5_dir, tmp_path):  # noqa: F811
    first, _ = build(t5_dir, tmp_path, top_k="full")
    (entry,) = tmp_path.iterdir()
    damage(entry)
    again, hit = build(t5_dir, tmp_path, top_k="full")
    assert not hit
    assert_same(first, again)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp folders left behind
    assert build(t5_dir, tmp_path, top_k="full")[1]  # and the rebuilt entry is good


def test_a_damaged_entry_that_cannot_be_deleted_is_still_rebuilt(t5_dir, tmp_path, monkeypatch):  # noqa: F811
    first, _ = build(t5_dir, tmp_path, top_k="full")
    (entry,) = tmp_path.iterdir()
    (entry / META).write_text("{")
    # as when the entry's folder is unreadable: its contents cannot be listed, so not deleted
    monkeypatch.setattr(teacher.shutil, "rmtree", lambda *a, **k: None)
    again, hit = build(t5_dir, tmp_path, top_k="full")
    assert not hit
    assert_same(first, again)
    assert build(t5_dir, tmp_path, top_k="full")[1]  # the entry under the key was rebuilt


def test_dense_entry_is_much_larger_than_topk(llama_dir, tmp_path):  # noqa: F811
    sizes = {}
    for k in (4, "full"):
        samples, _ = build(llama_dir, tmp_path / str(k), top_k=k)
        (entry,) = (tmp_path / str(k)).iterdir()
        sizes[k] = (entry / TENSORS).stat().st_size
    n_tok = sum(len(s.gen_ids) for s in samples)
    vocab = samples[0].probs.shape[1]
    # dense: 4 bytes per vocabulary entry; top-4: 4 (int32 id) + 4 (prob) per kept entry + 4 (tail)
    assert sizes["full"] > n_tok * vocab * 4 > sizes[4]
    assert sizes[4] < n_tok * (4 * 8 + 4) + 4096  # the rest is ids, offsets and the header


def test_default_cache_dir():
    d = default_cache_dir()
    assert d.name == "teacher" and "divmerge" in str(d)


# --- teacher_samples: the one path from a task to its targets ----------------------------------


def test_default_top_k_is_capped_at_a_small_vocabulary(tmp_path):
    from divmerge_cli import tiny
    from divmerge_cli.methods import OPTIMIZE_DEFAULTS
    from divmerge_cli.tasks import TaskSpec

    tok = tiny.build_word_tokenizer(PROMPTS)
    vocab = len(tok)
    assert vocab < OPTIMIZE_DEFAULTS["top_k"]
    expert = tiny.save(tiny.tiny_llama(vocab), tok, tmp_path / "expert")
    rows = tmp_path / "val.jsonl"
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    spec = TaskSpec(validation=str(rows), prompt="{text}", max_new_tokens=4)
    kw = dict(seed=0, cache_dir=tmp_path / "cache", batch_size=4)
    got = teacher.teacher_samples(
        expert, "t", spec, samples=5, top_k=OPTIMIZE_DEFAULTS["top_k"], **kw
    )
    assert len(got) == 5 and {g.task for g in got} == {"t"}
    for g in got:
        assert g.topk_ids.shape == (len(g.gen_ids), vocab)  # every id kept: nothing in the tail
        assert torch.allclose(g.tail, torch.zeros_like(g.tail), atol=1e-6)
    # k >= V and k = V are one teacher: the same cache entry, no second generation
    assert teacher.resolve_top_k(1000, expert) == vocab == teacher.resolve_top_k(vocab, expert)
    assert teacher.resolve_top_k(8, expert) == 8 and teacher.resolve_top_k("full", expert) == "full"
    again = teacher.teacher_samples(expert, "t", spec, samples=5, top_k=vocab, **kw)
    assert [g.gen_ids.tolist() for g in again] == [g.gen_ids.tolist() for g in got]
    assert len(list((tmp_path / "cache").iterdir())) == 1
