"""write_hf_tokenizer: files that transformers' AutoTokenizer loads and that encode every text to
minilm's ids. The tokenizer.json written for minilm's own tokenizer is checked twice: against
transformers (skipped without it) and, with no Hugging Face package, by applying its merges with
the merge rule of minilm/bpe.py (what Hugging Face's BPE model does with byte_fallback).

Where equality cannot hold, pinned below: a foreign (RoBERTa, GPT-2, Llama, BERT) tokenizer's
original files make Hugging Face read a special's spelling in a text ("<mask>", "</s>", "[MASK]")
as that special token, which minilm's encode never does (specials are inserted by id only)."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch

from minilm.bpe import ByteLevelBPE
from minilm.foreign_tokenizer import load_foreign_tokenizer, sentencepiece_bpe_json, write_hf_tokenizer
from minilm.tokenizer import MASK_ID, NUM_SPECIAL, Tokenizer
from tests.conftest import corpus_texts
from tests.test_bpe import SPECIAL_SPELLINGS, varied_strings
from tests.test_foreign_tokenizer import (bert_folder, gpt2_folder, llama_folder, merges, roberta_folder,  # noqa: F401
                                          wordpiece_folder)
from tests.test_tokenizer import VARIED, _random_unseen


def strings() -> list[str]:
    """A few hundred varied strings, the tokenizer tests' hard cases and whole documents."""
    return varied_strings(400, seed=5) + list(VARIED.values()) + [_random_unseen(s, 80) for s in range(20)] \
        + corpus_texts(60)[40:]


@pytest.fixture(scope="module")
def larger_tokenizer() -> Tokenizer:
    """More merges than the session tokenizer's 1024 pieces: more ways for two rankings to differ."""
    return Tokenizer.train(corpus_texts(60), vocab_size=3000)


def _apply_tokenizer_json(spec: dict, text: str) -> list[int]:
    """Hugging Face's BPE model with byte_fallback, by hand: the text's characters, merged by
    rank; a symbol without a vocab entry becomes its bytes' <0xNN> pieces."""
    model = spec["model"]
    vocab = model["vocab"]
    bpe = ByteLevelBPE(vocab, [tuple(m) for m in model["merges"]])
    ids = []
    for symbol in bpe.merge(list(text)) if text else []:
        ids += [vocab[symbol]] if symbol in vocab else [vocab[f"<0x{b:02X}>"] for b in symbol.encode("utf-8")]
    return ids


