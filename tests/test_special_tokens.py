"""Special ids are inserted by id only: no text, in a corpus or a prompt, encodes to one.

The reserved pieces (<mask>, <cls>, <sep>, <extra_id_N>, <lang_N>) used to be sentencepiece
user-defined symbols, so the text "<mask>" in an HTML page or a paper about masked LMs encoded to
the mask id and trained as an unlabelled mask. Every test here runs on both kinds of tokenizer:
a new one (reserved pieces are control symbols) and one trained the old way (user-defined
symbols), which lives on in existing checkpoints and out_dirs and must escape the text instead.
"""
from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import torch

from minilm.config import ModelConfig
from minilm.data import prepare
from minilm.objectives import build_objective
from minilm.tokenizer import (BOS_ID, CLS_ID, EOS_ID, LANG_IDS, MASK_ID, NUM_SPECIAL, PAD_ID, RESERVED_PIECES,
                              SENTINEL_IDS, SEP_ID, UNK_ID, WORD_MARK, Tokenizer, _lines_of)
from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

# every string a tokenizer knows as a piece name, and the names other libraries use
SPECIAL_STRINGS = RESERVED_PIECES + ["<pad>", "<unk>", "<s>", "</s>", "<bos>", "<eos>", "<|endoftext|>",
                                     "[MASK]", "[CLS]", "[SEP]"]
# built around them: glued, nested, adjacent, almost-names, near the word marker
AROUND = ["a<mask>b", "<<mask>>", "<<mask>", "<mask>>", "<mask><sep>", "<mask><mask>", "<cls><sep><mask>",
          "<extra_id_99>", "<extra_id_100>", "<extra_id_-1>", "<extra_id_07>", "<lang_7>", "<lang_8>",
          "<mask", "mask>", "< mask >", "<MASK>", "<", "<<", "<>", "Use <mask> and <sep> in HTML",
          "x\u2581<mask>\u2581y", "\u2581<cls>", "<cls>\n<sep>\t<mask>\n", " <extra_id_0> the <extra_id_1> ",
          "<lang_3>text</s>", "</s><s><pad><unk>", "<|endoftext|><mask>"]
FRAGMENTS = SPECIAL_STRINGS + ["<", ">", "<<", ">>", "</", "mask", "extra_id_", "lang_", "_", "0", "9", "10",
                               " ", "  ", "\n", "\t", WORD_MARK, "a", "The", "é", "中", "😀", "|"]


