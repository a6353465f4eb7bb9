"""Tokenizers for SFT data: a built-in byte-level one (demo, tests) and a local Hugging Face one.

Both expose the same small surface the data pipeline needs: `encode(text) -> list[int]`,
`decode(ids) -> str`, `bos_id`, `eos_id`, `pad_id` and `vocab_size` (the real, unpadded size;
Megatron pads it for tensor parallelism, the loss must never sample the padded ids).
"""

from __future__ import annotations

import os
from typing import Protocol


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus PAD=256, BOS=257, EOS=258: no files, no vocabulary to ship."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:  # stable repr: `datasets` fingerprints map functions by it
        return "ByteTokenizer()"


# the files a Hugging Face tokenizer directory is loaded from (any one suffices)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def tokenizer_dir_problem(path: str) -> str | None:
    """None if `path` looks like a local tokenizer directory, else what is wrong with it; checked
    before `transformers` is imported, so an empty directory is named as such and never reported
    as a missing package or a hub lookup."""
    if not os.path.isdir(path):
        return f"{path!r} is not a directory; expected 'byte' or a local Hugging Face tokenizer directory"
    try:
        names = set(os.listdir(path))
    except OSError as e:
        return f"{path!r} cannot be listed ({type(e).__name__}: {e.strerror or e})"
    if not names & set(TOKENIZER_FILES):
        held = f"it holds {len(names)} other file{'s' if len(names) != 1 else ''}" if names else "it is empty"
        return (f"{path!r} holds no tokenizer file ({held}); expected one of {', '.join(TOKENIZER_FILES)} "
                "(e.g. from tokenizer.save_pretrained(dir))")
    return None


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (never the hub).

    `transformers` is imported here, lazily, so the byte-level demo does not need it. A tokenizer
    without a pad token uses its EOS id for padding (padded positions are masked out anyway).
    """

    def __init__(self, path: str):
        problem = tokenizer_dir_problem(path)
        if problem:
            raise FileNotFoundError(f"tokenizer {problem}; hub names are not fetched")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"tokenizer path {path!r} needs the `transformers` package; install it or use "
                "data.tokenizer=byte"
            ) from e
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has no EOS token; SFT responses must end with one")
        self.eos_id = int(self._tok.eos_token_id)
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self.pad_id = int(self._tok.pad_token_id) if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size = int(len(self._tok))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def build_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; anything else is a local Hugging Face tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