def test_a_foreign_sentencepiece_tokenizer_json_encodes_as_sentencepiece(llama_folder):  # noqa: F811
    """Llama's settings: a "▁" before the text and for each space, by the normalizer the file names."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_folder, "tokenizer.model"))
    spec = sentencepiece_bpe_json(sp, dummy_prefix=True, literal_spaces=False, special_below=0)
    assert [n["type"] for n in spec["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    for text in varied_strings(200, seed=6):
        normalized = ("\u2581" + text.replace(" ", "\u2581")) if text else ""
        assert _apply_tokenizer_json(spec, normalized) == sp.encode(text), repr(text)


def test_sentencepiece_settings_read_without_protobuf(tokenizer, llama_folder):  # noqa: F811
    import sentencepiece as spm
    from minilm.foreign_tokenizer import read_sentencepiece_settings
    assert read_sentencepiece_settings(tokenizer.model_bytes) == {
        "model_type": 2, "normalizer": "identity", "add_dummy_prefix": False, "remove_extra_whitespaces": False,
        "escape_whitespaces": True}
    assert load_foreign_tokenizer(llama_folder).sentencepiece_settings() == {
        "model_type": 2, "normalizer": "identity", "add_dummy_prefix": True, "remove_extra_whitespaces": False,
        "escape_whitespaces": True, "writable": True}
    model = io.BytesIO()   # sentencepiece's defaults: unigram, NFKC, extra whitespace removed
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_texts(5)), model_writer=model, vocab_size=250,
                                   minloglevel=2)
    assert read_sentencepiece_settings(model.getvalue()) == {
        "model_type": 1, "normalizer": "nmt_nfkc", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
        "escape_whitespaces": True}


def test_tokenizer_json_encodes_as_minilm_without_any_hf_package(tokenizer):
    spec = sentencepiece_bpe_json(tokenizer.sp)
    assert spec["normalizer"] is None and spec["pre_tokenizer"] is None and spec["model"]["byte_fallback"]
    assert [t["id"] for t in spec["added_tokens"]] == list(range(NUM_SPECIAL))
    assert spec["model"]["vocab"]["<mask>"] == MASK_ID
    for text in varied_strings(300, seed=5) + list(VARIED.values()):
        assert _apply_tokenizer_json(spec, text) == tokenizer.encode(text), repr(text)


@pytest.mark.parametrize("which", ["session", "larger"])
def test_autotokenizer_gives_minilm_s_ids(which, tokenizer, larger_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tokenizer if which == "session" else larger_tokenizer
    paths = write_hf_tokenizer(tok, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["tokenizer.json", "tokenizer_config.json"]
    # the model's config.json (written by the export beside these files) must not change the class
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in strings():
        ids = tok.encode(text)
        assert hf.encode(text) == ids, repr(text[:80])
        assert hf(text, add_special_tokens=False)["input_ids"] == ids
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == text
    assert len(hf) == tok.vocab_size
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id, hf.cls_token_id,
            hf.sep_token_id) == (0, 1, 2, 3, 4, 5, 6)
    assert hf.convert_ids_to_tokens(list(range(NUM_SPECIAL))) == [tok.id_to_piece(i) for i in range(NUM_SPECIAL)]


def test_special_spellings_are_text_unless_the_user_asks(tokenizer, tmp_path):
    """minilm never reads "<mask>" in a text as the mask; the written files do the same, and
    transformers' per-call switch gives its fill-mask pipeline the mask when a user wants it."""
    transformers = pytest.importorskip("transformers")
    write_hf_tokenizer(tokenizer, str(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SPECIAL_SPELLINGS:
        assert hf.encode(text) == tokenizer.encode(text)
        assert min(tokenizer.encode(text)) >= NUM_SPECIAL
    asked = hf("a <mask> b", split_special_tokens=False)["input_ids"]
    assert asked == tokenizer.encode("a ") + [MASK_ID] + tokenizer.encode(" b")


# ----------------------------------------------------------------------------- foreign tokenizers
@pytest.fixture(scope="module")
def bert_cased_folder(tmp_path_factory) -> str:
    return wordpiece_folder(tmp_path_factory.mktemp("bert_cased"), corpus_texts(20), lowercase=False)


@pytest.mark.parametrize("kind, model_type", [("roberta", "roberta"), ("gpt2", "gpt2"), ("llama", "llama"),
                                              ("bert", "bert"), ("bert_cased", "bert")])
def test_a_foreign_tokenizer_writes_its_original_files(kind, model_type, request, tmp_path):
    """Same ids in foreign numbering on every text that spells no special; where a text spells one,
    Hugging Face gives the special's id and minilm ordinary pieces (pinned)."""
    transformers = pytest.importorskip("transformers")
    source = request.getfixturevalue(f"{kind}_folder")
    tok = load_foreign_tokenizer(source)
    out = str(tmp_path / "out")
    write_hf_tokenizer(tok, out)
    for name in os.listdir(source):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(source, name), "rb").read()
    if kind == "llama":   # a bare tokenizer.model: transformers needs protobuf to convert it, so one is written
        assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": model_type}, f)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    specials = {tok.pieces[f] for f in tok.foreign_special if tok.pieces[f]}
    differ = 0
    for text in strings():
        ours, theirs = tok.to_foreign(tok.encode(text)), hf.encode(text, add_special_tokens=False)
        if any(s in text for s in specials):
            differ += ours != theirs
        else:
            assert ours == theirs, repr(text[:80])
    assert differ > 0
    special, foreign = {"roberta": ("<mask>", tok.foreign_vocab_size - 1), "llama": ("</s>", 2),
                        "gpt2": ("<|endoftext|>", tok.foreign_vocab_size - 1), "bert": ("[MASK]", 6),
                        "bert_cased": ("[MASK]", 6)}[kind]
    assert hf.encode(special, add_special_tokens=False) == [foreign]
    assert foreign not in tok.to_foreign(tok.encode(special))


@pytest.mark.parametrize("kind, model_type", [("roberta", "roberta"), ("bert", "bert"), ("bert_cased", "bert")])
def test_folders_transformers_saved_import_with_its_ids(kind, model_type, request, tmp_path):
    """What save_pretrained writes (a tokenizer.json beside, or instead of, vocab.json + merges.txt
    or vocab.txt) imports with the ids transformers gives, except where a text spells a special."""
    import shutil
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "source"
    shutil.copytree(request.getfixturevalue(f"{kind}_folder"), source)
    (source / "config.json").write_text(json.dumps({"model_type": model_type}))
    hf = transformers.AutoTokenizer.from_pretrained(str(source))
    saved = tmp_path / "saved"
    hf.save_pretrained(str(saved))
    assert "tokenizer.json" in os.listdir(saved)
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / name, only_json / name)
    for folder in (saved, only_json):
        tok = load_foreign_tokenizer(str(folder))
        specials = {tok.pieces[f] for f in tok.foreign_special if tok.pieces[f]}
        for text in strings():
            if not any(s in text for s in specials):
                assert tok.to_foreign(tok.encode(text)) == hf.encode(text, add_special_tokens=False), repr(text[:80])


