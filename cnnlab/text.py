"""User-given names as text that is safe to show and to use: a file or class name may hold bytes
that are not UTF-8 (Python keeps them as lone surrogates, which printing or encoding refuses),
control characters (a newline splits the one error line; an escape sequence drives the terminal)
or direction overrides, and a name made from it may pass the file system's 255-byte limit."""
from __future__ import annotations

import hashlib
import os
import unicodedata

NAME_MAX = 255  # bytes in one file name, on every common file system
_HIDDEN = {"Cc", "Cs", "Zl", "Zp"}  # controls, lone surrogates (undecodable bytes), line/paragraph separators
_BIDI = {"\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def shown(text) -> str:
    """``text`` (a str, a path or bytes) as one printable line: an undecodable byte as ``\\xNN``, a
    control character or direction override as its escape (``\\x1b``, ``\\n``, ``\\u202e``); the rest
    as it is."""
    text = os.fsdecode(text) if isinstance(text, bytes) else os.fspath(text) if hasattr(text, "__fspath__") else str(text)
    if text.isprintable():
        return text
    return "".join(_escape(c) if c in _BIDI or unicodedata.category(c) in _HIDDEN else c for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{code:02x}")
    return f"\\u{code:04x}"


def name_bytes(text: str) -> bytes:
    """How ``text`` (a file name as Python holds it) is stored on disk: undecodable bytes as they were."""
    return os.fsencode(text)


def fit_name(stem: str, suffix: str, limit: int = NAME_MAX) -> str:
    """``stem + suffix`` where it fits in ``limit`` bytes; else ``stem`` cut (never inside a character)
    and a short hash of the whole stem put before ``suffix``, so that two long names cut alike still
    differ."""
    if len(name_bytes(stem + suffix)) <= limit:
        return stem + suffix
    tag = "~" + hashlib.sha256(name_bytes(stem)).hexdigest()[:8]
    room = limit - len(name_bytes(tag + suffix))
    cut = stem
    while len(name_bytes(cut)) > room:
        cut = cut[:max(0, min(len(cut) - 1, room))]
    return cut + tag + suffix
