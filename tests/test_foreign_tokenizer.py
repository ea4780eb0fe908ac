"""A public model's tokenizer used as minilm's own (minilm/foreign_tokenizer.py): the id reordering
that puts its specials at minilm's fixed ids, the same encoding as the foreign tokenizer's (in
reordered ids), special spellings as ordinary text, the per-id tables, one byte string for
checkpoints and token folders, and data preparation with it. No Hugging Face package needed:
the folders are made here (a RoBERTa-like and a GPT-2-like byte-level BPE trained by a few lines
below, a Llama-like sentencepiece model trained by sentencepiece)."""
from __future__ import annotations

import collections
import io
import json
import os

import pytest
import torch

from minilm.bpe import ByteLevelBPE, bytes_to_unicode, words
from minilm.errors import UserError
from minilm.foreign_tokenizer import ForeignTokenizer, load_foreign_tokenizer
from minilm.tokenizer import (BOS_ID, CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, UNK_ID, Tokenizer,
                              tokenizer_from_bytes)
from tests.conftest import corpus_texts
from tests.test_bpe import SPECIAL_SPELLINGS, varied_strings

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]   # ids 0-3 in RoBERTa's vocab.json; <mask> is the last id


def train_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """The simplest byte-level BPE trainer: count the pre-tokenized words, merge the most
    frequent adjacent pair (ties: the first seen) n_merges times."""
    table = bytes_to_unicode()
    counts = collections.Counter(w for t in texts for w in words(t))
    split = {w: [table[b] for b in w.encode("utf-8")] for w in counts}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, symbols in split.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        for w, symbols in split.items():
            split[w] = ByteLevelBPE({}, [best]).merge(symbols)
    return merges


@pytest.fixture(scope="session")
def merges() -> list[tuple[str, str]]:
    return train_merges(corpus_texts(20), 300)


def bytelevel_folder(folder, merges, specials_first: list[str], specials_last: list[str],
                     config: dict | None) -> str:
    """vocab.json (specials_first, the 256 bytes, the merges' pieces, specials_last), merges.txt
    and, unless config is None, tokenizer_config.json."""
    pieces = specials_first + list(bytes_to_unicode().values()) + [a + b for a, b in merges] + specials_last
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    if config is not None:
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return str(folder)


ROBERTA_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                  "cls_token": "<s>", "sep_token": "</s>",
                  "mask_token": {"__type": "AddedToken", "content": "<mask>", "lstrip": True, "normalized": False,
                                 "rstrip": False, "single_word": False},
                  "tokenizer_class": "RobertaTokenizer", "add_prefix_space": False}


@pytest.fixture(scope="session")
def roberta_folder(tmp_path_factory, merges) -> str:
    return bytelevel_folder(tmp_path_factory.mktemp("roberta"), merges, ROBERTA_SPECIALS, ["<mask>"], ROBERTA_CONFIG)


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, merges) -> str:
    """GPT-2's layout with no tokenizer_config.json: <|endoftext|> is the last id and every special."""
    return bytelevel_folder(tmp_path_factory.mktemp("gpt2"), merges, [], ["<|endoftext|>"], None)


def llama_model(texts: list[str], vocab_size: int = 400) -> bytes:
    """A sentencepiece BPE model with Llama's settings: <unk> <s> </s> at 0-2, no <pad>, byte
    fallback, a dummy prefix, identity normalization."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for t in texts for line in t.split("\n") if line.strip()]), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    (folder / "tokenizer.model").write_bytes(llama_model(corpus_texts(20)))
    return str(folder)


def wordpiece_folder(folder, texts: list[str], lowercase: bool) -> str:
    """BERT's layout: [PAD], [unused0] [unused1], [UNK] [CLS] [SEP] [MASK], then every character
    (alone and as a "##" continuation) and the texts' 200 most frequent words."""
    import collections
    from minilm.wordpiece import basic_words
    words = collections.Counter(w for t in texts for w in basic_words(t, lowercase))
    chars = sorted({c for w in words for c in w})
    pieces = (["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
              + ["##" + c for c in chars] + [w for w, _ in words.most_common(200) if len(w) > 1])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in dict.fromkeys(pieces)))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": lowercase}, f)
    return str(folder)


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory) -> str:
    return wordpiece_folder(tmp_path_factory.mktemp("bert"), corpus_texts(20), lowercase=True)


