"""minilm.wordpiece, BERT's tokenizer by hand: basic tokenization and the greedy longest-match
rule on answers worked out by hand. (Same ids as transformers' BertTokenizer on a few hundred
strings: tests/test_hf_tokenizer.py.)"""
from __future__ import annotations

import pytest

from minilm.wordpiece import WordPiece, basic_words


@pytest.mark.parametrize("text, lowercase, expected", [
    ("Hello, World!", True, ["hello", ",", "world", "!"]),
    ("Hello, World!", False, ["Hello", ",", "World", "!"]),
    ("Don't  stop\tnow\n", True, ["don", "'", "t", "stop", "now"]),
    ("Crème brûlée", True, ["creme", "brulee"]),             # uncased: accents stripped
    ("Crème brûlée", False, ["Crème", "brûlée"]),
    ("中文abc字", True, ["中", "文", "abc", "字"]),             # each ideograph a word
    ("日本語のテキスト", True, ["日", "本", "語", "のテキスト"]),     # kana are not ideographs
    ("a\x00b\u200bc\x07d", True, ["abcd"]),                 # controls and format characters dropped
    ("x\u2028y\u00a0z", True, ["x", "y", "z"]),             # any Unicode whitespace splits
    ("$5^2 `q`", True, ["$", "5", "^", "2", "`", "q", "`"]),  # ASCII symbols count as punctuation
    ("[MASK] <mask>", True, ["[", "mask", "]", "<", "mask", ">"]),
    ("", True, []),
])
def test_basic_words_by_hand(text, lowercase, expected):
    assert basic_words(text, lowercase) == expected


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "play", "##ing", "##s", "p", "##l",
         "##a", "##y", ",", "a"]


@pytest.mark.parametrize("word, pieces", [
    ("unaffable", ["un", "##aff", "##able"]),
    ("playing", ["play", "##ing"]),
    ("plays", ["play", "##s"]),
    ("pla", ["p", "##l", "##a"]),      # longest first: no "pla", so "p" then continuations
    ("unx", ["[UNK]"]),                # one part matches nothing: the whole word is unknown
    ("a" * 101, ["[UNK]"]),            # longer than 100 characters
])
def test_longest_match_first_by_hand(word, pieces):
    names = VOCAB + ["a" * 100]
    vocab = {p: i for i, p in enumerate(names)}
    wp = WordPiece(vocab, vocab["[UNK]"])
    assert [names[i] for i in wp.encode_word(word)] == pieces


def test_encode_by_hand():
    vocab = {p: i for i, p in enumerate(VOCAB)}
    wp = WordPiece(vocab, vocab["[UNK]"])
    assert wp.encode("Playing, un-affable") == [8, 9, 15, 5, 1, 1]   # "-" is not in the vocabulary
