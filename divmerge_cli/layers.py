"""Where a tensor sits in the model, from its name alone: its transformer block, the paper's
layer-level group, its position in the stack. Shared by data-free merges (gradient parameters)
and the learned merges (one Gamma per group)."""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|h|block|blocks))\.(\d+)\.")
_EMBED = re.compile(r"embed|wte|wpe|shared|word_embeddings|position_embeddings")


def block_of(name: str) -> tuple[str, int] | None:
    """('model.layers', 3) for a tensor inside transformer block 3, None outside any block."""
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def is_embedding(name: str) -> bool:
    """A token or position embedding (its first axis is the vocabulary or the positions)."""
    return bool(_EMBED.search(name))


def group_of(name: str) -> str:
    """The paper's layer-level group: one per transformer block, plus 'embeddings' and 'head'."""
    b = block_of(name)
    if b:
        return f"{b[0]}.{b[1]}"
    return "embeddings" if is_embedding(name) else "head"


def block_counts(names: list[str]) -> dict[str, int]:
    """Blocks per stack: {'model.layers': 2}; encoder and decoder stacks count separately."""
    counts: dict[str, int] = {}
    for n in names:
        b = block_of(n)
        if b:
            counts[b[0]] = max(counts.get(b[0], 0), b[1] + 1)
    return counts


def layer_position(name: str, counts: dict[str, int]) -> float:
    """Where a tensor sits in its stack of blocks, in [0, 1], for gradient (list) parameters:
    block i of N -> i / (N - 1) (1 when N = 1); tensors outside blocks (embeddings, final norm,
    head) -> 0, as mergekit 0.1.5 plans them. Encoder and decoder stacks count separately."""
    b = block_of(name)
    if not b:
        return 0.0
    n = counts[b[0]]
    return b[1] / (n - 1) if n > 1 else 1.0
