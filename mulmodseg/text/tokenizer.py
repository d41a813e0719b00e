"""CLIP's byte-level BPE tokenizer, reading the bundled ``bpe_simple_vocab_16e6.txt.gz``.

The ids are those of OpenAI's CLIP tokenizer: 256 byte symbols, the same 256 with the word-end marker
``</w>``, 48,894 merges, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407); 49,408 in all.
Text is cleaned as CLIP cleans it (ftfy, HTML unescaping twice, whitespace collapsed, lower case), split
by a regular expression into words, contractions, single digits and symbol runs, and each piece is
UTF-8 encoded, mapped to printable characters and merged by BPE.

The vocabulary file is OpenAI's, MIT licensed (see ``LICENSE-CLIP`` next to it).
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
NUM_MERGES = 48894  # CLIP uses only the first 49152 - 256 - 2 merges of the file
CONTEXT_LENGTH = 77
WORD_END = "</w>"

# Pieces, in priority order: special tokens typed into the text, English contractions, letter runs,
# one digit at a time (so numbers never merge), runs of anything else that is not whitespace.
_PIECE_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"
    r"|'(?:s|t|re|ve|m|ll|d)"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value to a printable character, so that BPE never sees whitespace or controls.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256), chr(257), ... in
    ascending byte order. The dict's insertion order (printable bytes first) is the order of the first
    256 vocabulary entries.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text cleaning: ftfy, HTML unescape twice (for doubly escaped entities), collapse
    whitespace, lower case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


class Tokenizer:
    """CLIP BPE tokenizer. The vocabulary is read on first use, once per instance."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH) -> None:
        self.vocab_path = Path(vocab_path)
        self._cache: dict[str, tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}

    @functools.cached_property
    def merges(self) -> list[tuple[str, str]]:
        """The 48,894 merges in rank order, as pairs of symbols."""
        with gzip.open(self.vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is the "#version" header
        pairs = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
            raise ValueError(f"{self.vocab_path} is not a CLIP BPE vocabulary file")
        return pairs  # type: ignore[return-value]

    @functools.cached_property
    def encoder(self) -> dict[str, int]:
        """Symbol -> id, 49,408 entries."""
        byte_symbols = list(bytes_to_unicode().values())
        symbols = byte_symbols + [s + WORD_END for s in byte_symbols]
        symbols += [a + b for a, b in self.merges] + [SOT_TOKEN, EOT_TOKEN]
        return {s: i for i, s in enumerate(symbols)}

    @functools.cached_property
    def _decoder(self) -> dict[int, str]:
        return {i: s for s, i in self.encoder.items()}

    @functools.cached_property
    def _ranks(self) -> dict[tuple[str, str], int]:
        return {pair: rank for rank, pair in enumerate(self.merges)}

    @functools.cached_property
    def _byte_encoder(self) -> dict[int, str]:
        return bytes_to_unicode()

    @functools.cached_property
    def _byte_decoder(self) -> dict[str, int]:
        return {c: b for b, c in bytes_to_unicode().items()}

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Merge the byte symbols of one piece, lowest rank first, until no known pair is left."""
        if piece in self._cache:
            return self._cache[piece]
        ranks = self._ranks
        word = [*piece[:-1], piece[-1] + WORD_END]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[piece] = tuple(word)
        return self._cache[piece]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without the start and end tokens."""
        byte_encoder, encoder = self._byte_encoder, self.encoder
        ids: list[int] = []
        for piece in _PIECE_PATTERN.findall(clean_text(text)):
            if piece not in (SOT_TOKEN, EOT_TOKEN):
                piece = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(encoder[symbol] for symbol in self._bpe(piece))
        return ids

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """Token ids `(N, context_length)` int64: SOT, ids, EOT, then zeros.

        Text longer than `context_length` (counting SOT and EOT) raises ValueError unless `truncate`,
        which keeps the first `context_length` ids and makes the last one EOT, as CLIP does.
        `context_length` must be at least 2, room for SOT and EOT.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT_ID, *self.encode(text), EOT_ID]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {row} ({text[:40]!r}...) is {len(ids)} tokens long with start and end tokens, "
                        f"more than context_length={context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[:context_length]
                ids[-1] = EOT_ID
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str | list[str]:
        """Text of one id sequence, or a list of texts for a 2-D tensor `(N, L)`.

        A row that starts with SOT is read up to its first EOT (what follows is padding), without the
        two special tokens. Word ends become spaces, so ``tokenize(decode(ids))`` gives `ids` back;
        the text itself is the cleaned, lower-cased one with spaces around punctuation.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                return [self.decode(row) for row in ids]  # type: ignore[misc]
            ids = ids.tolist()
        ids = list(ids)
        if ids and ids[0] == SOT_ID:
            ids = ids[1 : ids.index(EOT_ID)] if EOT_ID in ids else ids[1:]
        data = bytearray()
        for i in ids:
            symbol = self._decoder[int(i)]
            if symbol in (SOT_TOKEN, EOT_TOKEN):
                data += symbol.encode("utf-8") + b" "
                continue
            word_end = symbol.endswith(WORD_END)
            data += bytes(self._byte_decoder[c] for c in (symbol[: -len(WORD_END)] if word_end else symbol))
            if word_end:
                data += b" "
        return data.decode("utf-8", errors="replace").rstrip(" ")


@functools.cache
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer on the bundled vocabulary (built on first call)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
    """Token ids `(N, context_length)` int64 with the bundled vocabulary; see `Tokenizer.tokenize`."""
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def decode(ids: Sequence[int] | torch.Tensor) -> str | list[str]:
    """Text of token ids with the bundled vocabulary; see `Tokenizer.decode`."""
    return default_tokenizer().decode(ids)
