"""The output vocabulary (`tokenizer_source`, mergekit's `tokenizer:` block, `chat_template`) and
each input's embedding and head rows rebuilt for it, as mergekit 0.1.5 does.

The output tokenizer is the base's (`base`), a model's, or the union (`union`): the base's, plus
every other model's tokens it lacks, in recipe order, plus their added tokens; `tokenizer.tokens`
adds the tokens it names. Each input's vocabulary tensors (token embeddings, LM head: outside the
blocks, first axis as long as the model's vocabulary) are then re-indexed by token string. A row an
input lacks (or that `force` replaces) is filled, per tensor, from the models read for it:
- a `tokenizer.tokens` source: zero, a model's row for that token, or a model's row by id/token;
- otherwise, with no model having it: zero; with exactly one: that model's row; with the base
  among them and having it: the base's row; else the mean of the rows of the models that have it.
Rows past the vocabulary (`pad_to_multiple_of`) take the mean of that input's rebuilt rows.
The method then merges the rebuilt tensors like any others.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import TOKENIZER_FILES, Checkpoint
from .errors import UserError
from .layers import block_of
from .lora import home
from .recipe import ModelToken, Recipe, TokenSetting, ZeroToken

Fill = list[tuple[Checkpoint, int]]  # rows averaged into one filled row ([]: a zero row)


@dataclass
class Vocabulary:
    tokenizer: Any  # the output tokenizer (transformers), saved with the output
    tokens: dict[str, int]  # output token -> id
    size: int  # rows of a rebuilt tensor (the vocabulary, padded)
    perms: dict[Checkpoint, np.ndarray]  # output id -> that model's row, -1 where it lacks it
    own: dict[Checkpoint, dict[str, int]]  # each model's own vocabulary
    settings: dict[str, tuple[TokenSetting, Checkpoint | None]]  # tokenizer.tokens, resolved
    added: bool  # the output tokenizer differs from the folder it was read from
    names: list[str] = field(default_factory=list)  # id -> token

    @property
    def identity(self) -> bool:
        """Every input's rows already are the output's: nothing to rebuild."""
        n = len(self.tokens)
        return (
            self.size == n
            and not any(s.force for s, _ in self.settings.values())
            and all(rows_of(c) == n and (p == np.arange(n)).all() for c, p in self.perms.items())
        )


def rows_of(c: Checkpoint) -> int | None:
    """The model's vocabulary size (its config's), as mergekit reads it."""
    cfg = c.config
    v = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return v if isinstance(v, int) and v > 0 else None


def is_vocab_tensor(c: Checkpoint, name: str) -> bool:
    """A token-indexed tensor: outside the blocks, first axis the vocabulary (a 1-D one only when
    it is a bias, so a norm as wide as the vocabulary is not taken for one)."""
    shape = c.shape(name)
    return (
        block_of(name) is None
        and bool(shape)
        and shape[0] == rows_of(c)
        and (len(shape) >= 2 or name.endswith("bias"))
    )


def tokenizer_folder(c: Checkpoint) -> Path | None:
    for folder in (c.path, home(c).path):
        if any((folder / n).is_file() for n in TOKENIZER_FILES):
            return folder
    return None


def load_tokenizer(folder: Path, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - any failure to read a tokenizer is the folder's
        raise UserError(
            f"{where}: cannot load the tokenizer in {folder} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def build_vocabulary(r: Recipe, base: Checkpoint, models: list[Checkpoint], ckpt_of) -> Vocabulary:
    """The output tokenizer and each model's re-indexing. `base` is the recipe's base model (or
    its first model); `models` every checkpoint the recipe reads, in recipe order; `ckpt_of`
    opens a model reference of the recipe. UserError: a tokenizer that cannot be read, a token
    setting naming a model or token that does not exist."""
    source = r.tokenizer.source if r.tokenizer else r.tokenizer_source
    where = "tokenizer.source" if r.tokenizer else "tokenizer_source"
    toks: dict[Checkpoint, Any] = {}
    base_folder = tokenizer_folder(base)
    if base_folder is None:
        raise UserError(
            f"{r.source}: {base.where}: {base.path} holds no tokenizer files; the output "
            "vocabulary starts from the base model's tokenizer"
        )
    for c in dict.fromkeys([base, *models]):
        folder = tokenizer_folder(c)
        toks[c] = (
            load_tokenizer(folder, c.where) if folder else None
        )  # None: the base's, as mergekit
    _check_within(base, toks[base], r)
    if source == "union":
        out = _union(base, toks, base_folder)
    elif source == "base":
        out = load_tokenizer(base_folder, base.where)
    else:
        folder = Path(r.resolve_path(source))
        out = load_tokenizer(folder, where) if folder.is_dir() else None
        if out is None:
            raise UserError(
                f"{r.source}: {where}: {source} is not `union`, `base` or a model folder"
            )
    n_before = len(out.get_vocab())
    settings = _settings(r, ckpt_of)
    for tok in settings:
        if tok not in out.get_vocab():
            out.add_tokens(tok)
    tokens = out.get_vocab()
    pad = r.tokenizer.pad_to_multiple_of if r.tokenizer else None
    size = -(-len(tokens) // pad) * pad if pad else len(tokens)
    names = [""] * len(tokens)
    for tok, i in tokens.items():
        names[i] = tok
    own = {c: (t or toks[base]).get_vocab() for c, t in toks.items()}
    perms = {}
    for c in toks:
        rows = rows_of(c) or len(own[c])
        ids = [own[c].get(tok, -1) for tok in names]
        perms[c] = np.array([i if i < rows else -1 for i in ids], dtype=np.int64)
    vocab = Vocabulary(
        out, tokens, size, perms, own, settings, source == "union" or len(tokens) > n_before
    )
    vocab.names = names
    for tok, (s, c) in settings.items():
        _check_setting(vocab, tok, s, c, r)
    return vocab


def _check_within(base: Checkpoint, tok, r: Recipe) -> None:
    rows = rows_of(base)
    if tok is not None and rows and len(tok.get_vocab()) > rows:
        raise UserError(
            f"{r.source}: {base.where}: the tokenizer in {base.path} has "
            f"{len(tok.get_vocab())} tokens but the model's vocabulary has {rows} rows; "
            "divmerge does not strip the tokens without a row (mergekit does): start the output "
            "vocabulary from a tokenizer that fits its model"
        )


def _union(base: Checkpoint, toks: dict, base_folder: Path):
    """The base's tokenizer plus the tokens, then the added tokens, of the others it lacks."""
    order: dict[str, None] = {}
    added: dict[str, Any] = {}
    for c, tok in toks.items():
        if tok is None:
            continue
        rows = rows_of(c) or len(tok.get_vocab())
        for t, i in tok.get_vocab().items():
            if i < rows:
                order.setdefault(t)
        for i, info in tok.added_tokens_decoder.items():
            if i < rows:
                added.setdefault(info.content, info)
    out = load_tokenizer(base_folder, base.where)
    have = out.get_vocab()
    for t in order:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def _settings(r: Recipe, ckpt_of) -> dict[str, tuple[TokenSetting, Checkpoint | None]]:
    """tokenizer.tokens with the model each names opened."""
    out = {}
    for tok, s in ((r.tokenizer.tokens or {}) if r.tokenizer else {}).items():
        src = s.source
        ref = src.model if isinstance(src, ModelToken) else src if isinstance(src, str) else None
        out[tok] = (s, ckpt_of(ref, f"tokenizer.tokens[{tok!r}].source") if ref else None)
    return out


