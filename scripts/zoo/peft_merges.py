"""PEFT's own adapter combinations on a LoRA sweep's subsets, scored like the sweep's cells.

    python scripts/zoo/peft_merges.py ZOO_DIR/sweeps/lora_pairwise_divmerge.yaml [--types linear cat svd
        ties ties_svd] [--density 0.2] [--weight 1.0] [--results FILE] [--threads 1]

For each subset of the sweep file (its `k`, its seed) and each combination type, the subset's
adapters are loaded into one PeftModel over the sweep's base, combined with
`add_weighted_adapter(weights=[--weight] * k, combination_type=TYPE, density=--density)` (density
only for the TIES/DARE types; svd types keep PEFT's default rank, the largest input rank), folded
in with merge_and_unload, and scored on the subset's tasks with the sweep's eval settings. ANP
divides by the sweep's reference scores (the experts' rows in its results file; run the sweep,
or any part of it, first). Rows go to --results (default: the sweep's results file with
`-peft` before `.jsonl`) in the sweep's row format, labelled `peft_<type>`; cells already there
are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TYPES = ("linear", "cat", "svd", "ties", "ties_svd")
WITH_DENSITY = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"}


def combined_model(base: Path, adapters: dict[str, Path], kind: str, weight: float, density: float):
    """The base with PEFT's `kind` combination of `adapters` folded in."""
    from peft import PeftModel

    from divmerge_cli.hf import load_model

    names = list(adapters)
    model = PeftModel.from_pretrained(load_model(base), str(adapters[names[0]]), names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), name)
    extra = {"density": density} if kind in WITH_DENSITY else {}
    weights = [weight] * len(names)
    model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **extra)
    model.set_adapter("merged")
    for name in names:
        model.delete_adapter(name)
    return model.merge_and_unload().eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--results", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)

    import torch

    from divmerge_cli.evaluate import labelled_rows, score_task
    from divmerge_cli.hf import load_tokenizer
    from divmerge_cli.sweep.config import load_sweep
    from divmerge_cli.sweep.results import append_row, cell_id, cell_row, read_results

    torch.set_num_threads(a.threads)
    cfg = load_sweep(a.sweep)
    out = a.results or cfg.results.with_name(cfg.results.stem + "-peft.jsonl")
    refs = {
        r["task"]: r["score"] for r in read_results(cfg.results) if r.get("type") == "reference"
    }
    missing = [t for t in cfg.experts if t not in refs]
    if missing:
        raise SystemExit(f"{cfg.results}: no reference score for {missing[0]}; run the sweep first")
    done = (
        {cell_id(r) for r in read_results(out) if r.get("type") == "cell"}
        if out.exists()
        else set()
    )
    tokenizer = load_tokenizer(cfg.base_model)
    e = cfg.eval
    for subset in cfg.subsets():
        for kind in a.types:
            label = f"peft_{kind}"
            key = f"w{a.weight:g}" + (f"-d{a.density:g}" if kind in WITH_DENSITY else "")
            if (label, key, subset) in done:
                continue
            start = time.perf_counter()
            adapters = {t: cfg.experts[t] for t in subset}
            model = combined_model(cfg.base_model, adapters, kind, a.weight, a.density)
            scores = {}
            for t in subset:
                rows = labelled_rows(t, cfg.tasks[t], e.split, e.limit, cfg.seed)
                scores[t] = score_task(model, tokenizer, t, cfg.tasks[t], rows, e.batch_size)
            del model
            extra = {"density": a.density} if kind in WITH_DENSITY else {}
            params = {"weight": a.weight, **extra}
            seconds = time.perf_counter() - start
            row = cell_row(label, key, f"peft:{kind}", params, subset, scores, refs, seconds)
            append_row(out, row)
            print(
                f"{label} {'+'.join(subset)}: ANP {100 * row['anp']:.2f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