@pytest.fixture(scope="session")
def roberta(roberta_folder) -> ForeignTokenizer:
    return load_foreign_tokenizer(roberta_folder)


# ----------------------------------------------------------------------------- the id layout
def test_roberta_specials_go_to_minilm_slots_and_the_rest_follow_in_order(roberta, roberta_folder):
    vocab = json.load(open(os.path.join(roberta_folder, "vocab.json"), encoding="utf-8"))
    mask = vocab["<mask>"]
    ids = roberta.foreign_ids.tolist()
    assert ids[:NUM_SPECIAL] == [1, 3, 0, 2, mask, 0, 2] + [-1] * (NUM_SPECIAL - 7)   # pad unk bos eos mask cls sep
    assert ids[NUM_SPECIAL:] == list(range(4, mask))                                  # everything else, in order
    assert roberta.vocab_size == len(vocab) - 5 + NUM_SPECIAL
    assert roberta.id_to_piece(MASK_ID) == "<mask>" and roberta.id_to_piece(CLS_ID) == "<s>"
    assert roberta.id_to_piece(7) == "<extra_id_0>"            # a new row keeps minilm's name
    assert roberta.id_to_piece(NUM_SPECIAL) == bytes_to_unicode()[0] == "Ā"   # byte 0, the first after the specials
    # encode returns, for a foreign id mapped twice, the first minilm id: <s> is bos (2), not cls (5)
    assert roberta.minilm_id[0] == BOS_ID and roberta.minilm_id[2] == EOS_ID
    # an export takes <s>'s row from cls and </s>'s from eos: the rows minilm's data trains
    assert roberta.export_ids[0] == CLS_ID and roberta.export_ids[2] == EOS_ID
    assert roberta.export_ids[1] == PAD_ID and roberta.export_ids[3] == UNK_ID
    assert torch.equal(roberta.foreign_ids[roberta.export_ids], torch.arange(roberta.foreign_vocab_size))


def test_a_bare_gpt2_folder_maps_endoftext_to_unk_bos_and_eos(gpt2_folder):
    tok = load_foreign_tokenizer(gpt2_folder)
    end = tok.foreign_vocab_size - 1
    assert tok.foreign_ids[:7].tolist() == [-1, end, end, end, -1, -1, -1]   # no <pad>, <mask>, cls, sep
    assert tok.foreign_ids[NUM_SPECIAL:].tolist() == list(range(end))
    assert tok.vocab_size == NUM_SPECIAL + end
    assert tok.export_ids[end] == EOS_ID   # the document separator's row, the one that trains
    assert torch.equal(tok.foreign_ids[tok.export_ids], torch.arange(tok.foreign_vocab_size))


def test_sentencepiece_specials_come_from_the_model(llama_folder):
    import sentencepiece as spm
    tok = load_foreign_tokenizer(llama_folder)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_folder, "tokenizer.model"))
    assert tok.foreign_ids[:7].tolist() == [-1, 0, 1, 2, -1, -1, -1]
    assert tok.foreign_ids[NUM_SPECIAL:].tolist() == list(range(3, sp.get_piece_size()))
    assert tok.id_to_piece(NUM_SPECIAL) == "<0x00>"           # Llama's byte pieces are ordinary ids


def test_bert_wordpiece_layout_encode_and_decode(bert_folder):
    """BERT's specials by its class's names (the folder's config names none), [unused] pieces
    ordinary; encode is WordPiece's, and decode gives the words back, a space between them."""
    from minilm.wordpiece import WordPiece
    tok = load_foreign_tokenizer(bert_folder)
    assert tok.kind == "wordpiece"
    assert tok.foreign_ids[:7].tolist() == [0, 3, -1, -1, 6, 4, 5]
    assert tok.foreign_ids[NUM_SPECIAL:NUM_SPECIAL + 3].tolist() == [1, 2, 7]
    lines = open(os.path.join(bert_folder, "vocab.txt"), encoding="utf-8").read().split("\n")[:-1]
    reference = WordPiece({p: i for i, p in enumerate(lines)}, 3)
    for text in varied_strings(200, seed=7):
        assert tok.to_foreign(tok.encode(text)) == reference.encode(text)
        assert not tok.special_table[tok.encode(text)].any() or 3 in reference.encode(text)   # only [UNK]
    assert tok.decode(tok.encode("The cat, Sat.")) == "the cat , sat ."
    assert tok.decode(tok.encode("The cat\u2603 sat")) == "the [UNK] sat"   # no piece for the snowman
    ids = tok.encode("the cat")
    assert tok.word_starts(torch.tensor(ids)).tolist() == [not tok.id_to_piece(i).startswith("##") for i in ids]
    assert not tok.starts_lower_table.any()   # uncased: every word may start a sentence
    assert ForeignTokenizer.from_bytes(tok.model_bytes).encode("the cat") == ids


