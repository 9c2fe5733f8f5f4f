"""A word-level tokenizer and a tiny transformer text encoder for the toy backbone.

The shapes world has a closed vocabulary, so a word tokenizer is exact and every
word maps to one token; that makes "which token is the word *circle*" trivial, which
the feature capture needs to read per-word cross-attention maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from datasetdm.config import COLOURS, SHAPES
from datasetdm.errors import DatasetDMError
from datasetdm.worlds.shapes import NUMBER_WORDS, PLURAL

SPECIAL = ("<pad>", "<bos>")


def default_vocab() -> list[str]:
    words = list(SPECIAL) + ["and"] + list(NUMBER_WORDS) + list(COLOURS) + list(SHAPES) + list(PLURAL.values())
    return list(dict.fromkeys(words))


class WordTokenizer:
    """Maps a caption to ``<bos> w1 w2 ... <pad>...`` ids of fixed length."""

    def __init__(self, vocab: list[str], max_length: int = 16) -> None:
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_length = max_length

    def words(self, prompt: str) -> list[str]:
        return prompt.lower().replace(",", " ").split()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = self.words(prompt)
            if len(words) > self.max_length - 1:
                raise DatasetDMError(None, "prompt", f"{prompt!r} has {len(words)} words, the toy text encoder takes at most {self.max_length - 1}")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise DatasetDMError(None, "prompt", f"unknown word {unknown[0]!r} in {prompt!r} (the toy backbone knows: {', '.join(self.vocab[2:])})")
            ids[row, 0] = self.index["<bos>"]
            for j, w in enumerate(words):
                ids[row, j + 1] = self.index[w]
        return ids

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Positions of ``word`` in the tokenised prompt (one token per word here)."""
        return [j + 1 for j, w in enumerate(self.words(prompt)) if w == word]


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 16


class TextEncoder(nn.Module):
    """Token + position embeddings and a pre-norm transformer: (B, L) ids -> (B, L, dim)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.dim)
        self.positions = nn.Parameter(torch.zeros(config.max_length, config.dim))
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.positions, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        return self.norm(self.encoder(x))

    def config_dict(self) -> dict:
        return asdict(self.config)
