"""minilm.bpe, the hand-written byte-level BPE: the pre-tokenizer and the merge rule on answers
worked out by hand, then (with the `tokenizers` package, skipped without it) the same ids as
Hugging Face's ByteLevel BPE built from the same vocab.json and merges.txt."""
from __future__ import annotations

import json
import random

import pytest

from minilm.bpe import ByteLevelBPE, bytes_to_unicode, words

SPECIAL_SPELLINGS = ["<mask>", "</s>", "<s>", "<pad>", "<unk>", "[MASK]", "[CLS]", "[SEP]", "<|endoftext|>",
                     "<extra_id_0>", "<lang_3>", "<cls>", "<sep>", "<bos>", "<eos>", "<<mask>>", "<mask", "\u2581"]
_POOLS = {
    "ascii": ["the", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "a", "I"],
    "unicode": ["crème", "brûlée", "naïve", "Ångström", "Łódź", "Привет", "мир", "مرحبا", "中文字符", "日本語の",
                "テキスト", "한국어", "🚀", "👨‍👩‍👧", "👋🏽", "✅", "e\u0301", "ﬁ", "①", "\ufffd", "ß", "Σίσυφος"],
    "space": [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n", "\n ", "\u00a0", "\u3000", "\u2003",
              "\x0b", "\x0c", "\x1c", "\x85", "\u200b"],
    "digits": ["0", "7", "42", "3.14159", "1,000,000", "2024-01-01", "١٢٣", "½", "10^9"],
    "contraction": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "n't", "'", "''", "'x", "’s"],
    "punctuation": [".", ",", "!", "?", "!!", "...", "(", ")", "\"", "#", "$%", "@", "->", "==", "``", "__", "/",
                    "\\", "{}", "\x07", "\x00", "\x7f"],
    "special": SPECIAL_SPELLINGS,
}


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    """n strings of 0..24 parts drawn from every pool above, glued with or without spaces,
    plus the pools' members alone: unicode, CJK, emoji, whitespace runs, tabs, newlines, digits,
    contractions and the spellings of special tokens."""
    rng = random.Random(seed)
    pools = list(_POOLS.values())
    out = ["", " ", "a", "  leading", "trailing  ", "\n\nx\n\n"] + [p for pool in pools for p in pool]
    while len(out) < n:
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 24))]
        out.append("".join(p + (rng.choice(["", " ", " ", "\n"]) if rng.random() < 0.6 else "") for p in parts))
    return out[:n]


# ----------------------------------------------------------------------------- the pre-tokenizer
@pytest.mark.parametrize("text, expected", [
    ("Hello world", ["Hello", " world"]),
    ("a   b", ["a", "  ", " b"]),                # the run's last space goes with the word
    ("I'm here's", ["I", "'m", " here", "'s"]),
    ("I'M", ["I", "'", "M"]),                    # case-sensitive contractions
    ("x\n\ny", ["x", "\n", "\n", "y"]),          # no space to glue: the run gives up its last newline
    ("x \ny", ["x", " ", "\n", "y"]),
    ("end  ", ["end", "  "]),                    # a run at the end stays whole
    ("123abc 45", ["123", "abc", " 45"]),
    ("hi!!'s", ["hi", "!!'", "s"]),              # the symbol run takes the apostrophe
    (" !? x", [" !?", " x"]),
    ("\t\tx", ["\t", "\t", "x"]),             # only U+0020 glues to a word
    ("中文 字符", ["中文", " 字符"]),
    ("<mask>", ["<", "mask", ">"]),
    ("a\u00a0b", ["a", "\u00a0", "b"]),         # NBSP is whitespace, but not the space that glues
    ("a\x1cb", ["a", "\x1c", "b"]),              # not White_Space (str.isspace says it is): a symbol
    ("", []),
])
def test_words_by_hand(text, expected):
    assert words(text) == expected


def test_words_match_the_reference_pattern():
    """The scanner against GPT-2's own regex, run by the `regex` package (tests only)."""
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    for text in varied_strings(400, seed=1):
        assert words(text) == pattern.findall(text), repr(text)


# ----------------------------------------------------------------------------- the merge rule
def _bpe(merges: list[str], extra: list[str] = ()) -> ByteLevelBPE:
    """A vocabulary of the 256 byte symbols, the merges' results and `extra`."""
    pairs = [tuple(m.split()) for m in merges]
    pieces = list(bytes_to_unicode().values()) + [a + b for a, b in pairs] + list(extra)
    return ByteLevelBPE({p: i for i, p in enumerate(dict.fromkeys(pieces))}, pairs)


@pytest.mark.parametrize("merges, symbols, expected", [
    (["a b", "ab c"], "abc", ["abc"]),
    (["b c", "a b"], "abc", ["a", "bc"]),          # the lower rank wins, wherever it is
    (["a b", "b c"], "abc", ["ab", "c"]),
    (["a a"], "aaa", ["aa", "a"]),                  # every occurrence, left to right, no overlap
    (["a a", "aa aa"], "aaaaa", ["aaaa", "a"]),
    (["a a", "aa a"], "aaaa", ["aa", "aa"]),        # (a, a) is merged everywhere before (aa, a)
    (["c d", "a b", "ab cd"], "abcdab", ["abcd", "ab"]),
    (["x y"], "abc", ["a", "b", "c"]),              # no pair has a rank
    (["Ġ t", "Ġt h", "Ġth e"], "Ġthe", ["Ġthe"]),
])
def test_merge_rule_by_hand(merges, symbols, expected):
    assert _bpe(merges).merge(list(symbols)) == expected


def test_encode_and_decode_by_hand():
    bpe = _bpe(["Ġ t", "Ġt h", "Ġth e", "h e"])
    ids = bpe.encode("he the")
    assert [bpe.piece_of[i] for i in ids] == ["he", "Ġthe"]
    assert bpe.decode(ids) == "he the"
    # bytes of a character cut over two pieces come back whole
    assert bpe.decode(bpe.encode("é中🚀")) == "é中🚀"
    assert [bpe.piece_of[i] for i in bpe.encode("é")] == ["Ã", "©"]   # U+00E9 is C3 A9


def test_bytes_to_unicode_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


# ----------------------------------------------------------------------------- against `tokenizers`
@pytest.fixture(scope="module")
def trained_files(tmp_path_factory):
    """vocab.json and merges.txt that Hugging Face's ByteLevel BPE trainer makes from varied text."""
    tokenizers = pytest.importorskip("tokenizers")
    from tests.conftest import corpus_texts
    trainer_text = corpus_texts()[:40] + varied_strings(200, seed=2)
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(trainer_text, vocab_size=600, min_frequency=2, show_progress=False)
    folder = tmp_path_factory.mktemp("bytelevel")
    tok.save_model(str(folder))
    return folder


def test_same_ids_as_tokenizers_on_varied_strings(trained_files):
    from tokenizers import ByteLevelBPETokenizer
    reference = ByteLevelBPETokenizer(str(trained_files / "vocab.json"), str(trained_files / "merges.txt"))
    vocab = json.loads((trained_files / "vocab.json").read_text(encoding="utf-8"))
    lines = (trained_files / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    ours = ByteLevelBPE(vocab, merges)
    strings = varied_strings(400, seed=3)
    assert len(merges) > 200
    for text in strings:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, repr(text)
        assert ours.decode(ids) == text