def test_the_config_s_specials_win_over_the_guess(tmp_path, merges):
    """BERT-like names given in tokenizer_config.json: no bos/eos, [CLS] and [SEP] at 5 and 6."""
    config = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
              "mask_token": "[MASK]"}
    folder = bytelevel_folder(tmp_path, merges, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], [], config)
    tok = load_foreign_tokenizer(folder)
    assert tok.foreign_ids[:7].tolist() == [0, 1, -1, -1, 4, 2, 3]


def test_a_larger_embedding_table_adds_ids_no_text_makes(roberta_folder, roberta):
    tok = load_foreign_tokenizer(roberta_folder, vocab_size=roberta.foreign_vocab_size + 3)
    assert tok.vocab_size == roberta.vocab_size + 3
    assert tok.foreign_ids[-3:].tolist() == [roberta.foreign_vocab_size + k for k in range(3)]
    assert tok.special_table[-3:].all()
    assert ForeignTokenizer.from_bytes(tok.model_bytes).vocab_size == tok.vocab_size


def gpt2_pipeline(vocab: dict, merges: list, **changes) -> dict:
    """A tokenizer.json as Hugging Face writes one for GPT-2 or RoBERTa, with `changes` on top."""
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None, "post_processor": None, "decoder": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": [list(m) for m in merges], "ignore_merges": False,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None}}
    return {**spec, **changes}


def test_a_tokenizer_json_alone_reads_as_vocab_json_and_merges_txt(roberta, roberta_folder, tmp_path):
    vocab = json.load(open(os.path.join(roberta_folder, "vocab.json"), encoding="utf-8"))
    lines = open(os.path.join(roberta_folder, "merges.txt"), encoding="utf-8").read().splitlines()[1:]
    merges = [line.split(" ") for line in lines]
    (tmp_path / "tokenizer.json").write_text(json.dumps(gpt2_pipeline(vocab, merges)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(ROBERTA_CONFIG))
    alone = load_foreign_tokenizer(str(tmp_path))
    assert torch.equal(alone.foreign_ids, roberta.foreign_ids)
    for text in varied_strings(100, seed=8):
        assert alone.encode(text) == roberta.encode(text)


@pytest.mark.parametrize("changes, config, says", [
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": []}), {}, "cuts words with a Sequence pre-tokenizer"),
    (dict(normalizer={"type": "NFC"}), {}, r"normalizes text \(NFC\)"),
    ({}, {"add_prefix_space": True}, "puts a space before every text"),
])
def test_a_bpe_pipeline_minilm_would_encode_otherwise_is_refused(changes, config, says, roberta_folder, tmp_path):
    vocab = json.load(open(os.path.join(roberta_folder, "vocab.json"), encoding="utf-8"))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes(open(os.path.join(roberta_folder, name), "rb").read())
    (tmp_path / "tokenizer.json").write_text(json.dumps(gpt2_pipeline(vocab, [], **changes)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"^{tmp_path}: this byte-level BPE tokenizer {says}.*; .* not supported$"):
        load_foreign_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- encode / decode
def test_encode_is_the_foreign_encoding_reordered(roberta, roberta_folder, gpt2_folder, llama_folder):
    import sentencepiece as spm
    vocab = json.load(open(os.path.join(roberta_folder, "vocab.json"), encoding="utf-8"))
    lines = open(os.path.join(roberta_folder, "merges.txt"), encoding="utf-8").read().splitlines()[1:]
    reference = ByteLevelBPE(vocab, [tuple(line.split(" ")) for line in lines])
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_folder, "tokenizer.model"))
    llama, gpt2 = load_foreign_tokenizer(llama_folder), load_foreign_tokenizer(gpt2_folder)
    texts = varied_strings(300)
    batch = roberta.encode_batch(texts, bos=True, eos=True)
    for text, ids in zip(texts, batch):
        assert ids[0] == BOS_ID and ids[-1] == EOS_ID
        assert roberta.to_foreign(ids[1:-1]) == reference.encode(text)
        assert roberta.decode(ids) == text
        assert gpt2.decode(gpt2.encode(text)) == text
        assert llama.to_foreign(llama.encode(text)) == sp.encode(text)
        assert llama.decode(llama.encode(text)) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("kind", ["roberta", "gpt2", "llama"])