def train_old_style(texts: list[str], vocab_size: int) -> Tokenizer:
    """A tokenizer made the way minilm made them before reserved pieces were control symbols:
    the same sentencepiece call, with the reserved pieces as user-defined symbols."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_lines_of(texts))), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=RESERVED_PIECES, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, train_extremely_large_corpus=False, num_threads=1, minloglevel=2)
    return Tokenizer(model.getvalue())


@pytest.fixture(scope="module")
def old_tokenizer(texts):
    return train_old_style(texts, vocab_size=1024)


@pytest.fixture(params=["new", "old"])
def any_tokenizer(request, tokenizer, old_tokenizer):
    return tokenizer if request.param == "new" else old_tokenizer


def assert_no_special_ids(ids: list[int], text: str) -> None:
    specials = [i for i in ids if i < NUM_SPECIAL]
    assert not specials, f"{text!r} encodes to special ids {specials}"


# ----------------------------------------------------------------------------- the two kinds
def test_both_kinds_keep_the_fixed_ids(any_tokenizer):
    sp = any_tokenizer.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [sp.piece_to_id(p) for p in RESERVED_PIECES] == list(range(4, NUM_SPECIAL))
    assert [sp.piece_to_id(p) for p in ("<mask>", "<cls>", "<sep>")] == [MASK_ID, CLS_ID, SEP_ID]
    assert [sp.piece_to_id(f"<extra_id_{k}>") for k in range(100)] == SENTINEL_IDS
    assert [sp.piece_to_id(f"<lang_{k}>") for k in range(8)] == LANG_IDS
    assert any_tokenizer.special_table[:NUM_SPECIAL].all() and not any_tokenizer.special_table[NUM_SPECIAL:].any()
    assert (any_tokenizer.bytes_per_token[:NUM_SPECIAL] == 0).all()


def test_new_tokenizers_make_reserved_pieces_control_symbols(tokenizer, old_tokenizer):
    assert all(tokenizer.sp.is_control(i) for i in range(NUM_SPECIAL) if i != UNK_ID)
    assert not tokenizer.escapes_reserved_text
    assert not any(old_tokenizer.sp.is_control(i) for i in range(MASK_ID, NUM_SPECIAL))
    assert old_tokenizer.escapes_reserved_text


# ----------------------------------------------------------------------------- encode
@pytest.mark.parametrize("text", SPECIAL_STRINGS + AROUND)
def test_special_strings_encode_as_text(any_tokenizer, text):
    ids = any_tokenizer.encode(text)
    assert_no_special_ids(ids, text)
    assert any_tokenizer.decode(ids) == text
    assert any_tokenizer.decode(ids, specials=True) == text


def test_all_special_strings_in_one_text(any_tokenizer):
    text = " ".join(SPECIAL_STRINGS) + "\n" + "".join(SPECIAL_STRINGS) + "\n" + "".join(AROUND)
    ids = any_tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert_no_special_ids(ids[1:-1], text)
    assert any_tokenizer.decode(ids) == text


def test_random_strings_of_special_fragments(any_tokenizer):
    """A property check: a few hundred strings glued from pieces of special names."""
    rng = random.Random(1234)
    strings = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(400)]
    batch = any_tokenizer.encode_batch(strings)
    for text, ids in zip(strings, batch):
        assert_no_special_ids(ids, text)
        assert any_tokenizer.decode(ids) == text
    assert batch == [any_tokenizer.encode(text) for text in strings]


class CountingProcessor:
    """Wraps a SentencePieceProcessor and counts its encode calls."""

    def __init__(self, sp):
        self.sp, self.encode_calls = sp, 0

    def encode(self, *args, **kwargs):
        self.encode_calls += 1
        return self.sp.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.sp, name)


def test_new_tokenizer_encodes_special_text_in_one_call(tokenizer):
    """Control symbols need no escaping: a batch full of "<mask>" is still one sentencepiece call."""
    tok = Tokenizer(tokenizer.model_bytes)
    tok.sp = CountingProcessor(tok.sp)
    texts = ["a <mask> b", "<extra_id_3>", "<cls>x<sep>", "no brackets", "a < b"]
    batch = tok.encode_batch(texts)
    assert tok.sp.encode_calls == 1
    for text, ids in zip(texts, batch):
        assert_no_special_ids(ids, text)


def test_old_tokenizer_escapes_only_texts_that_spell_a_reserved_piece(old_tokenizer):
    tok = Tokenizer(old_tokenizer.model_bytes)
    tok.sp = CountingProcessor(tok.sp)
    plain = ["no brackets here", "a < b and c > d", "<html><body>", "<mas k>", "<extra_id_100>"]
    assert tok.encode_batch(plain) == [tok.sp.sp.encode(text) for text in plain]
    assert tok.sp.encode_calls == 1                  # the fast path: one call for the whole batch
    ids = tok.encode("x <mask> y")
    assert_no_special_ids(ids, "x <mask> y")
    assert tok.decode(ids) == "x <mask> y"


# ----------------------------------------------------------------------------- decode
def test_decode_shows_reserved_ids_by_name_only_when_asked(any_tokenizer):
    tok = any_tokenizer
    ids = [BOS_ID] + tok.encode("a ") + [MASK_ID] + tok.encode(" b") + [SENTINEL_IDS[0], CLS_ID, SEP_ID,
                                                                         SENTINEL_IDS[99], LANG_IDS[7], EOS_ID, PAD_ID]
    assert tok.decode(ids) == "a  b"
    assert tok.decode(ids, specials=True) == "a <mask> b<extra_id_0><cls><sep><extra_id_99><lang_7>"
    assert tok.decode(torch.tensor(ids), specials=True) == tok.decode(ids, specials=True)
    assert tok.decode_batch([ids, [MASK_ID]], specials=True) == [tok.decode(ids, specials=True), "<mask>"]
    assert tok.decode([MASK_ID]) == "" and tok.decode([]) == "" and tok.decode([], specials=True) == ""


# ----------------------------------------------------------------------------- prepared data
def test_prepared_corpus_holds_no_special_id_but_eos_at_document_ends(any_tokenizer, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {k}: the {' and the '.join(SPECIAL_STRINGS[k::5])} pieces.\n" + "\n".join(AROUND) + "\n"
            for k in range(5)]
    for k, doc in enumerate(docs):
        (corpus / f"doc{k}.txt").write_text(doc, encoding="utf-8")
    folder = str(tmp_path / "prepared")
    meta = prepare(str(corpus), any_tokenizer, folder, val_fraction=0.2, num_workers=1, log=lambda *_: None)
    decoded = []
    for split in ("train", "val"):
        tokens = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"]).astype(np.int64)
        special_at = np.flatnonzero(tokens < NUM_SPECIAL)
        assert (tokens[special_at] == EOS_ID).all(), sorted(set(tokens[special_at].tolist()))
        ends = np.concatenate([[-1], special_at])
        assert special_at[-1] == len(tokens) - 1
        decoded += [any_tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(ends, ends[1:])]
    assert sorted(decoded) == sorted(docs)


# ----------------------------------------------------------------------------- sample.py --fill
def load_sample_script():
    return load_script("sample.py")


@pytest.mark.parametrize("name", ["mlm", "mlm+sop"])
def test_fill_inserts_the_mask_by_id_and_typed_specials_as_text(any_tokenizer, name, capsys):
    sample = load_sample_script()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=any_tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2, n_embd=32)
    objective = build_objective(name, cfg, any_tokenizer).eval()
    text = "Use <cls> and <sep> around <mask> or <extra_id_0>."
    candidates, ids = sample.fill_mask(objective, any_tokenizer, text, 3, "cpu")
    framing = (CLS_ID, SEP_ID) if name == "mlm+sop" else (EOS_ID, None)
    inner = ids[1:-1] if framing[1] is not None else ids[1:]
    assert ids[0] == framing[0] and (framing[1] is None or ids[-1] == framing[1])
    assert [t for t in inner if t < NUM_SPECIAL] == [MASK_ID] and len(candidates) == 1
    where = inner.index(MASK_ID)
    assert any_tokenizer.decode(inner[:where]) == "Use <cls> and <sep> around"
    assert any_tokenizer.decode(inner[where + 1:]) == " or <extra_id_0>."

    sample.print_fill(objective, any_tokenizer, text, 3, "cpu")
    lines = capsys.readouterr().out.splitlines()
    best = candidates[0][0][0]
    assert lines[0] == "<mask> 1 of 1:" and len(lines) == 5
    assert [json.loads(line.split(None, 1)[1]) for line in lines[1:4]] == \
           [any_tokenizer.decode([token], specials=True) for token, _ in candidates[0]]
    filled = "Use <cls> and <sep> around" + any_tokenizer.decode([best], specials=True) + " or <extra_id_0>."
    assert lines[4] == f"filled: {json.dumps(filled, ensure_ascii=False)}"


class PredictsOneId:
    """A stand-in masked LM whose every position puts nearly all probability on `token`."""

    def __init__(self, token: int, vocab_size: int, data: str):
        self.token, self.vocab_size, self.data = token, vocab_size, data
        self.backbone = type("Backbone", (), {"cfg": ModelConfig(vocab_size=vocab_size, seq_len=64)})()

    def predict(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, self.vocab_size)
        logits[..., self.token] = 20.0
        return logits


@pytest.mark.parametrize("data", ["blocks", "segment_pairs"])
@pytest.mark.parametrize("guess", [SEP_ID, CLS_ID, EOS_ID, SENTINEL_IDS[0]])
def test_fill_shows_a_special_guess_by_name(tokenizer, data, guess, capsys):
    """A guess that is a special id is printed by name, and stays in the filled text even when it
    is the id fill_mask frames the text with (framing is removed by position, not by value)."""
    sample = load_sample_script()
    sample.print_fill(PredictsOneId(guess, tokenizer.vocab_size, data), tokenizer, "a <mask> b", 2, "cpu")
    lines = capsys.readouterr().out.splitlines()
    name = json.dumps(tokenizer.decode([guess], specials=True))
    assert lines[1].split() == ["1.0000", name]
    assert lines[-1] == "filled: " + json.dumps("a" + tokenizer.decode([guess], specials=True) + " b")


def test_token_files_from_before_the_fix_are_tokenized_again_with_the_same_tokenizer(tmp_path, old_tokenizer):
    """An out_dir an older minilm prepared with an old-style tokenizer may hold <mask>/<sep> ids
    where the text only typed them. train.py keeps that tokenizer (a checkpoint's ids depend on
    it) but tokenizes the data again, now escaped; files it made since are reused."""
    from minilm.checkpoint import atomic_write_bytes
    from minilm.config import parse_overrides
    train_script = load_script("train.py")

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"Document {i} writes <mask> and <sep> in its HTML.\n" * 20)
    out = tmp_path / "out"
    cfg = parse_overrides(["--data", str(corpus), "--out_dir", str(out), "--vocab_size", "1024",
                           "--num_workers", "1"])
    lines = []
    train_script.tokenizer_and_data(cfg, log=lines.append, tokenizer=old_tokenizer)
    meta_path = out / "data" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["typed_specials_escaped"] is True
    tokens = np.fromfile(out / "data" / "train.bin", dtype=np.uint16)
    assert not ((tokens < NUM_SPECIAL) & (tokens != EOS_ID)).any()
    # what an older minilm left: the typed <mask> as the mask id, and no mark in meta.json
    dirty = tokens.copy()
    dirty[5] = MASK_ID
    dirty.tofile(out / "data" / "train.bin")
    del meta["typed_specials_escaped"]
    atomic_write_bytes(str(meta_path), json.dumps(meta).encode())
    lines = []
    again = train_script.tokenizer_and_data(cfg, log=lines.append)
    assert lines[0].startswith("preparing again: ") and "typed special tokens" in lines[0], lines
    assert not any(line.startswith("training a") for line in lines)      # the tokenizer is kept
    assert again.model_bytes == old_tokenizer.model_bytes == (out / "tokenizer.model").read_bytes()
    assert np.array_equal(np.fromfile(out / "data" / "train.bin", dtype=np.uint16), tokens)
    lines = []
    train_script.tokenizer_and_data(cfg, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines
