"""checkpoint.py directly: row reads against whole tensors, the streamed shard writer against
safetensors' own reader, shard planning, sizes, and what counts as a finished model folder."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe
from divmerge_cli.checkpoint import (
    Checkpoint,
    ShardWriter,
    has_weights,
    human_size,
    parse_size,
    plan_shards,
)
from divmerge_cli.errors import UserError


def folder(tmp_path, tensors: dict[str, torch.Tensor]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_rows_read_from_disk_equal_slices_of_the_tensor(tmp_path, dtype):
    x = (torch.randn(7, 5) * 100).to(dtype)
    c = Checkpoint(folder(tmp_path, {"w": x, "v": torch.arange(3.0)}), "models[0].model")
    assert c.dtype("w") == dtype and c.shape("w") == (7, 5)
    assert torch.equal(c.get("w"), x)
    for a, b in [(0, 3), (3, 7), (5, 100), (6, 6), (-2, 2)]:
        assert torch.equal(c.get("w", a, b), x[max(a, 0) : b]), (a, b)
    assert torch.equal(c.get("v"), torch.arange(3.0))


def test_shard_writer_output_reads_back_with_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(4, 4, generator=g),
        "b": torch.randn(10, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),  # 0-dim: no axis to view as bytes
    }
    specs = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    w = ShardWriter(tmp_path, specs, max_bytes=70)  # a: 64 bytes, b: 20, c: 48
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == 64 + 20 + 48 + 4
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in tensors.items())
    (tmp_path / "x").mkdir()  # in any order: each at its place in its shard
    w = ShardWriter(tmp_path / "x", specs, max_bytes=70)
    for n in reversed(tensors):
        w.write(n, tensors[n])
    w.close()
    for f in index["weight_map"].values():
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / f).read_bytes()
    (tmp_path / "y").mkdir()
    w = ShardWriter(tmp_path / "y", specs, 10**6)
    with pytest.raises(RuntimeError, match="writer expected a"):
        w.write("a", tensors["a"].double())
    w.write("b", tensors["b"])
    with pytest.raises(RuntimeError, match="writer got b, which is not a tensor it still expects"):
        w.write("b", tensors["b"])
    with pytest.raises(RuntimeError, match="writer closed before a was written"):
        w.close()


def test_plan_shards_keeps_order_and_gives_a_big_tensor_its_own_shard():
    sizes = [("a", 40), ("b", 40), ("c", 150), ("d", 10), ("e", 90)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["d", "e"]]
    assert plan_shards(sizes, 10**9) == [["a", "b", "c", "d", "e"]]


def test_parse_size_uses_decimal_units():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("1000") == 1000
    for bad in ("", "GB", "five", "-1GB"):
        with pytest.raises(UserError, match="--out-shard-size"):
            parse_size(bad)


def test_has_weights_wants_config_and_safetensors(tmp_path, llama_zoo):
    assert has_weights(llama_zoo["base"])
    d = tmp_path / "m"
    d.mkdir()
    assert not has_weights(d)
    (d / "config.json").write_text("{}")
    assert not has_weights(d)  # an interrupted save: config written, weights not yet
    (d / "model.safetensors.index.json").write_text("{}")
    assert has_weights(d)
    assert not has_weights(tmp_path / "nowhere")


def test_remove_orphans_takes_only_dead_processes_folders(tmp_path):
    import os
    import subprocess

    from divmerge_cli.checkpoint import remove_orphans, scratch_dir

    dead = subprocess.Popen(["true"])  # a process that has exited: its PID is gone
    dead.wait()
    orphan = tmp_path / f".tmp-{dead.pid}-abc"
    orphan.mkdir()
    (orphan / "teacher.safetensors").write_bytes(b"half")
    mine = scratch_dir(tmp_path, "tmp")  # this live process's
    other = tmp_path / f".cell-{dead.pid}-x"  # another kind is left alone
    other.mkdir()
    entry = tmp_path / "0123abcd"  # a cache entry
    entry.mkdir()
    assert mine.name.startswith(f".tmp-{os.getpid()}-")
    assert remove_orphans(tmp_path, "tmp") == [orphan]
    assert not orphan.exists() and mine.exists() and other.exists() and entry.exists()


def test_human_size_picks_the_unit_parse_size_reads_back():
    cases = {0: "0 B", 512: "512 B", 8_390_000: "8.39 MB", 45_200_000: "45.2 MB"}
    cases |= {610_000_000: "610 MB", 999_600_000: "1.00 GB", 1_250_000_000: "1.25 GB"}
    for n, text in cases.items():
        assert human_size(n) == text
        if n:  # three digits kept: parse_size reads it back within 0.5 %
            assert abs(parse_size(text.replace(" ", "")) - n) <= 0.005 * n


def test_validate_prints_a_small_model_in_kilobytes(llama_zoo, tmp_path, cli):
    recipe = {
        "merge_method": "linear",
        "base_model": str(llama_zoo["base"]),
        "models": [{"model": str(llama_zoo["e0"])}, {"model": str(llama_zoo["e1"])}],
    }
    code, out, err = cli("validate", write_recipe(tmp_path / "r.yaml", recipe))
    assert code == 0 and "0.00 GB" not in out, err
    assert re.search(r"\(21 tensors, \d+ KB to read\)", " ".join(out.split())), out