def _check_setting(v: Vocabulary, tok: str, s: TokenSetting, c: Checkpoint | None, r) -> None:
    where = f"{r.source}: tokenizer.tokens[{tok!r}].source"
    src = s.source
    if isinstance(src, ModelToken):
        rows = rows_of(c) or len(v.own[c])
        if src.token is not None and src.token not in v.own[c]:
            raise UserError(f"{where}: {src.model} has no token {src.token!r}")
        if src.token_id is not None and src.token_id >= rows:
            raise UserError(f"{where}: token_id {src.token_id} is past {src.model}'s {rows} rows")
    elif isinstance(src, str) and v.perms[c][v.tokens[tok]] < 0:
        raise UserError(
            f"{where}: {src} has no token {tok!r}; name a model that has it, or a "
            "{kind: model_token, model, token} to copy another token's row"
        )


def fills(v: Vocabulary, members: tuple[Checkpoint, ...], base: Checkpoint | None) -> dict:
    """Output id -> the rows (model, row) averaged into it, for every id some member lacks or
    a `force` setting replaces, given the models read for one tensor (mergekit's rule, see the
    module docstring). UserError: a setting's model is not read for this tensor."""
    P = np.stack([v.perms[c] for c in members])
    present = P >= 0
    need = ~present.all(0)
    for tok, (s, _) in v.settings.items():
        if s.force:
            need[v.tokens[tok]] = True
    out: dict[int, Fill] = {}
    base_j = members.index(base) if base in members else None
    for i in np.flatnonzero(need).tolist():
        s, c = v.settings.get(v.names[i], (None, None))
        if s is not None and s.source is not None:
            out[i] = _explicit(v, s, c, members, i)
            continue
        have = np.flatnonzero(present[:, i]).tolist()  # none: zero; one: its row
        if len(have) > 1 and base_j is not None and present[base_j, i]:
            have = [base_j]  # else the mean of those that have it
        out[i] = [(members[j], int(P[j, i])) for j in have]
    return out


def _explicit(v: Vocabulary, s: TokenSetting, c, members, i: int) -> Fill:
    src = s.source
    if isinstance(src, ZeroToken):
        return []
    if c not in members:
        raise UserError(
            f"tokenizer.tokens[{v.names[i]!r}].source: {c.path} is not merged into the "
            "vocabulary tensors (name one of the models they are merged from)"
        )
    if isinstance(src, ModelToken):
        return [(c, src.token_id if src.token_id is not None else v.own[c][src.token])]
    return [(c, int(v.perms[c][i]))]