def test_text_that_spells_a_special_is_ordinary_text(kind, request):
    tok = load_foreign_tokenizer(request.getfixturevalue(f"{kind}_folder"))
    for text in SPECIAL_SPELLINGS + [" ".join(SPECIAL_SPELLINGS)]:
        ids = tok.encode(text)
        assert not tok.special_table[ids].any(), (text, ids)
        assert min(ids) >= NUM_SPECIAL


def test_decode_names_reserved_ids_only_when_asked(roberta):
    a, b = roberta.encode("The cat"), roberta.encode(" sat.")
    ids = [BOS_ID, CLS_ID] + a + [MASK_ID, 7] + b + [SEP_ID, EOS_ID, PAD_ID]
    assert roberta.decode(ids) == "The cat sat."
    assert roberta.decode(torch.tensor(ids), specials=True) == "<s>The cat<mask><extra_id_0> sat.</s>"


# ----------------------------------------------------------------------------- per-id tables
def test_tables(roberta, llama_folder):
    llama = load_foreign_tokenizer(llama_folder)
    for tok in (roberta, llama):
        assert tok.special_table[:NUM_SPECIAL].all() and not tok.special_table[NUM_SPECIAL:].any()
        assert tok.bytes_per_token[:NUM_SPECIAL].eq(0).all()
    for text in varied_strings(200):
        ids = torch.tensor(roberta.encode(text), dtype=torch.long)
        assert int(roberta.bytes_per_token[ids].sum()) == len(text.encode("utf-8"))
    # word starts: the piece with the space, and the piece after a newline or a tab
    ids = roberta.encode("one two\nthree\tfour")
    starts = roberta.word_starts(torch.tensor(ids)).tolist()
    words_of = [roberta.decode(ids[a:b]) for a, b in zip(*(lambda c: (c, c[1:] + [len(ids)]))(
        [i for i, s in enumerate(starts) if s]))]
    assert words_of == ["one", " two\n", "three\t", "four"]
    # a blank line in one byte-level piece still counts two newlines (sentence splitting's paragraphs)
    blank = roberta.encode("\n\n")
    assert int(roberta.newline_table[torch.tensor(blank)].sum()) == 2
    assert roberta.whitespace_table[blank].all()
    stop = roberta.encode("end.")[-1]
    assert roberta.ends_stop_table[stop]


# ----------------------------------------------------------------------------- one byte string
def test_saved_and_loaded_as_one_byte_string(roberta, llama_folder, tmp_path):
    from minilm.checkpoint import bytes_to_tensor
    from minilm.checkpoint_checks import checked_tokenizer
    from minilm.config import Config
    llama = load_foreign_tokenizer(llama_folder)
    for tok in (roberta, llama):
        path = str(tmp_path / "tokenizer.model")
        tok.save(path)
        for again in (Tokenizer.load(path), tokenizer_from_bytes(tok.model_bytes)):
            assert isinstance(again, ForeignTokenizer) and again.model_bytes == tok.model_bytes
            assert torch.equal(again.foreign_ids, tok.foreign_ids)
            assert again.encode("héllo wörld 42 <mask>") == tok.encode("héllo wörld 42 <mask>")
        cfg = Config()
        cfg.model.vocab_size = tok.vocab_size
        assert checked_tokenizer(bytes_to_tensor(tok.model_bytes), cfg, "ckpt.pt").model_bytes == tok.model_bytes
    assert roberta.model_bytes != llama.model_bytes


def test_a_folder_given_as_a_tokenizer_file_points_to_init_from(roberta_folder):
    with pytest.raises(UserError, match=r"cannot read tokenizer .*: it is a folder; .* --init_from FOLDER$"):
        Tokenizer.load(roberta_folder)


