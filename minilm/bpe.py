"""Byte-level BPE, the tokenizer of GPT-2 and RoBERTa, written out by hand.

Three steps turn a text into ids:
  1. Pre-tokenize: cut the text into "words" with GPT-2's pattern
         's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
     a word is a contraction, a run of letters, of digits or of other symbols (each with at
     most one space glued in front), or whitespace. A run of spaces before a word leaves its last
     space to the word: "a   b" -> "a", "  ", " b". Python's `re` knows no \\p{L}, so `words` is
     a small scanner over unicodedata categories that follows the pattern's alternatives in order.
  2. Bytes to symbols: each word's UTF-8 bytes, each byte written as one printable character
     (`bytes_to_unicode`: printable bytes stand for themselves, the others are shifted to
     U+0100 and up; a space is "Ġ", a newline "Ċ"). So every text has an encoding, no <unk>.
  3. Merge: start from one symbol per byte and repeatedly merge the adjacent pair of lowest
     rank in merges.txt (rank = line number), every occurrence of it at once, until no adjacent
     pair has a rank. The symbols left are looked up in vocab.json. Words repeat, so each
     word's pieces are cached.
Merges never cross a word's edge, which is why the pre-tokenizer decides so much: " the" is
one piece, "the" after a newline another.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

# Unicode's White_Space property (what \s means in the reference's regex); Python's str.isspace
# differs on U+001C..U+001F, which it counts as space
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                       + "".join(chr(c) for c in range(0x2000, 0x200B)))
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")   # after an apostrophe, in the pattern's order


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """byte value -> the character that stands for it in vocab.json and merges.txt.

    The printable Latin-1 bytes ! .. ~, ¡ .. ¬, ® .. ÿ stand for themselves; the other 68
    (controls, space, soft hyphen) take U+0100, U+0101, ... in byte order: space (0x20) -> Ġ (U+0120)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _kind(c: str) -> str:
    """"s" space, "L" letter, "N" number, "O" anything else: the classes the pattern tells apart."""
    if c in WHITESPACE:
        return "s"
    category = unicodedata.category(c)[0]
    return category if category in "LN" else "O"


def words(text: str) -> list[str]:
    """GPT-2's pre-tokenization of `text` (module docstring); "".join(words(text)) == text."""
    out, i, n = [], 0, len(text)
    kinds = [_kind(c) for c in text]
    while i < n:
        c = text[i]
        # 's 't 're 've 'm 'll 'd (the pattern is case-sensitive: "'S" is not one)
        if c == "'":
            tail = next((t for t in CONTRACTIONS if text.startswith(t, i + 1)), None)
            if tail is not None:
                out.append(text[i:i + 1 + len(tail)])
                i += 1 + len(tail)
                continue
        # " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one optional space (U+0020 only), then a run
        start = i + 1 if c == " " and i + 1 < n and kinds[i + 1] != "s" else i
        kind = kinds[start]
        if kind != "s":
            j = start + 1
            while j < n and kinds[j] == kind:
                j += 1
            out.append(text[i:j])
            i = j
            continue
        # "\s+(?!\S)": a whitespace run that a non-space does not follow; before a non-space the
        # run gives up its last character (the space glued to the next word); "\s+" when that
        # leaves nothing, i.e. a single whitespace character before a non-space
        j = i + 1
        while j < n and kinds[j] == "s":
            j += 1
        if j < n and j - i > 1:
            j -= 1
        out.append(text[i:j])
        i = j
    return out


class ByteLevelBPE:
    """Encode text to a vocabulary's ids and decode back, from vocab.json's and merges.txt's contents.

    vocab: piece (in bytes_to_unicode's characters) -> id.  merges: (left, right) pairs, best first.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.piece_of = {i: piece for piece, i in self.vocab.items()}
        self.byte_char = bytes_to_unicode()
        self.char_byte = unicode_to_bytes()
        self.cache: dict[str, list[int]] = {}

    def merge(self, symbols: list[str]) -> list[str]:
        """The merge rule: while some adjacent pair has a rank, merge every occurrence of the
        lowest-ranked one, left to right ("a a a" with merge (a, a) -> "aa a")."""
        symbols = list(symbols)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode_word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            symbols = [self.byte_char[b] for b in word.encode("utf-8")]
            pieces = self.merge(symbols)
            missing = [p for p in pieces if p not in self.vocab]
            if missing:   # a vocabulary without every byte: the merges cannot make up for it
                raise ValueError(f"the vocabulary has no piece {missing[0]!r} (byte-level BPE needs all 256 bytes)")
            ids = [self.vocab[p] for p in pieces]
            if len(word) < 256:   # long words (a run of spaces, a URL) are rare: not worth keeping
                self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for word in words(text) for i in self.encode_word(word)]

    def piece_bytes(self, i: int) -> bytes:
        """The bytes id i stands for."""
        return bytes(self.char_byte[c] for c in self.piece_of[i])

    def decode(self, ids) -> str:
        # pieces may cut a character's UTF-8 bytes in two: join the bytes first, then decode
        return b"".join(self.piece_bytes(i) for i in ids).decode("utf-8", errors="replace")
