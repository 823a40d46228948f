"""Collect the zoo's sweep results into docs/results/: raw JSONL, tables, CSV, plots, paper side by side.

    python scripts/zoo/report.py ZOO_DIR [--out docs/results]
    python scripts/zoo/report.py ZOO_DIR --lora [--out docs/results/lora] [--full docs/results]
    python scripts/zoo/report.py ZOO_DIR --svd2025 [--out docs/results/svd2025]
    python scripts/zoo/report.py ZOO_DIR --restore [--out docs/results]

With --svd2025 it reads only issue 27's results (ZOO_DIR/results/svd2025_*.jsonl, a later build
of the zoo than the other results: its experts differ from theirs in the last digits, see
zoo.json) and writes to --out the raw files, svd2025.md (mean ANP of the SVD merges, task
arithmetic, TIES and DivMerge's variants by k; each DivMerge variant against the best data-free
method of that k on the same subsets; `epochs: auto` against one epoch; merge seconds, peak
memory and Adam steps per method; the LoRA zoo's svd2025_lora_* in tables of their own),
experts.md and zoo.json (LoRA adapters included when built). The other modes leave those files
out.

With --restore it copies the committed results back into ZOO_DIR/results/ (files it lacks), after
checking that the zoo's weights are the ones they came from, so sweeps resume on a rebuilt zoo
(LoRA results only when the adapters match too).

With --lora it reads only the LoRA zoo's results (ZOO_DIR/results/lora_*.jsonl, PEFT's rows
included) and writes to --out the raw files, tables.md / CSV / plots, lora.md (each method's
ANP on the adapters beside the same method on the full fine-tunes, read from the committed
results in --full; paired differences; wall time; the adapters against the base) and
lora_zoo.json (sha256 of every adapter folder). Without it, the lora_* files are left out.

Reads ZOO_DIR/results/*.jsonl (written by `divmerge sweep ZOO_DIR/sweeps/*.yaml`) and
ZOO_DIR/scores.json (base vs expert, written by build_experts.py), and writes to --out:
- the raw results files, copied as they are;
- tables.md, pairwise.csv, per_k.csv, anp_vs_k.png, gamma_trace.png (divmerge_cli.sweep.write_reports
  over the cells of every file);
- paper.md: our pairwise and per-k ANP beside the paper's Tables 3, 6 and 7; paired differences
  against task arithmetic and TIES on the same subsets; wall time per cell;
- remark3.md: mean ANP by k of DivMerge on TIES / DARE-processed task vectors, its paired
  difference against DivMerge and TIES on the same subsets, and each method's spread over every
  pair and every 3-subset (stability_*.jsonl, kept out of the other tables) beside the paper's
  Table 4;
- experts.md / experts.csv: base vs expert on each task's test split;
- zoo.json: sha256 of the base's and each expert's files (divmerge_cli.hashing.hash_model_dir) and
  of the data manifest (copied as data_manifest.json), so a rebuilt zoo can be checked against
  the one these numbers came from.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
from pathlib import Path

# Our labels -> the paper's rows. Table 3: (classification, generation) mean ANP over pairs.
PAPER_TABLE3 = {
    "average": (88.48, 94.38),
    "multislerp": (91.54, 76.39),
    "ties": (94.06, 95.53),
    "adamerging_task": (93.62, 93.42),
    "adamerging_layer": (94.06, 83.20),
    "divmerge_kl_task": (97.68, 93.97),
    "divmerge_kl_layer": (99.16, 97.50),
    "divmerge_js_task": (97.73, 97.29),
    "divmerge_js_layer": (99.18, 98.93),
}
# Table 6 (GLUE classification) and Table 7 (T5 generation): k -> label -> ANP (%).
_T6_COLS = ["average", "multislerp", "ties", "adamerging_task", "divmerge_kl_task"]
_T6_COLS += ["divmerge_js_task", "adamerging_layer", "divmerge_kl_layer", "divmerge_js_layer"]


def _by_k(table: dict[int, tuple[float, ...]]) -> dict[int, dict[str, float]]:
    return {k: dict(zip(_T6_COLS, v)) for k, v in table.items()}


PAPER_TABLE6 = _by_k(
    {
        2: (93.89, 94.20, 96.02, 91.16, 98.18, 98.28, 92.41, 98.85, 98.85),
        3: (89.10, 92.18, 94.08, 90.86, 97.40, 97.39, 90.26, 98.42, 98.26),
        4: (75.12, 79.31, 79.37, 78.73, 80.12, 79.21, 78.47, 95.20, 95.19),
        5: (60.92, 66.86, 73.61, 66.84, 83.82, 85.37, 64.93, 95.60, 95.50),
    }
)
PAPER_TABLE7 = _by_k(
    {
        2: (97.92, 98.96, 98.43, 99.74, 96.34, 98.96, 100.00, 98.96, 99.48),
        3: (82.62, 67.89, 87.87, 79.92, 92.99, 96.36, 89.26, 95.91, 97.79),
        4: (53.38, 64.85, 56.42, 60.88, 87.52, 91.75, 83.15, 94.97, 97.44),
    }
)


# Table 4: half-width (points) of the 95% interval of ANP over task subsets, generation tasks,
# merging 2 and 3 tasks.
PAPER_TABLE4 = {
    "average": (2.60, 2.96),
    "multislerp": (21.04, 27.97),
    "ties": (4.44, 19.01),
    "adamerging_task": (10.08, 23.94),
    "adamerging_layer": (9.94, 19.03),
    "divmerge_js_task": (1.94, 5.37),
    "divmerge_js_layer": (1.05, 1.09),
}


def collect(files: list[Path]) -> list[dict]:
    """References (first seen per task) then every cell, in file order."""
    from divmerge_cli.sweep import read_results

    refs: dict[str, dict] = {}
    cells: list[dict] = []
    for f in files:
        for r in read_results(f):
            if r.get("type") == "reference":
                refs.setdefault(r["task"], r)
            elif r.get("type") == "cell":
                cells.append(r)
    return [*refs.values(), *cells]


_KINDS = ("classif.", "mixed", "gen.")


def _pair_kinds(rows: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(label, kind) -> ANP (%) of the pairwise cells whose tasks are both classification
    (accuracy), both generation, or one of each."""
    from divmerge_cli.sweep import cell_rows

    out: dict[tuple[str, str], list[float]] = {}
    for r in cell_rows(rows):
        if int(r["k"]) != 2:
            continue
        n_acc = sum(m == "accuracy" for m in r["metrics"].values())
        kind = _KINDS[0] if n_acc == 2 else _KINDS[2] if n_acc == 0 else _KINDS[1]
        out.setdefault((r["label"], kind), []).append(100 * r["anp"])
    return out


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# Paired comparisons: task arithmetic is the merge whose coefficients DivMerge and AdaMerging
# learn (λ = 1 for every task before learning), TIES the paper's strongest data-free baseline.
PAIRED_BASELINES = ("task_arithmetic", "ties")


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def paper_tables(rows: list[dict]) -> str:
    from divmerge_cli.sweep import summarize

    summary = summarize(rows)
    out = [
        "**Pairwise: mean ANP (%) ± std over our 10 pairs, beside the paper's Table 3**",
        "",
        "| method | ours | pairs | ours: classif. / mixed / gen. pairs | paper classif. (GLUE)"
        " | paper gen. (T5) |",
        "|---|---|---|---|---|---|",
    ]
    kinds = _pair_kinds(rows)
    for label, by_k in summary.items():
        s = by_k.get(2)
        if s is None:
            continue
        paper = PAPER_TABLE3.get(label, (None, None))
        ours = f"{s.mean:.2f}" + (f" ± {s.std:.2f}" if s.std is not None else "")
        split = " / ".join(_f(_mean(kinds.get((label, kind), []))) for kind in _KINDS)
        out.append(f"| {label} | {ours} | {s.n} | {split} | {_f(paper[0])} | {_f(paper[1])} |")
    ks = sorted({k for by_k in summary.values() for k in by_k})
    out += ["", "**Mean ANP (%) by k: ours / paper Table 6 (GLUE) / paper Table 7 (T5)**", ""]
    out.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
    out.append("|---|" + "---|" * len(ks))
    for label, by_k in summary.items():
        cells = []
        for k in ks:
            ours = _f(by_k[k].mean) if k in by_k else "-"
            t6 = PAPER_TABLE6.get(k, {}).get(label)
            t7 = PAPER_TABLE7.get(k, {}).get(label)
            cells.append(f"{ours} / {_f(t6)} / {_f(t7)}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _anp_by_cell(rows: list[dict]) -> dict[tuple[str, int], dict[tuple[str, ...], float]]:
    """(label, k) -> subset -> ANP (%)."""
    from divmerge_cli.sweep import cell_rows

    anp: dict[tuple[str, int], dict[tuple[str, ...], float]] = {}
    for r in cell_rows(rows):
        anp.setdefault((r["label"], int(r["k"])), {})[tuple(r["subset"])] = 100 * r["anp"]
    return anp


def _paired(cells: dict, other: dict) -> tuple[str, str, str, int]:
    """Mean ANP difference on the subsets both have, its normal 95% interval, wins / ties /
    losses, and how many subsets were paired (formatted; "-" where there are none)."""
    from divmerge_cli.sweep import stats

    d = [cells[s] - other[s] for s in cells if s in other]
    if not d:
        return "-", "-", "-", 0
    st = stats(d)
    ci = "-" if st.ci95 is None else f"{st.mean - st.ci95:+.2f} .. {st.mean + st.ci95:+.2f}"
    signs = [(x > 1e-9) - (x < -1e-9) for x in d]  # float noise counts as a tie
    wtl = f"{signs.count(1)} / {signs.count(0)} / {signs.count(-1)}"
    return f"{st.mean:+.2f}", ci, wtl, st.n


def paired_table(rows: list[dict], baseline: str) -> str:
    """Each method against `baseline` on the same subsets: mean difference of ANP (points) with a
    normal 95% interval, and wins / ties / losses. Pairing removes the subsets' own spread."""
    anp = _anp_by_cell(rows)
    out = [f"**Against {baseline} on the same subsets: ANP difference (points)**", ""]
    out += ["| method | k | subsets | mean Δ | 95% interval | wins / ties / losses |"]
    out += ["|---|---|---|---|---|---|"]
    for (label, k), cells in anp.items():
        mean, ci, wtl, n = _paired(cells, anp.get((baseline, k), {}))
        if label == baseline or not n:
            continue
        out.append(f"| {label} | {k} | {n} | {mean} | {ci} | {wtl} |")
    return "\n".join(out) + "\n"


def counterpart(label: str) -> str | None:
    """The DivMerge label a Remark 3 label is compared with: the same label without its base
    method (divmerge_dare_ties_js_layer_e4 -> divmerge_js_layer_e4); None for other labels."""
    for base in ("_dare_ties_", "_dare_linear_", "_ties_"):
        if label.startswith("divmerge" + base):
            return "divmerge_" + label.removeprefix("divmerge" + base)
    return None


def remark3_table(rows: list[dict], which: str = "") -> str:
    """Each Remark 3 method against DivMerge on plain task vectors (same divergence, granularity
    and steps) and against data-free TIES, on the same subsets: mean ANP difference (points) with
    its normal 95% interval and wins / ties / losses against DivMerge. `which` names the subsets
    in the title."""
    anp = _anp_by_cell(rows)
    out = [
        "**Remark 3: DivMerge on processed task vectors against DivMerge on plain ones and against"
        f" TIES, on the same subsets{which}; ANP difference in points**",
        "",
        "| method | k | subsets | mean ANP | vs | Δ | 95% interval | wins / ties / losses"
        " | Δ vs TIES | 95% interval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, k), cells in sorted(anp.items(), key=lambda x: (x[0][1], x[0][0])):
        other = counterpart(label)
        if other is None:
            continue
        mean, ci, wtl, _ = _paired(cells, anp.get((other, k), {}))
        t_mean, t_ci, _, _ = _paired(cells, anp.get(("ties", k), {}))
        avg = statistics.fmean(cells.values())
        out.append(
            f"| {label} | {k} | {len(cells)} | {avg:.2f} | {other} | {mean} | {ci} | {wtl}"
            f" | {t_mean} | {t_ci} |"
        )
    return "\n".join(out) + "\n"


def remark3_by_k(rows: list[dict]) -> str:
    """Mean ANP by k for TIES, each Remark 3 method and its DivMerge counterpart (the subsets each
    mean covers in brackets): the summary table of docs/RESULTS.md's Remark 3 section."""
    from divmerge_cli.sweep import summarize

    by_label = summarize(rows)
    remark3 = [lb for lb in by_label if counterpart(lb)]
    labels = ["ties", *dict.fromkeys(x for lb in remark3 for x in (counterpart(lb), lb))]
    out = [
        "**Remark 3 by number of merged tasks: mean ANP (%) (subsets)**",
        "",
        "| method | k=2 | k=3 | k=4 | k=5 |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        by_k = by_label.get(label, {})
        row = [f"{by_k[k].mean:.2f} ({by_k[k].n})" if k in by_k else "-" for k in (2, 3, 4, 5)]
        out.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def stability_table(pairs: list[dict], triples: list[dict]) -> str:
    """Mean ANP ± the half-width of its 95% interval over every pair (k = 2) and every 3-subset
    (k = 3) of the zoo's tasks, beside the paper's Table 4 half-widths (generation tasks)."""
    from divmerge_cli.sweep import summarize

    two = {lb: by_k[2] for lb, by_k in summarize(pairs).items() if 2 in by_k}
    three = {lb: by_k[3] for lb, by_k in summarize(triples).items() if 3 in by_k}

    def cell(s) -> str:
        if s is None:
            return "-"
        return f"{s.mean:.2f}" + ("" if s.ci95 is None else f" ± {s.ci95:.2f}") + f" ({s.n})"

    out = [
        "**Stability across subsets: mean ANP (%) ± 95% half-width (subsets), beside the paper's"
        " Table 4 half-widths**",
        "",
        "| method | k=2, every pair | k=3, every 3-subset | paper ± k=2 | paper ± k=3 |",
        "|---|---|---|---|---|",
    ]
    for label in [*three, *(lb for lb in two if lb not in three)]:
        paper = PAPER_TABLE4.get(label, (None, None))
        row = [cell(two.get(label)), cell(three.get(label)), _f(paper[0]), _f(paper[1])]
        out.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def timing_table(rows: list[dict]) -> str:
    """Mean wall seconds per cell (merge or optimize + merge, then scoring) by method and k."""
    from divmerge_cli.sweep import cell_rows

    by: dict[str, dict[int, list[float]]] = {}
    for r in cell_rows(rows):
        by.setdefault(r["label"], {}).setdefault(int(r["k"]), []).append(r["seconds"])
    ks = sorted({k for d in by.values() for k in d})
    out = ["**Wall time per cell (s, mean over subsets; 1 torch thread)**", ""]
    out.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
    out.append("|---|" + "---|" * len(ks))
    for label, d in by.items():
        vals = [f"{statistics.fmean(d[k]):.0f}" if k in d else "-" for k in ks]
        out.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


# Issue 27 (svd2025_*.jsonl): the data-free methods DivMerge's variants are compared with, the
# variants, and each `epochs: auto` label with the fixed-epoch label it is paired with.
SVD_DATA_FREE = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi")
SVD_LEARNED = ("divmerge_js_layer", "divmerge_ties_js_layer", "divmerge_tsv_js_layer")
SVD_AUTO = {f"{m}_auto": m for m in SVD_LEARNED}


def svd2025_tables(rows: list[dict]) -> str:
    """Mean ANP per method and k over the subsets run so far; each DivMerge variant against the
    best data-free method of that k on the same subsets; `epochs: auto` against one epoch; what
    each method cost (merge seconds, peak memory, epochs run)."""
    from divmerge_cli.sweep import cell_rows, summarize

    summary = summarize(rows)
    anp = _anp_by_cell(rows)
    ks = sorted({k for by_k in summary.values() for k in by_k})
    out = ["**Mean ANP (%) ± 95 % interval over the subsets run (n)**", ""]
    out += ["| method | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label, by_k in summary.items():
        cells = []
        for k in ks:
            st = by_k.get(k)
            ci = "" if st is None or st.ci95 is None else f" ± {st.ci95:.1f}"
            cells.append("-" if st is None else f"{st.mean:.1f}{ci} ({st.n})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "**DivMerge against the best data-free method of each k (of those run on the most "
            "subsets so far), on the same subsets (ANP points)**", ""]  # fmt: skip
    out += ["| k | best data-free (mean ANP) | DivMerge variant | subsets | mean Δ | 95% interval "
            "| wins / ties / losses |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for k in ks:
        free = [m for m in SVD_DATA_FREE if k in summary.get(m, {})]
        if not free:
            continue
        # among the methods run on the most subsets: a mean over a few would pick a lucky one
        most = max(summary[m][k].n for m in free)
        best = max((m for m in free if summary[m][k].n == most), key=lambda m: summary[m][k].mean)
        for label in (*SVD_LEARNED, *SVD_AUTO):
            mean, ci, wtl, n = _paired(anp.get((label, k), {}), anp[(best, k)])
            if n:
                head = f"| {k} | {best} ({summary[best][k].mean:.1f}) | {label} | {n} |"
                out.append(f"{head} {mean} | {ci} | {wtl} |")
    out += [
        "",
        "**`epochs: auto` against one epoch (8 Adam steps), same subsets (ANP points)**",
        "",
    ]
    out += ["| variant | k | subsets | mean Δ | 95% interval | wins / ties / losses |"]
    out += ["|---|---|---|---|---|---|"]
    for auto, fixed in SVD_AUTO.items():
        for k in ks:
            mean, ci, wtl, n = _paired(anp.get((auto, k), {}), anp.get((fixed, k), {}))
            if n:
                out.append(f"| {auto} - {fixed} | {k} | {n} | {mean} | {ci} | {wtl} |")
    out += ["", "**Cost per cell (1 torch thread, another lane beside it): merge seconds "
            "(learned: teacher targets on first use, learning, writing), peak memory of the merge "
            "(RSS, MB), Adam steps and the epoch written**", ""]  # fmt: skip
    out += ["| method | k | cells | merge s (median) | merge CPU s (median) | whole cell s (median) | "
            "peak RSS MB (max) | steps (mean) | epoch written |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by: dict[tuple[str, int], list[dict]] = {}
    for r in cell_rows(rows):
        if "merge_seconds" in r:  # cells reused from earlier sweeps did not record it
            by.setdefault((r["label"], int(r["k"])), []).append(r)
    for (label, k), rs in sorted(by.items(), key=lambda x: (x[0][1], x[0][0])):
        # medians: a cell that ran while the sweeps were stopped for a benchmark counts the pause
        merge = statistics.median(r["merge_seconds"] for r in rs)
        # CPU seconds (cells since 2026-12-07): one torch thread, so about the merge's own time
        # without the other lane's contention or a pause
        cpus = [r["merge_cpu_seconds"] for r in rs if "merge_cpu_seconds" in r]
        cpu = f"{statistics.median(cpus):.0f} ({len(cpus)})" if cpus else "-"
        whole = statistics.median(r["seconds"] for r in rs)
        peak = max((r.get("merge_peak_rss_mb", 0) for r in rs), default=0) or "-"
        steps = [r["steps"] for r in rs if "steps" in r]
        mean_steps = f"{statistics.fmean(steps):.0f}" if steps else "-"
        chosen = [str(r["epochs"]["epoch"]) for r in rs if "epochs" in r]
        out.append(
            f"| {label} | {k} | {len(rs)} | {merge:.0f} | {cpu} | {whole:.0f} | {peak} | {mean_steps} | "
            f"{', '.join(chosen) or '-'} |"
        )
    return "\n".join(out) + "\n"


def experts_table(scores: dict) -> tuple[str, str]:
    """Base (raw prompt, and chat template when scored) vs expert on each task's test rows."""
    md = [
        "| task | metric | n | base | base, chat template | expert |",
        "|---|---|---|---|---|---|",
    ]
    csv = ["task,metric,n,base,base_chat,expert"]
    for t, e in scores.items():
        chat = e.get("base_chat")
        md.append(
            f"| {t} | {e['metric']} | {e['n']} | {e['base']:.4f} | {_f(chat, 4)} | {e['expert']:.4f} |"
        )
        csv.append(
            f"{t},{e['metric']},{e['n']},{e['base']},{'' if chat is None else chat},{e['expert']}"
        )
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def placeholder(text: str, zoo: str) -> str:
    """`text` with the zoo's absolute path written as $ZOO (the commands in RESULTS.md set it)."""
    return re.sub(re.escape(zoo) + r"(?![\w.-])", "$ZOO", text)


def copy_results(files: list[Path], out: Path, zoo: Path) -> list[Path]:
    """The results files copied into `out`, the zoo's folder written $ZOO (committed results name
    no one machine's folder); returns the copies."""
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        (out / f.name).write_text(placeholder(f.read_text(), str(zoo.resolve())))
    return [out / f.name for f in files]


def zoo_hashes(zoo: Path) -> dict[str, str]:
    import hashlib

    from divmerge_cli.hashing import hash_model_dir

    out = {
        "data/manifest.json": hashlib.sha256((zoo / "data/manifest.json").read_bytes()).hexdigest()
    }
    dirs = {"base": zoo / "base"}
    dirs |= {f"experts/{d.name}": d for d in sorted((zoo / "experts").iterdir())}
    for kind in ADAPTER_ZOOS:
        if (zoo / kind).is_dir():  # finished adapters only
            lora = sorted((zoo / kind).iterdir())
            dirs |= {f"{kind}/{d.name}": d for d in lora if (d / "expert.json").is_file()}
    for key, d in dirs.items():
        if not d.name.startswith("."):
            out[key] = hash_model_dir(d)
            out[f"weights:{key}"] = hash_weights(d)
    return out


def hash_weights(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the same for the same
    weights whatever transformers wrote beside them or in the safetensors header."""
    import hashlib

    import torch
    from safetensors import safe_open

    files = {}  # tensor name -> the open file holding it
    for f in sorted(model_dir.glob("*.safetensors")):
        st = safe_open(str(f), "pt")
        files |= dict.fromkeys(st.keys(), st)
    h = hashlib.sha256()
    for name in sorted(files):
        t = files[name].get_tensor(name).contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ORDER = ["pairwise_datafree", "pairwise_divmerge_js", "pairwise_adamerging", "pairwise_divmerge_kl"]
ORDER += ["lora_pairwise_datafree", "lora_pairwise_divmerge", "lora_pairwise_divmerge-peft"]
ORDER += ["lora_pairwise_adamerging"]
LORA = "lora_"
STABILITY = "stability_"  # every subset of one k: kept out of the seeded per-k tables
SVD2025 = "svd2025_"  # issue 27's sweeps: their own report (--svd2025), on a later zoo build
SVD2025_LORA = "svd2025_lora_"  # the same on the LoRA zoo (ZOO_DIR/lora/)
SVD2025_DISTINCT = "svd2025_lora_distinct_"  # adapters with a lora_A init per task (lora_distinct/)
# the adapter zoos, each reported apart: folder under ZOO_DIR -> (its field in scores.json, its
# column in the experts' table, its section title)
ADAPTER_ZOOS = {
    "lora": ("lora_expert", "LoRA expert", "LoRA adapters (rank 16)"),
    "lora_distinct": (
        "lora_distinct_expert", "LoRA expert, distinct A init",
        "LoRA adapters (rank 16), a distinct lora_A init per task",
    ),
}  # fmt: skip


def adapter_zoo(results_name: str) -> str | None:
    """The adapter zoo a results file ran on (a key of ADAPTER_ZOOS), None for the full one."""
    if results_name.startswith(SVD2025_DISTINCT):
        return "lora_distinct"
    return "lora" if results_name.startswith((LORA, SVD2025_LORA)) else None


def lora_table(lora: list[dict], full: list[dict]) -> str:
    """Mean ANP (%) of each method on the adapters (pairs: ± 95% half-width; k = 5) beside the
    same method on the full fine-tunes."""
    from divmerge_cli.sweep import summarize

    ours, theirs = summarize(lora), summarize(full)

    def cell(by_k: dict, k: int) -> str:
        s = by_k.get(k)
        if s is None:
            return "-"
        return f"{s.mean:.2f}" + (f" ± {s.ci95:.2f}" if s.ci95 is not None else "")

    out = [
        "**Mean ANP (%): LoRA experts beside full fine-tunes (pairs: mean ± 95% half-width over"
        " the 10 pairs)**",
        "",
        "| method | LoRA, pairs | LoRA, k=5 | full FT, pairs | full FT, k=5 |",
        "|---|---|---|---|---|",
    ]
    for label, by_k in ours.items():
        other = theirs.get(label, {})
        row = [cell(by_k, 2), cell(by_k, 5), cell(other, 2), cell(other, 5)]
        out.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def csv_expert_scores(experts_csv: Path) -> dict[str, float]:
    """{task: the full expert's score} from an experts.csv (experts_table's), {} when absent."""
    full = {}
    if experts_csv.is_file():
        head, *lines = experts_csv.read_text().splitlines()
        for line in lines:
            rec = dict(zip(head.split(","), line.split(",")))
            full[rec["task"]] = float(rec["expert"])
    return full


def lora_experts_table(scores: dict, full: dict[str, float]) -> str:
    """Base, the LoRA experts of each adapter zoo scored and the full expert (`full`: {task:
    score}) on each task."""
    zoos = [
        (k, head) for k, head, _ in ADAPTER_ZOOS.values() if any(k in e for e in scores.values())
    ]
    out = [
        "**Base and experts on each task's test split (n seeded rows, greedy)**",
        "",
        "| task | metric | n | base | " + " | ".join(h for _, h in zoos) + " | full-FT expert |",
        "|---|---|---|---|" + "---|" * len(zoos) + "---|",
    ]
    for t, e in scores.items():
        if any(k in e for k, _ in zoos):
            row = f"| {t} | {e['metric']} | {e['n']} | {e['base']:.4f} | "
            row += " | ".join(_f(e.get(k), 4) for k, _ in zoos)
            out.append(f"{row} | {_f(full.get(t), 4)} |")
    return "\n".join(out) + "\n"


def lora_report(zoo: Path, out: Path, full_dir: Path) -> list[Path]:
    from divmerge_cli.hashing import hash_model_dir
    from divmerge_cli.sweep import write_reports

    files = _require(_ordered([p for p in (zoo / "results").glob(f"{LORA}*.jsonl")]), zoo)
    rows = collect(copy_results(files, out, zoo))
    full_files = [p for p in full_dir.glob("*.jsonl") if not p.name.startswith(LORA)]
    full = collect(_ordered(full_files))
    written = write_reports(rows, out)
    parts = [lora_table(rows, full)]
    parts += [paired_table(rows, b) for b in ("task_arithmetic", "divmerge_js_layer")]
    parts.append(timing_table(rows))
    scores = zoo / "scores.json"
    if scores.is_file():
        full_scores = csv_expert_scores(full_dir / "experts.csv")  # the committed full build's
        parts.append(lora_experts_table(json.loads(scores.read_text()), full_scores))
    (out / "lora.md").write_text("\n".join(parts))
    adapters = [d for d in sorted((zoo / "lora").iterdir()) if (d / "expert.json").is_file()]
    hashes = {f"lora/{d.name}": hash_model_dir(d) for d in adapters}  # finished adapters only
    (out / "lora_zoo.json").write_text(json.dumps(hashes, indent=2) + "\n")
    return [*written, out / "lora.md", out / "lora_zoo.json"]


def svd2025_report(zoo: Path, out: Path) -> list[Path]:
    """Issue 27's results on their own: the raw svd2025_*.jsonl, svd2025.md, the experts' scores and
    zoo.json (this zoo's hashes: its experts need not be the ones the older results came from)."""
    files = _require(sorted((zoo / "results").glob(f"{SVD2025}*.jsonl")), zoo)
    copied = copy_results(files, out, zoo)
    parts = []
    titles = {None: "Full fine-tunes"} | {kind: z[2] for kind, z in ADAPTER_ZOOS.items()}
    for kind, title in titles.items():
        group = [p for p in copied if adapter_zoo(p.name) == kind]
        if group:  # each zoo's methods are compared among themselves only
            parts += [f"## {title}", "", svd2025_tables(collect(group))]
    (out / "svd2025.md").write_text("\n".join(parts))
    written = [*copied, out / "svd2025.md", out / "zoo.json"]
    scores = zoo / "scores.json"
    if scores.is_file():
        table = json.loads(scores.read_text())
        md, _ = experts_table(table)
        keys = [z[0] for z in ADAPTER_ZOOS.values()]
        if any(k in e for e in table.values() for k in keys):  # the adapters beside the full ones
            full = {t: e["expert"] for t, e in table.items() if "expert" in e}
            md += "\n" + lora_experts_table(table, full)
        (out / "experts.md").write_text(md)
        written.append(out / "experts.md")
    (out / "zoo.json").write_text(json.dumps(zoo_hashes(zoo), indent=2) + "\n")
    return written


def restore(zoo: Path, committed: Path) -> list[str]:
    """Copy the committed results (committed/*.jsonl, the zoo written $ZOO) into zoo/results/ where
    the zoo has none of that name, so sweeps resume on a rebuilt zoo; only if the zoo's weights are
    the ones they were computed with (committed/zoo.json). Results on adapters (lora_*,
    svd2025_lora_*) need that adapter zoo too: without it (not built yet, or other weights) they
    are left out and the rest is copied. Returns the names copied."""
    want = json.loads((committed / "zoo.json").read_text())
    unmatched = set()  # adapter zoos whose weights are missing or differ
    for key, digest in want.items():
        if key.startswith("weights:"):
            folder = zoo / key.removeprefix("weights:")
            got = hash_weights(folder) if folder.is_dir() else "missing"
            if got != digest and folder.parent.name in ADAPTER_ZOOS:
                unmatched.add(folder.parent.name)
            elif got != digest:
                raise SystemExit(
                    f"{folder}: weights differ from {committed / 'zoo.json'} ({key}); the committed "
                    "results are not this zoo's, nothing was copied"
                )
    (zoo / "results").mkdir(exist_ok=True)
    copied = []
    for f in sorted(committed.glob("*.jsonl")):
        target = zoo / "results" / f.name
        if not target.exists() and adapter_zoo(f.name) not in unmatched:
            target.write_text(f.read_text().replace("$ZOO", str(zoo.resolve())))
            copied.append(f.name)
    return copied


def _require(files: list[Path], zoo: Path) -> list[Path]:
    """The results files, or stop: an empty report would overwrite the committed one."""
    if not files:
        raise SystemExit(f"{zoo}/results: no sweep results to report; nothing was written")
    return files


def _ordered(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda p: ((ORDER + [p.stem]).index(p.stem), p.stem))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo_dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lora", action="store_true", help="report the LoRA zoo's results only")
    ap.add_argument("--full", type=Path, default=Path("docs/results"), help="full-FT results")
    ap.add_argument(
        "--restore",
        action="store_true",
        help="copy the committed results (--out) into ZOO_DIR/results/ instead (same weights only)",
    )
    ap.add_argument("--svd2025", action="store_true", help="report issue 27's sweeps only")
    a = ap.parse_args(argv)
    if a.svd2025 and not a.restore:
        written = svd2025_report(a.zoo_dir, a.out or Path("docs/results/svd2025"))
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    if a.restore:
        copied = restore(a.zoo_dir, a.out or Path("docs/results"))
        print(f"copied {len(copied)} results files: " + ", ".join(copied))
        return 0
    from divmerge_cli.sweep import write_reports

    if a.lora:
        written = lora_report(a.zoo_dir, a.out or Path("docs/results/lora"), a.full)
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    a.out = a.out or Path("docs/results")
    found = (a.zoo_dir / "results").glob("*.jsonl")
    mine = [p for p in found if not p.name.startswith((LORA, SVD2025))]
    files = _require(_ordered(mine), a.zoo_dir)
    copy_results(files, a.out, a.zoo_dir)
    rows = collect([a.out / f.name for f in files if not f.name.startswith(STABILITY)])
    stable = collect([a.out / f.name for f in files if f.name.startswith(STABILITY)])
    written = write_reports(rows, a.out)
    (a.out / "remark3.md").write_text(
        "\n".join(
            [
                remark3_by_k(rows),
                remark3_table(rows),
                remark3_table(stable, ": every 3-subset, from the stability sweep"),
                stability_table(rows, stable),
            ]
        )
    )
    written.append(a.out / "remark3.md")
    (a.out / "paper.md").write_text(
        "\n".join(
            [
                paper_tables(rows),
                *(paired_table(rows, b) for b in PAIRED_BASELINES),
                timing_table(rows),
            ]
        )
    )
    scores = a.zoo_dir / "scores.json"
    if scores.is_file():
        md, csv = experts_table(json.loads(scores.read_text()))
        (a.out / "experts.md").write_text(md)
        (a.out / "experts.csv").write_text(csv)
    shutil.copyfile(a.zoo_dir / "data" / "manifest.json", a.out / "data_manifest.json")
    (a.out / "zoo.json").write_text(json.dumps(zoo_hashes(a.zoo_dir), indent=2) + "\n")
    print("wrote " + ", ".join(str(p) for p in [*written, a.out / "paper.md"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