def read_rows(c: Checkpoint, name: str, rows: np.ndarray) -> torch.Tensor:
    """Rows `rows` of a stored tensor, read as runs of consecutive rows (one read per run)."""
    if not len(rows):
        return torch.empty((0, *c.shape(name)[1:]), dtype=c.dtype(name))
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    parts = []
    for run in np.split(rows, cuts):
        parts.append(c.get(name, int(run[0]), int(run[-1]) + 1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


class VocabRows:
    """One input's vocabulary tensor rebuilt for the output vocabulary, read by rows as merge.Rows
    reads a stored one: `rows[a:b]`, `whole()`, `shape`, `numel()`."""

    def __init__(self, v: Vocabulary, c: Checkpoint, name: str, filled: dict[int, torch.Tensor]):
        self.ckpt, self.name, self.n = c, name, len(v.tokens)
        self.shape = (v.size, *c.shape(name)[1:])
        self.src = v.perms[c].copy()
        forced = [v.tokens[t] for t, (s, _) in v.settings.items() if s.force]
        self.src[forced] = -1
        self.fill_ids = np.full(v.size, -1, dtype=np.int64)  # -> row of self.fill
        ids = [i for i in sorted(filled) if self.src[i] < 0]
        self.fill_ids[ids] = np.arange(len(ids))
        dtype = c.dtype(name)
        self.fill = (
            torch.stack([filled[i] for i in ids]).to(dtype)
            if ids
            else torch.empty((0, *self.shape[1:]), dtype=dtype)
        )
        self._pad: torch.Tensor | None = None

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def whole(self) -> torch.Tensor:
        return self[0 : self.shape[0]]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b = max(0, rows.start or 0), min(self.shape[0], rows.stop)
        out = torch.zeros((max(0, b - a), *self.shape[1:]), dtype=self.fill.dtype)
        ids = np.arange(a, min(b, self.n))
        src = self.src[ids]
        own = src >= 0
        if own.any():
            out[np.flatnonzero(own)] = read_rows(self.ckpt, self.name, src[own])
        f = self.fill_ids[ids]
        if (f >= 0).any():
            out[np.flatnonzero(f >= 0)] = self.fill[f[f >= 0]]
        if b > self.n:  # padding rows: the mean of this input's rebuilt rows
            out[max(0, self.n - a) :] = self._pad_row()
        return out

    def _pad_row(self) -> torch.Tensor:
        if self._pad is None:
            total = torch.zeros(self.shape[1:], dtype=torch.float32)
            step = max(1, (1 << 20) // max(1, self.numel() // self.shape[0]))
            for a in range(0, self.n, step):
                total += self[a : min(a + step, self.n)].float().sum(0)
            self._pad = (total / self.n).to(self.fill.dtype)
        return self._pad


def filled_rows(fill: dict[int, Fill], name: str) -> dict[int, torch.Tensor]:
    """The filled rows of one tensor: each the mean (float32) of the rows its fill names."""
    reads: dict[Checkpoint, set[int]] = collections.defaultdict(set)
    for rows in fill.values():
        for c, i in rows:
            reads[c].add(i)
    got = {}
    for c, idx in reads.items():
        order = np.array(sorted(idx), dtype=np.int64)
        t = read_rows(c, name, order).float()
        got |= {(c, int(i)): t[k] for k, i in enumerate(order)}
    shape = next(iter(reads)).shape(name)[1:] if reads else None
    out = {}
    for i, rows in fill.items():
        if not rows:
            out[i] = None  # zero, shaped by the caller
            continue
        acc = torch.zeros(shape, dtype=torch.float32)
        for c, j in rows:
            acc = acc + got[(c, j)]
        out[i] = acc / len(rows)
    return out


def readers(v: Vocabulary, route) -> tuple[Any, list[Any]]:
    """VocabRows of a route's base and inputs (merge.tensor_stages reads them as Rows)."""
    members = route.members
    fill = fills(v, members, route.base_ckpt)
    name = route.inputs[0].name
    rows = filled_rows(fill, name)
    shape = route.inputs[0].ckpt.shape(name)[1:]
    rows = {i: (t if t is not None else torch.zeros(shape)) for i, t in rows.items()}

    def one(inp):
        return VocabRows(v, inp.ckpt, inp.name, rows) if inp else None

    return one(route.base), [one(x) for x in route.xs]


def chat_template(r: Recipe, folders: list[Path]) -> str | None:
    """The template `chat_template` asks for: its text, or with `auto` the one most input
    tokenizers share (None: they have none)."""
    t = r.chat_template
    if t != "auto":
        return t
    found = []
    for f in folders:
        tok = load_tokenizer(f, str(f))
        tpl = tok.chat_template
        tpl = tpl.get("default") if isinstance(tpl, dict) else tpl
        if tpl:
            found.append(tpl.strip())
    return collections.Counter(found).most_common(1)[0][0] if found else None


def save_tokenizer(tokenizer, template: str | None, folder: Path) -> None:
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