def test_a_tokenizer_with_minilm_s_layout_but_a_dummy_prefix_exports_its_ids(tmp_path):
    """A model another trainer (or minilm's first releases) made with minilm's ids but a "▁" before
    every text: the file writes the prefix too. Not where the text holds a "▁" itself: minilm's
    encode cuts the text there and sentencepiece prefixes each part. One that normalizes text (NFKC)
    cannot be written to give its ids: a one-line error instead of wrong ids."""
    from minilm.errors import UserError
    from minilm.tokenizer import USER_DEFINED
    from tests.test_tokenizer import foreign_model
    transformers = pytest.importorskip("transformers")
    prefixed = Tokenizer(foreign_model(vocab_size=400, byte_fallback=True, control_symbols=USER_DEFINED,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False))
    write_hf_tokenizer(prefixed, str(tmp_path / "prefixed"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "prefixed"))
    assert hf.encode("the red cat") == prefixed.encode("the red cat")
    assert prefixed.id_to_piece(prefixed.encode("the red cat")[0]).startswith("\u2581")   # the prefix
    for text in strings():
        if "\u2581" not in text:
            assert hf.encode(text) == prefixed.encode(text), repr(text[:80])
    assert hf.encode("a\u2581b") != prefixed.encode("a\u2581b")
    nfkc = Tokenizer(foreign_model(vocab_size=400, byte_fallback=True, control_symbols=USER_DEFINED))
    with pytest.raises(UserError, match=r"^this tokenizer normalizes text \(nmt_nfkc, extra whitespace removed\)"):
        write_hf_tokenizer(nfkc, str(tmp_path / "nfkc"))


def test_a_bert_download_imports_with_its_wordpiece_vocabulary(bert_folder, tmp_path):  # noqa: F811
    """BERT's vocab.txt beside a BertForMaskedLM (random config): [CLS] text [SEP] in minilm's ids is
    transformers' encoding, and the imported model's logits over them are transformers'."""
    import shutil
    transformers = pytest.importorskip("transformers")
    from minilm.hf_import import load_hf_module
    from minilm.tokenizer import CLS_ID, SEP_ID
    folder = tmp_path / "bert"
    shutil.copytree(bert_folder, folder)
    size = len((folder / "vocab.txt").read_text(encoding="utf-8").split("\n")) - 1
    config = transformers.BertConfig(vocab_size=size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder))
    objective, imported = load_hf_module(str(folder))
    tok = imported.tokenizer
    text = "The river runs by the garden, 42 times."
    ids = [CLS_ID] + tok.encode(text) + [SEP_ID]
    assert transformers.AutoTokenizer.from_pretrained(str(folder))(text)["input_ids"] == tok.to_foreign(ids)
    kept = tok.foreign_ids >= 0
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([tok.to_foreign(ids)])).logits
        ours = objective.predict(torch.tensor([ids]))
    torch.testing.assert_close(ours[..., kept], theirs[..., tok.foreign_ids[kept]], atol=1e-5, rtol=0)
