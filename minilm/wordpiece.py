"""WordPiece, BERT's tokenizer, written out by hand (so a BERT checkpoint's vocab.txt is usable).

Two steps turn a text into ids:
  1. Basic tokenization: drop control characters, write every whitespace character as a space,
     put spaces around CJK ideographs (each is a word), lowercase and strip accents (uncased
     models), then split at whitespace and around every punctuation character: "Don't!" ->
     "don", "'", "t", "!".
  2. WordPiece: each word greedily, longest piece first, from its start; a piece that does not
     start the word is looked up with "##" in front ("playing" -> "play", "##ing"). A word with a
     part no piece matches, or longer than 100 characters, becomes [UNK] as a whole.
Unlike byte-level BPE this loses information: case (uncased models), accents, the kind and
amount of whitespace, and characters outside the vocabulary. So decode gives the words back
separated by single spaces, not the text.
"""
from __future__ import annotations

import unicodedata

from minilm.bpe import WHITESPACE

MAX_WORD_CHARS = 100
CONTINUES = "##"


def _is_whitespace(c: str) -> bool:
    return c in WHITESPACE   # Unicode's White_Space, as Hugging Face's tokenizers (Rust) read BERT


def _is_control(c: str) -> bool:
    # control, format and private-use characters; unassigned code points stay (as in Hugging Face's
    # tokenizers: a newer Unicode may have assigned them)
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(c: str) -> bool:
    # all non-letter, non-digit ASCII symbols count ("$", "^", "`"), as in BERT, though Unicode
    # calls some of them symbols, not punctuation
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(c).startswith("P")


def _is_cjk(c: str) -> bool:
    """The CJK Unified Ideographs blocks (Chinese characters, kanji, hanja), not kana or hangul
    (the ranges Hugging Face's tokenizers use)."""
    cp = ord(c)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def basic_words(text: str, lowercase: bool = True, strip_accents: bool | None = None) -> list[str]:
    """Step 1 (module docstring). strip_accents None: strip them when lowercasing, as BERT does."""
    cleaned = []
    for c in text:
        if c in ("\x00", "\ufffd") or _is_control(c):
            continue
        if _is_cjk(c):
            cleaned += [" ", c, " "]
        else:
            cleaned.append(" " if _is_whitespace(c) else c)
    text = "".join(cleaned)
    if strip_accents or (strip_accents is None and lowercase):
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = text.lower()
    words, word = [], []
    for c in text:
        if _is_whitespace(c) or _is_punctuation(c):
            if word:
                words.append("".join(word))
                word = []
            if not _is_whitespace(c):
                words.append(c)
        else:
            word.append(c)
    if word:
        words.append("".join(word))
    return words


class WordPiece:
    """vocab: piece -> id, continuation pieces spelled with "##"; unk: the id of [UNK]."""

    def __init__(self, vocab: dict[str, int], unk_id: int, lowercase: bool = True, strip_accents: bool | None = None):
        self.vocab, self.unk_id = vocab, unk_id
        self.lowercase, self.strip_accents = lowercase, strip_accents
        self.cache: dict[str, list[int]] = {}

    def encode_word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is not None:
            return ids
        ids, start = [], 0
        if len(word) > MAX_WORD_CHARS:
            ids = [self.unk_id]
        while start < len(word) and ids != [self.unk_id]:
            # the longest piece that starts here (with "##" unless at the word's start)
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else CONTINUES + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                ids = [self.unk_id]   # one part matches no piece: the whole word is unknown
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in basic_words(text, self.lowercase, self.strip_accents) for i in self.encode_word(w)]
