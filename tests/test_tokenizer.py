"""The tokenizer's contract: exact round trips, fixed special ids, byte fallback, word starts and
byte counts. Uses the session tokenizer from conftest.py; only the error tests train their own
(tiny) models."""
from __future__ import annotations

import random
import re

import pytest
import torch

from minilm.errors import UserError
from minilm.tokenizer import (LANG_IDS, MIN_VOCAB, NUM_SPECIAL, SENTINEL_IDS, USER_DEFINED, Tokenizer)

# Strings chosen to break a tokenizer that normalizes, strips or drops anything.
VARIED = {
    "empty": "",
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "emoji": "launch 🚀🚀 done ✅ family 👨‍👩‍👧 skin 👋🏽",
    "cjk": "中文字符和日本語のテキスト、한국어 문장",
    "accented": "Crème brûlée, naïve façade, Ångström, São Paulo, Łódź",
    "tabs": "col1\tcol2\t\tcol3\t",
    "repeated_spaces": "a    b     c  d",
    "newlines": "line one\n\nline two\r\nline three\n",
    "leading_trailing": "   padded on both sides   ",
    "only_whitespace": " \t\n  \n",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "arabic": "مرحبا بالعالم، هذا نص عربي",
    "control": "bell\x07 nul\x00 esc\x1b[31mred\x1b[0m del\x7f vt\x0b ff\x0c",
    "unicode_spaces": "nbsp\u00a0here ideographic\u3000space zwsp\u200bend rtl\u200fmark",
    "combining": "e\u0301 vs \u00e9, n\u0303, ﬁ ligature, ① circled",
    "word_mark": "\u2581lead a\u2581b \u2581 \u2581\u2581 tail\u2581",  # sentencepiece's own space marker, literally
    "replacement_char": "a \ufffd b",
    "digits": "3.14159 and 1,000,000 and 2024-01-01",
}


