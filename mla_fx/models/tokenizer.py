"""Byte-level tokenizer: token id = UTF-8 byte value (vocab 256). No special tokens."""

from __future__ import annotations

from collections.abc import Iterable

VOCAB_SIZE = 256


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
