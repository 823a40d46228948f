"""Each data-free method against values worked out by hand or by a plain formula."""

import math

import torch

from divmerge_cli import methods as M
from divmerge_cli.layers import group_of, layer_position
from divmerge_cli.merge import resolve_value
from divmerge_cli.recipe import FilterValue

G = torch.Generator()


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_linear_weighted_average_normalized_and_not():
    xs = [t(1, 2), t(3, 4)]
    p = [{"weight": 1.0}, {"weight": 3.0}]
    assert torch.allclose(
        M.linear(None, xs, p, {"normalize": 1.0}, G), t(2.5, 3.5)
    )  # (1+9)/4, (2+12)/4
    assert torch.allclose(M.linear(None, xs, p, {"normalize": 0.0}, G), t(10, 14))


def test_task_arithmetic_is_base_plus_lambda_weighted_task_vectors():
    base = t(1, 1)
    xs = [t(2, 1), t(1, 3)]  # tau = (1, 0), (0, 2)
    p = [{"weight": 0.5}, {"weight": 2.0}]
    out = M.task_arithmetic(base, xs, p, {"normalize": 0.0, "lambda": 0.5}, G)
    assert torch.allclose(out, t(1 + 0.5 * 0.5, 1 + 0.5 * 4))
    out = M.task_arithmetic(base, xs, p, {"normalize": 1.0, "lambda": 1.0}, G)
    assert torch.allclose(out, t(1 + 0.5 / 2.5, 1 + 4 / 2.5))


def test_ties_trim_elect_disjoint_merge_by_hand():
    base = torch.zeros(4)
    tau1, tau2 = t(3, -1, 0.5, 2), t(-2, -2, 1, 1.5)
    p = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    # trim (k=2): tau1 -> (3, 0, 0, 2); tau2 -> (-2, -2, 0, 0)
    # elected sign of the sum (1, -2, 0, 2): (+, -, +, +); zeros never agree
    # agreeing: position 0 -> tau1 only (3), 1 -> tau2 only (-2), 2 -> none, 3 -> tau1 only (2)
    out = M.ties(base, [tau1, tau2], p, {"normalize": 1.0, "lambda": 1.0}, G)
    assert torch.allclose(out, t(3, -2, 0, 2))
    # two agreeing entries: normalize divides by the sum of their weights
    p2 = [{"weight": 1.0, "density": 1.0}, {"weight": 3.0, "density": 1.0}]
    out = M.ties(torch.ones(2), [t(3, 2), t(5, -1)], p2, {"normalize": 1.0, "lambda": 2.0}, G)
    # taus (2, 1), (4, -2); weighted (2, 1), (12, -6); signs (+, -): pos0 both agree, pos1 only model 2
    assert torch.allclose(out, t(1 + 2 * (2 + 12) / 4, 1 + 2 * (-6) / 3))


def test_ties_chunked_equals_whole_and_keeps_the_top_k_plus_ties():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 10, generator=g)
    xs = [
        base + torch.randn(64, 10, generator=g).round(decimals=1) for _ in range(3)
    ]  # many equal |tau|
    p = [{"weight": w, "density": 0.3} for w in (1.0, 0.5, 2.0)]
    gl = {"normalize": 1.0, "lambda": 1.0}
    whole = M.ties(base, xs, p, gl, G)
    prep = M.ties_prepare(base, xs, p)
    parts = [
        M.ties(base[i : i + 7], [x[i : i + 7] for x in xs], p, gl, G, prep) for i in range(0, 64, 7)
    ]
    assert torch.equal(torch.cat(parts), whole)
    for x in xs:
        tau = x - base
        thr = M.magnitude_threshold(x, base, 0.3)
        kept = (tau.abs() >= thr) & (tau != 0)  # what ties keeps
        k = int(0.3 * 640)
        top = tau.abs().flatten().sort(descending=True).values
        assert thr == top[k - 1]  # the k-th largest magnitude
        assert (
            int(kept.sum()) == int((tau.abs() >= top[k - 1]).sum()) >= k
        )  # and everything tied with it