def _random_unseen(seed: int = 0, n: int = 300) -> str:
    """CJK, emoji and rare symbols that a tokenizer trained on English prose never saw."""
    rng = random.Random(seed)
    ranges = [(0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x2200, 0x22FF), (0x0F00, 0x0FFF),
              (0x1D400, 0x1D7FF), (0x10330, 0x1034A)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        chars.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.1:
            chars.append(" ")
    return "".join(chars)


def _spans(tokenizer, ids: list[int]) -> list[str]:
    """The text of each run of pieces that starts at a word start."""
    starts = tokenizer.word_starts(torch.tensor(ids)).tolist()
    cuts = [i for i, s in enumerate(starts) if s] + [len(ids)]
    return [tokenizer.decode(ids[a:b]) for a, b in zip(cuts, cuts[1:])]


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", sorted(VARIED))
def test_round_trip_is_exact(tokenizer, name):
    text = VARIED[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_round_trip_corpus_documents(tokenizer, texts):
    for doc in texts[:15]:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_decode_accepts_tensors_and_drops_bos_eos(tokenizer):
    text = VARIED["accented"]
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode(text)
    assert tokenizer.decode(torch.tensor(ids)) == text
    assert tokenizer.decode_batch([ids, tokenizer.encode("x")]) == [text, "x"]


def test_unseen_text_uses_byte_fallback_never_unk(tokenizer):
    text = _random_unseen()
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
    # most of these characters cannot be in a 1024-piece English vocab: they must be spelled as bytes
    assert sum(tokenizer.sp.is_byte(i) for i in ids) > len(text) // 2


def test_encoding_concatenates_after_a_newline(tokenizer, texts):
    """data.prepare encodes long documents in chunks cut after newlines: that must not change the ids."""
    doc = texts[0]
    cuts = [m.end() for m in re.finditer("\n", doc)]
    assert len(cuts) >= 3
    for cut in cuts[:: max(1, len(cuts) // 5)]:
        a, b = doc[:cut], doc[cut:]
        assert tokenizer.encode(a) + tokenizer.encode(b) == tokenizer.encode(doc)


# ----------------------------------------------------------------------------- special ids
def test_special_ids_are_fixed(tokenizer):
    sp = tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert (tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id) == (4, 5, 6)
    assert [tokenizer.id_to_piece(i) for i in (4, 5, 6)] == ["<mask>", "<cls>", "<sep>"]
    assert list(tokenizer.sentinel_ids) == list(range(7, 107)) == SENTINEL_IDS
    for k, i in enumerate(range(7, 107)):
        assert tokenizer.id_to_piece(i) == f"<extra_id_{k}>"
    assert list(tokenizer.lang_ids) == list(range(107, 115)) == LANG_IDS
    for k, i in enumerate(range(107, 115)):
        assert tokenizer.id_to_piece(i) == f"<lang_{k}>"
    assert NUM_SPECIAL == 115 and len(USER_DEFINED) == 115 - 4


def test_reserved_ids_decode_by_name_only_when_asked(tokenizer):
    """Specials are inserted by id (tests/test_special_tokens.py: text never encodes to one);
    decode shows the reserved ones by name on request, for fill-mask and T5 targets."""
    assert tokenizer.decode([12], specials=True) == "<extra_id_5>"
    assert tokenizer.decode([4, 114], specials=True) == "<mask><lang_7>"
    assert tokenizer.decode([12]) == ""


def test_control_tokens_are_not_matched_from_text(tokenizer):
    """Only prepare() writes <eos>; text that spells a control piece must not produce its id."""
    text = "</s> <s> <pad> <unk>"
    ids = tokenizer.encode(text)
    assert not set(ids) & {0, 1, 2, 3}
    assert tokenizer.decode(ids) == text


def test_is_special(tokenizer):
    ids = torch.arange(tokenizer.vocab_size)
    special = tokenizer.is_special(ids)
    assert special[:NUM_SPECIAL].all()
    assert not special[torch.tensor(tokenizer.encode(VARIED["ascii"]))].any()


def test_save_and_load_keep_everything(tokenizer, tmp_path):
    path = str(tmp_path / "tok.model")
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert [loaded.id_to_piece(i) for i in range(loaded.vocab_size)] == \
           [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert (loaded.pad_id, loaded.eos_id, loaded.mask_id, loaded.sentinel_ids, loaded.lang_ids) == \
           (tokenizer.pad_id, tokenizer.eos_id, tokenizer.mask_id, tokenizer.sentinel_ids, tokenizer.lang_ids)
    for text in list(VARIED.values()) + [_random_unseen(1), "<mask> <extra_id_5>"]:
        assert loaded.encode(text) == tokenizer.encode(text)
    assert torch.equal(loaded.bytes_per_token, tokenizer.bytes_per_token)
    assert torch.equal(loaded.starts_word_table, tokenizer.starts_word_table)


# ----------------------------------------------------------------------------- batches
def test_encode_batch_equals_encode(tokenizer, texts):
    batch = list(VARIED.values()) + texts[:5] + [_random_unseen(2)]
    assert tokenizer.encode_batch(batch) == [tokenizer.encode(t) for t in batch]
    assert tokenizer.encode_batch(batch, bos=True, eos=True) == \
           [tokenizer.encode(t, bos=True, eos=True) for t in batch]
    assert tokenizer.encode_batch([]) == []


# ----------------------------------------------------------------------------- word starts
def test_word_starts_single_spaced_sentence(tokenizer):
    sentence = "Tokenizers split unbelievably long words like antidisestablishmentarianism into pieces."
    words = sentence.split(" ")
    ids = tokenizer.encode(sentence)
    assert len(ids) > len(words)  # some words take several pieces, so the flags mean something
    assert _spans(tokenizer, ids) == [words[0]] + [" " + w for w in words[1:]]


def test_word_starts_multiline_and_whitespace_runs(tokenizer, texts):
    samples = ["first line here\nsecond line\n\n  indented third\r\nfourth\tfifth",
               VARIED["repeated_spaces"], VARIED["newlines"], VARIED["leading_trailing"]] + texts[:5]
    for text in samples:
        spans = _spans(tokenizer, tokenizer.encode(text))
        assert "".join(spans) == text
        # every word lies inside one span and no span holds two words
        words = [w for w in re.split(r"[ \t\r\n]+", text) if w]
        assert [s.strip(" \t\r\n") for s in spans if s.strip(" \t\r\n")] == words


def test_word_starts_after_newline_and_row_start(tokenizer):
    ids = tokenizer.encode("alpha\nbeta\ngamma")
    starts = tokenizer.word_starts(torch.tensor(ids)).tolist()
    newline = tokenizer.encode("\n")
    assert len(newline) == 1
    for i in range(len(ids) - 1):
        if ids[i] == newline[0]:
            assert starts[i + 1]
    # a row cut in the middle of a word still starts with a word start; 2-D input works per row
    word = tokenizer.encode("antidisestablishmentarianism")
    assert len(word) >= 3
    rows = torch.tensor([word[1:3], word[:2]])
    flags = tokenizer.word_starts(rows)
    assert flags.shape == rows.shape
    assert flags[:, 0].all()
    assert not flags[1, 1]  # second piece of one word


# ----------------------------------------------------------------------------- byte counts
def test_bytes_per_token_sum_to_utf8_length(tokenizer, texts):
    samples = list(VARIED.values()) + texts[:10] + [_random_unseen(3)]
    for text in samples:
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        assert int(tokenizer.bytes_per_token[ids].sum()) == len(text.encode("utf-8")), text[:40]
    assert (tokenizer.bytes_per_token[: NUM_SPECIAL] == 0).all()


# ----------------------------------------------------------------------------- errors
def test_vocab_too_large_for_corpus_raises_user_error():
    with pytest.raises(UserError, match="vocab_size 4096 is more than this corpus supports") as err:
        Tokenizer.train(["a b c"], vocab_size=4096)
    msg = str(err.value)
    assert "\n" not in msg and "4096" in msg


def test_vocab_below_minimum_raises_user_error(texts):
    with pytest.raises(UserError, match=f"is too small: minilm needs at least {MIN_VOCAB}") as err:
        Tokenizer.train(texts[:5], vocab_size=MIN_VOCAB - 1)
    assert str(MIN_VOCAB) in str(err.value) and "\n" not in str(err.value)


def test_minimum_vocab_trains_on_a_small_alphabet():
    # MIN_VOCAB leaves room for only a few characters besides the specials and the 256 bytes
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tok = Tokenizer.train(lines, vocab_size=MIN_VOCAB)
    assert tok.vocab_size == MIN_VOCAB
    assert min(tok.encode("<mask>")) >= NUM_SPECIAL   # typed text, never the mask id
    for text in VARIED.values():
        assert tok.decode(tok.encode(text)) == text
        assert tok.unk_id not in tok.encode(text)


def test_vocab_too_small_for_the_characters_names_a_size_that_works(texts):
    with pytest.raises(UserError, match="too small for the characters of this corpus") as err:
        Tokenizer.train(texts[:20], vocab_size=MIN_VOCAB)
    msg = str(err.value)
    assert "\n" not in msg and "too small" in msg
    need = int(re.search(r"at least (\d+)", msg).group(1))
    assert need > MIN_VOCAB
    assert Tokenizer.train(texts[:20], vocab_size=need).vocab_size == need


def test_empty_corpus_raises_user_error():
    with pytest.raises(UserError, match="no text to train a tokenizer on"):
        Tokenizer.train(["", "   \n\n"], vocab_size=1024)


@pytest.mark.parametrize("data", [b"", b"definitely not a sentencepiece model", bytes(range(256)) * 4])
def test_loading_non_model_bytes_raises_user_error(tmp_path, data):
    path = tmp_path / "bad.model"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer.load(str(path))
    with pytest.raises(UserError, match="not a sentencepiece model"):
        Tokenizer(data)


def test_loading_missing_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read tokenizer .*nope.model"):
        Tokenizer.load(str(tmp_path / "nope.model"))


def test_foreign_sentencepiece_model_is_rejected(texts):
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[:20]), model_writer=model,
                                   vocab_size=400, minloglevel=2)
    with pytest.raises(UserError, match="not trained by minilm"):
        Tokenizer(model.getvalue())


FOREIGN_LINES = [f"the {a} cat sat on the {b} mat near {c} words" for a in ("red", "big", "old")
                 for b in ("soft", "wet") for c in ("many", "few", "odd")]


def foreign_model(**settings) -> bytes:
    """A BPE model sentencepiece trains on a tiny text with <pad> <unk> <bos> <eos> at 0-3, like
    minilm's, and what `settings` add (in milliseconds)."""
    import io
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(**{"sentence_iterator": iter(FOREIGN_LINES * 5), "model_writer": model,
                                      "model_type": "bpe", "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
                                      "hard_vocab_limit": False, "minloglevel": 2, **settings})
    return model.getvalue()


@pytest.mark.parametrize("settings, missing", [
    # <pad> 0 and <mask> 4 fit, but no sentinel: ids 5.. are ordinary pieces
    (dict(vocab_size=300, control_symbols=["<mask>"], byte_fallback=True), r"id 5 is the piece '.*', not <cls>;"),
    (dict(vocab_size=300, control_symbols=["<mask>"]), r"id 5 is the piece '.*', not <cls>;"),
    (dict(vocab_size=400, control_symbols=USER_DEFINED[:50], byte_fallback=True),
     r"id 54 is the piece '.*', not <extra_id_47>;"),
    (dict(vocab_size=160, control_symbols=USER_DEFINED), r"it has no byte fallback \(no byte piece <0x00>\);"),
    (dict(vocab_size=400, control_symbols=USER_DEFINED, byte_fallback=True, pad_id=1, unk_id=0),
     r"its <pad> is id 1, not 0;"),
])
def test_a_model_without_minilm_s_reserved_ids_is_refused_saying_what_is_missing(settings, missing):
    with pytest.raises(UserError, match=r"^this sentencepiece model was not trained by minilm: " + missing) as err:
        Tokenizer(foreign_model(**settings))
    assert "\n" not in str(err.value)


def test_a_model_with_minilm_s_layout_is_accepted():
    """Reserved pieces at their ids (control, or user-defined as in tokenizers minilm made before)
    and byte fallback: what minilm relies on, whoever trained it."""
    for kind in ("control_symbols", "user_defined_symbols"):
        tokenizer = Tokenizer(foreign_model(vocab_size=400, byte_fallback=True, **{kind: USER_DEFINED}))
        assert tokenizer.escapes_reserved_text == (kind == "user_defined_symbols")
        assert min(tokenizer.encode("the red cat <extra_id_0> <mask> \u00e9")) >= NUM_SPECIAL