def test_damaged_bytes_and_missing_files_are_one_line_errors(tmp_path, roberta):
    with pytest.raises(UserError, match="foreign tokenizer whose files do not read back"):
        tokenizer_from_bytes(roberta.model_bytes[:-10])
    with pytest.raises(UserError, match="is not a folder"):
        load_foreign_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[CLS]\n")
    with pytest.raises(UserError, match=r"vocab.txt has no \[UNK\] piece"):
        load_foreign_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").unlink()
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(UserError, match="its tokenizer.json is neither a byte-level BPE nor a WordPiece model"):
        load_foreign_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_bytes(b"{\"\xff\": 0}")
    with pytest.raises(UserError, match="vocab.json is not UTF-8 text; download the tokenizer again"):
        load_foreign_tokenizer(str(tmp_path))
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(UserError, match="lacks the byte piece .* not a byte-level BPE"):
        load_foreign_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- data preparation
@pytest.mark.parametrize("workers", [1, 2])
def test_data_preparation_with_a_foreign_tokenizer(roberta, corpus_dir, tmp_path, workers):
    import numpy as np
    from minilm.data import prepare
    from minilm.data.preparation import tokenizer_fingerprint, tokenizer_of
    folder = str(tmp_path / "data")
    meta = prepare(corpus_dir, roberta, folder, val_fraction=0.1, num_workers=workers, log=lambda *_: None)
    assert meta["tokenizer"] == tokenizer_fingerprint(roberta)
    again = tokenizer_of(folder, meta)   # what prepared the folder, from the folder
    assert isinstance(again, ForeignTokenizer) and again.model_bytes == roberta.model_bytes
    tokens = np.fromfile(os.path.join(folder, "train.bin"), dtype=meta["dtype"])
    first = tokens[:int(np.flatnonzero(tokens == EOS_ID)[0])].tolist()
    documents = [open(os.path.join(corpus_dir, name), encoding="utf-8").read()
                 for name in sorted(os.listdir(corpus_dir))]
    assert roberta.decode(first) in documents


def test_masked_lm_masks_only_ordinary_ids(roberta):
    from minilm.config import ModelConfig, ObjectiveConfig
    from minilm.objectives import build_objective
    cfg = ModelConfig(vocab_size=roberta.vocab_size, n_layer=1, n_head=2, n_embd=32, seq_len=64)
    mlm = build_objective("mlm", cfg, roberta, ObjectiveConfig())
    row = [BOS_ID] + roberta.encode("The quick brown fox jumps over the lazy dog, " * 4)[:60] + [EOS_ID]
    batch = mlm.make_batch(torch.tensor([row] * 8), torch.Generator().manual_seed(0))
    chosen = batch["labels"] != -100
    assert chosen.any() and not roberta.special_table[torch.tensor([row] * 8)[chosen]].any()
    # replacements drawn at random are ordinary ids too
    replaced = (batch["input_ids"] != torch.tensor([row] * 8)) & (batch["input_ids"] != MASK_ID)
    assert not roberta.special_table[batch["input_ids"][replaced]].any()


# ----------------------------------------------------------------------------- whole runs
@pytest.mark.usefixtures("peak_flops_once")
@pytest.mark.parametrize("objective", ["mlm", "clm", "sop", "t5"])
def test_train_py_runs_every_kind_of_data_with_a_foreign_tokenizer(objective, roberta, corpus_dir, tmp_path):
    """A saved foreign tokenizer given to --tokenizer: blocks, segment pairs (sentence splitting
    from its tables) and sentinels (new rows) all train, and the checkpoint carries it."""
    from minilm.checkpoint import load_checkpoint, tensor_to_bytes
    from tests.conftest import run_in_process
    from tests.test_cli import TINY
    given = tmp_path / "roberta.tokenizer"
    roberta.save(str(given))
    flags = [f for f in TINY]
    at = flags.index("--vocab_size")
    del flags[at:at + 2]
    out = tmp_path / "out"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--tokenizer", given,
                            "--objective", objective, "--max_steps", 2, "--ckpt_every", 2, *flags)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(str(out / "ckpt-00000002.pt"))
    assert tensor_to_bytes(state["tokenizer"]) == roberta.model_bytes
    assert state["config"]["model"]["vocab_size"] == roberta.vocab_size