def test_dare_drops_with_density_and_rescales_to_keep_the_l1_norm():
    base = torch.zeros(200_000)
    x = torch.full((200_000,), 0.1)
    p = [{"weight": 1.0, "density": 0.25}]
    g = {"normalize": 0.0, "lambda": 1.0, "rescale": 1.0}
    out = M.dare_linear(base, [x], p, g, torch.Generator().manual_seed(3))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    # survivors scaled so that sum |delta| is unchanged: 0.1 * n / n_kept (about 0.1 / 0.25)
    expect = 0.1 * 200_000 / int(kept.sum())
    assert torch.allclose(out[kept], torch.full_like(out[kept], expect))
    assert torch.allclose(out.abs().sum(), x.abs().sum())
    again = M.dare_linear(base, [x], p, g, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    plain = M.dare_linear(base, [x], p, {**g, "rescale": 0.0}, torch.Generator().manual_seed(3))
    assert torch.allclose(plain[kept], torch.full_like(plain[kept], 0.1))


def test_slerp_orthogonal_midpoint_and_colinear_lerp():
    out = M.slerp(t(1, 0), [t(0, 1)], [], {"t": 0.5}, G)
    assert torch.allclose(out, t(math.sqrt(0.5), math.sqrt(0.5)))
    out = M.slerp(t(1, 0), [t(0, 1)], [], {"t": 0.0}, G)
    assert torch.allclose(out, t(1, 0))
    out = M.slerp(t(1, 1), [t(2, 2)], [], {"t": 0.25}, G)  # colinear: plain lerp
    assert torch.allclose(out, t(1.25, 1.25))


def test_multislerp_of_orthogonal_task_vectors_is_the_spherical_midpoint():
    base = t(1, 1)
    xs = [t(3, 1), t(1, 3)]  # tau = (2, 0), (0, 2)
    p = [{"weight": 1.0}, {"weight": 1.0}]
    out = M.multislerp(base, xs, p, {"normalize_weights": 1.0, "eps": 1e-8}, G)
    assert torch.allclose(out, base + 2 * t(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    # unequal weights: the direction of 0.75 u1 + 0.25 u2, at the weighted mean norm
    p = [{"weight": 3.0}, {"weight": 1.0}]
    out = M.multislerp(base, xs, p, {"normalize_weights": 1.0, "eps": 1e-8}, G) - base
    assert torch.allclose(torch.linalg.vector_norm(out), torch.tensor(2.0), atol=1e-5)
    assert torch.allclose(torch.atan2(out[1], out[0]), torch.tensor(math.atan(1 / 3)), atol=1e-5)


def test_parameter_values_scalar_gradient_and_filters():
    assert resolve_value(0.3, "x", 0.7) == 0.3
    assert resolve_value([0.0, 1.0], "x", 0.25) == 0.25
    assert resolve_value([0.0, 1.0, 0.0], "x", 0.5) == 1.0
    assert resolve_value([0.0, 1.0, 0.0], "x", 1.0) == 0.0
    fv = [FilterValue(filter="self_attn", value=0.7), FilterValue(value=[0.0, 1.0])]
    assert resolve_value(fv, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.7
    assert resolve_value(fv, "model.layers.1.mlp.up_proj.weight", 1.0) == 1.0
    # no match falls through to the next source (global parameters, then the default)
    assert resolve_value([FilterValue(filter="mlp", value=0.2)], "model.norm.weight", 0.0) is None


def test_layer_position_and_groups():
    counts = {"model.layers": 3, "encoder.block": 1}
    assert layer_position("model.layers.0.mlp.up_proj.weight", counts) == 0.0
    assert layer_position("model.layers.1.mlp.up_proj.weight", counts) == 0.5
    assert layer_position("model.layers.2.mlp.up_proj.weight", counts) == 1.0
    assert layer_position("encoder.block.0.layer.0.SelfAttention.q.weight", counts) == 1.0
    # outside the blocks, mergekit 0.1.5 plans embeddings, final norm and head at t = 0
    assert layer_position("model.embed_tokens.weight", counts) == 0.0
    assert layer_position("lm_head.weight", counts) == 0.0
    assert group_of("model.layers.2.mlp.up_proj.weight") == "model.layers.2"
    assert group_of("decoder.block.1.layer.0.SelfAttention.q.weight") == "decoder.block.1"
    assert group_of("shared.weight") == "embeddings"
    assert group_of("model.norm.weight") == "head"


def test_linear_sums_bf16_row_chunks_in_float32():
    # merge_tensor hands elementwise methods row chunks in the checkpoints' storage dtype
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 64, generator=gen).bfloat16() for _ in range(3)]
    p = [{"weight": w} for w in (0.3, 0.3, 0.4)]
    out = M.linear(None, xs, p, {"normalize": 1.0}, G)
    want = sum(w * x.double() for w, x in zip((0.3, 0.3, 0.4), xs))
    assert out.dtype == torch.float32
    assert (out.double() - want).abs().max() < 1e-6  # bf16 arithmetic is off by ~1e-2
