"""prepare() and BlockSource: token counts, document boundaries, the by-document split, input
formats, bad input, and the random windows. Uses the session `prepared` corpus from conftest.py
and small hand-made corpora."""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from minilm.data import BlockSource, prepare, token_dtype
from minilm.errors import UserError
from minilm.tokenizer import EOS_ID, Tokenizer

QUIET = dict(log=lambda *_: None)


def read_split(folder: str, split: str) -> np.ndarray:
    with open(os.path.join(folder, "meta.json")) as f:
        dtype = json.load(f)["dtype"]
    return np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=dtype)


def split_at_eos(tokens: np.ndarray) -> list[list[int]]:
    """The documents of a token stream: the runs before each <eos> (which must end the stream)."""
    assert len(tokens) == 0 or tokens[-1] == EOS_ID
    ends = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(int)
    return [tokens[a:b].tolist() for a, b in zip(starts, ends)]


def decoded_docs(tokenizer, folder: str, split: str) -> list[str]:
    return [tokenizer.decode(ids) for ids in split_at_eos(read_split(folder, split))]


def prep(source, tokenizer, tmp_path, name="out", **kw):
    folder = str(tmp_path / name)
    kw.setdefault("num_workers", 1)
    return folder, prepare(str(source), tokenizer, folder, **QUIET, **kw)


# ----------------------------------------------------------------------------- the session corpus
def test_token_counts_equal_direct_encode(prepared, texts, tokenizer):
    folder, meta = prepared
    expected = sum(len(tokenizer.encode(doc)) + 1 for doc in texts)
    assert meta["train_tokens"] + meta["val_tokens"] == expected
    assert len(read_split(folder, "train")) == meta["train_tokens"]
    assert len(read_split(folder, "val")) == meta["val_tokens"]
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["files"] == len(texts)
    assert meta["chars"] == sum(len(doc) for doc in texts)
    assert meta["replaced_invalid_utf8"] == 0


def test_one_eos_per_document(prepared, texts):
    folder, meta = prepared
    n_eos = sum(int((read_split(folder, s) == EOS_ID).sum()) for s in ("train", "val"))
    assert n_eos == len(texts)
    assert meta["train_documents"] + meta["val_documents"] == len(texts)


def test_split_is_by_document(prepared, texts, tokenizer):
    folder, meta = prepared
    train, val = decoded_docs(tokenizer, folder, "train"), decoded_docs(tokenizer, folder, "val")
    assert all(doc in texts for doc in train + val)  # every piece between two <eos> is a whole document
    # the source documents, in order, are an interleaving of the two splits (each keeps the order);
    # the built-in corpus has a few identical documents, and either split may take a copy
    val_idx, t, v = [], 0, 0
    for i, doc in enumerate(texts):
        if t < len(train) and train[t] == doc:
            t += 1
        else:
            assert v < len(val) and val[v] == doc, f"document {i} is in neither split"
            val_idx.append(i)
            v += 1
    assert (t, v) == (len(train), len(val))
    unique = {doc for doc in texts if texts.count(doc) == 1}
    assert not set(train) & set(val) & unique
    n_val = max(1, round(0.1 * len(texts)))
    assert len(val) == meta["val_documents"] == n_val
    # evenly spaced, not just the tail of the corpus
    gaps = np.diff([-1] + val_idx + [len(texts)])
    assert gaps.max() <= 2 * len(texts) / n_val


@pytest.mark.parametrize("n_docs,val_fraction", [(5, 0.05), (7, 0.3), (12, 0.5), (13, 0.2), (9, 0.3)])
def test_number_of_val_documents(texts, tokenizer, tmp_path, n_docs, val_fraction):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n_docs):
        (src / f"{i:02d}.txt").write_text(texts[i][:400], encoding="utf-8")
    folder, meta = prep(src, tokenizer, tmp_path, val_fraction=val_fraction)
    # max(1, round(val_fraction * n_docs)) documents, written out: 13 x 0.2 = 2.6 and 9 x 0.3 = 2.7
    # are where round and int part ways
    expected = {(5, 0.05): 1, (7, 0.3): 2, (12, 0.5): 6, (13, 0.2): 3, (9, 0.3): 3}[n_docs, val_fraction]
    assert meta["val_documents"] == expected
    assert len(decoded_docs(tokenizer, folder, "val")) == expected
    assert len(decoded_docs(tokenizer, folder, "train")) == n_docs - expected


def test_token_dtype(prepared):
    _, meta = prepared
    assert meta["dtype"] == "uint16"
    assert token_dtype(1024) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(70000) == np.uint32


def test_vocab_above_uint16_is_stored_as_uint32(prepared, corpus_dir, tokenizer, tmp_path):
    """prepare picks the token dtype from the tokenizer's size: past 65536 ids, 4 bytes a token,
    with the same ids (only the size is patched, so the pieces are the session tokenizer's)."""
    big = Tokenizer(tokenizer.model_bytes)
    big.vocab_size = 70_000
    folder, meta = prep(corpus_dir, big, tmp_path, val_fraction=0.1)
    small_folder, small_meta = prepared
    assert small_meta["dtype"] == "uint16" and meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        assert n == small_meta[f"{split}_tokens"] > 0
        assert os.path.getsize(os.path.join(folder, f"{split}.bin")) == 4 * n
        assert os.path.getsize(os.path.join(small_folder, f"{split}.bin")) == 2 * n
        assert np.array_equal(read_split(folder, split), read_split(small_folder, split))
    # and the windows read from either file are the same
    wide = BlockSource(folder, "train", 32, 4, seed=5).batch(3)
    assert np.array_equal(wide, BlockSource(small_folder, "train", 32, 4, seed=5).batch(3))


def test_multiple_workers_give_identical_files(prepared, corpus_dir, tokenizer, tmp_path):
    folder, meta = prepared
    folder2, meta2 = prep(corpus_dir, tokenizer, tmp_path, num_workers=2, val_fraction=0.1)
    for name in ("train.bin", "val.bin"):
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(folder2, name), "rb") as b:
            assert a.read() == b.read()
    assert meta2 == meta


# ----------------------------------------------------------------------------- input formats
def test_folder_is_read_recursively_in_sorted_order_skipping_hidden(texts, tokenizer, tmp_path):
    src = tmp_path / "src"
    (src / "b_sub").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "c.txt").write_text(texts[2], encoding="utf-8")
    (src / "a.txt").write_text(texts[0], encoding="utf-8")
    (src / "b_sub" / "x.md").write_text(texts[1], encoding="utf-8")
    (src / ".hidden.txt").write_text("never read", encoding="utf-8")
    (src / ".git" / "config").write_text("never read either", encoding="utf-8")
    folder, meta = prep(src, tokenizer, tmp_path, val_fraction=0.3)
    assert meta["files"] == 3
    train, val = decoded_docs(tokenizer, folder, "train"), decoded_docs(tokenizer, folder, "val")
    assert sorted(train + val) == sorted(texts[:3])
    assert len(val) == 1


def test_glob_source(texts, tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(texts[i], encoding="utf-8")
    (src / "skip.md").write_text("not matched", encoding="utf-8")
    folder, meta = prep(str(src / "*.txt"), tokenizer, tmp_path, val_fraction=0.25)
    assert meta["files"] == 4
    assert sorted(decoded_docs(tokenizer, folder, "train") + decoded_docs(tokenizer, folder, "val")) \
        == sorted(texts[:4])


def test_jsonl_with_text_field(texts, tokenizer, tmp_path):
    docs = [texts[i] for i in range(6)]
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"id": i, "text": d, "body": f"other {i}"}, ensure_ascii=bool(i % 2))
             for i, d in enumerate(docs)]
    lines.insert(3, "")  # blank lines are skipped
    lines.append(json.dumps({"text": "   "}))  # a blank document is skipped
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.2)
    got = decoded_docs(tokenizer, folder, "train") + decoded_docs(tokenizer, folder, "val")
    assert sorted(got) == sorted(docs)
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tokenizer.encode(d)) + 1 for d in docs)


def test_jsonl_other_text_field(tokenizer, tmp_path):
    docs = [f"Document number {i}.\nIt has two lines, ünïcode and 😀." for i in range(5)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"content": d, "text": 0}) + "\n" for d in docs), encoding="utf-8")
    folder, meta = prep(path, tokenizer, tmp_path, text_field="content", val_fraction=0.2)
    got = decoded_docs(tokenizer, folder, "train") + decoded_docs(tokenizer, folder, "val")
    assert sorted(got) == sorted(docs)
    # the default field holds numbers here, not text
    with pytest.raises(UserError, match="not a string"):
        prep(path, tokenizer, tmp_path, name="out2")


def test_endoftext_lines_separate_documents(texts, tokenizer, tmp_path):
    docs = [texts[0], texts[1], "A short one that mentions <|endoftext|> inside a line.", texts[2]]
    path = tmp_path / "dump.txt"
    # GPT-2 dump style, with a trailing separator and blank lines after it
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in docs) + "\n\n", encoding="utf-8")
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.25)
    got = decoded_docs(tokenizer, folder, "train") + decoded_docs(tokenizer, folder, "val")
    assert sorted(got) == sorted(d + "\n" for d in docs)
    assert meta["train_documents"] + meta["val_documents"] == len(docs)
    assert meta["val_documents"] == 1


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_single_document_is_split_at_a_line_boundary(texts, tokenizer, tmp_path, suffix):
    doc = "\n".join(texts[:4])
    assert doc.count("\n") > 50
    path = tmp_path / f"one{suffix}"
    path.write_text(doc if suffix == ".txt" else json.dumps({"text": doc}) + "\n", encoding="utf-8")
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.1)
    train, val = read_split(folder, "train"), read_split(folder, "val")
    assert meta["train_documents"] == meta["val_documents"] == 1
    assert train[-1] == EOS_ID and val[-1] == EOS_ID
    assert (train == EOS_ID).sum() == 1 and (val == EOS_ID).sum() == 1
    train_text, val_text = tokenizer.decode(train[:-1]), tokenizer.decode(val[:-1])
    assert val_text.strip()
    assert train_text + val_text == doc  # nothing lost, nothing added at the chunk cuts
    assert train_text.endswith("\n")  # cut at a line boundary
    assert 0.05 < len(val_text) / len(doc) < 0.2  # about the last val_fraction
    assert meta["train_tokens"] + meta["val_tokens"] == len(tokenizer.encode(doc)) + 2


def test_invalid_utf8_is_replaced_and_counted(tokenizer, tmp_path):
    path = tmp_path / "mixed.txt"
    # 1 + 2 + 1 + 1 invalid bytes: a lone 0xFF, a truncated 3-byte sequence, a lone continuation
    # byte and a lead byte cut by the newline; a real U+FFFD in the text is not counted
    path.write_bytes(b"clean line\n"
                     b"bad \xff byte\n"
                     b"truncated \xe2\x82 euro\n"
                     b"stray \x80 continuation\n"
                     b"cut lead \xc3\n"
                     + "genuine \ufffd and naïve\n".encode("utf-8"))
    folder, meta = prep(path, tokenizer, tmp_path, val_fraction=0.1)
    assert meta["replaced_invalid_utf8"] == 5
    text = "".join(tokenizer.decode(ids) for s in ("train", "val") for ids in split_at_eos(read_split(folder, s)))
    assert text == path.read_bytes().decode("utf-8", errors="replace")
    assert text.count("\ufffd") == 5


# ----------------------------------------------------------------------------- bad input
def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "does_not_exist.txt", "does not exist"),
    "empty_file": (lambda d: _write(d / "empty.txt", b""), "empty"),
    "whitespace_file": (lambda d: _write(d / "blank.txt", b"  \n\n\t\n"), "no text"),
    "empty_folder": (lambda d: (d / "nothing").mkdir() or d / "nothing", "no files"),
    "binary": (lambda d: _write(d / "x.txt", b"some text\x00\x01\x02 then more"), "binary"),
    "binary_in_folder": (lambda d: (_write(d / "f" / "a.txt", b"fine text\n"),
                                    _write(d / "f" / "b.bin", b"\x89PNG\x00\x00"))[0].parent, "binary"),
    "bad_json": (lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n\n{"text": oops}\n'), ":3:"),
    "missing_field": (lambda d: _write(d / "x.jsonl", b'{"text": "ok"}\n{"txt": "no"}\n'), ":2:"),
    "json_not_object": (lambda d: _write(d / "x.jsonl", b'["text"]\n'), ":1:"),
    "glob_no_match": (lambda d: d / "*.nothing", "matches no files"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_user_error(tokenizer, tmp_path, name):
    make, fragment = BAD_INPUTS[name]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in")
    with pytest.raises(UserError, match=re.escape(fragment)) as err:
        prep(source, tokenizer, tmp_path)
    assert "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "out" / "train.bin")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1])
def test_bad_val_fraction(corpus_dir, tokenizer, tmp_path, val_fraction):
    with pytest.raises(UserError, match="--val_fraction"):
        prep(corpus_dir, tokenizer, tmp_path, val_fraction=val_fraction)


# ----------------------------------------------------------------------------- BlockSource
def test_batches_are_deterministic(prepared):
    folder, _ = prepared
    a = BlockSource(folder, "train", seq_len=32, batch_size=8, seed=1)
    b = BlockSource(folder, "train", seq_len=32, batch_size=8, seed=1)
    x = a.batch(5, 0)
    assert x.dtype.is_floating_point is False and x.shape == (8, 33)
    assert (x == b.batch(5, 0)).all()
    others = [a.batch(6, 0), a.batch(5, 1), BlockSource(folder, "train", 32, 8, seed=2).batch(5, 0),
              BlockSource(folder, "train", 32, 8, seed=1, rank=1).batch(5, 0)]
    for y in others:
        assert not (x == y).all()


def test_a_batch_is_a_pure_function_of_its_step(prepared):
    """batch(step) depends on the step alone, not on which batches were drawn before (a resumed
    run draws step 5 first; an uninterrupted one draws it after steps 0..4)."""
    folder, _ = prepared

    def fresh():
        return BlockSource(folder, "train", seq_len=32, batch_size=8, seed=1)
    want = fresh().batch(5, 1)
    source = fresh()
    assert np.array_equal(source.batch(5, 1), want)
    assert not np.array_equal(source.batch(3, 1), want)
    assert np.array_equal(source.batch(5, 1), want)             # again, after another step
    other = fresh()
    for step in (0, 1, 2, 3):
        other.batch(step, 0)
        other.batch(step, 1)
    assert np.array_equal(other.batch(5, 1), want)              # after a run of steps


def test_batch_rows_are_contiguous_windows(prepared):
    folder, _ = prepared
    for split in ("train", "val"):
        tokens = read_split(folder, split).astype(np.int64)
        src = BlockSource(folder, split, seq_len=24, batch_size=6, seed=3)
        windows = np.lib.stride_tricks.sliding_window_view(tokens, 25)
        for step in range(3):
            for row in src.batch(step).numpy():
                assert (windows == row).all(axis=1).any()


def _arange_corpus(tmp_path, n: int) -> str:
    """A fake prepared folder whose token at offset i is i, so a row's first token is its start."""
    folder = tmp_path / "arange"
    folder.mkdir()
    np.arange(n, dtype=np.uint16).tofile(folder / "train.bin")
    (folder / "val.bin").write_bytes(b"")
    (folder / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    return str(folder)


def test_window_starts_cover_the_data_uniformly(tmp_path):
    n, T, B, steps = 1000, 7, 64, 200
    src = BlockSource(_arange_corpus(tmp_path, n), "train", seq_len=T, batch_size=B, seed=0)
    rows = np.concatenate([src.batch(step).numpy() for step in range(steps)])
    assert (rows == rows[:, :1] + np.arange(T + 1)).all()  # windows, nothing wraps around
    starts = rows[:, 0]
    high = n - (T + 1)  # last possible start
    assert starts.min() == 0 and starts.max() == high
    counts = np.bincount(starts * 10 // (high + 1), minlength=10)
    expected = len(starts) / 10
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40  # 9 degrees of freedom: p < 1e-5 for a uniform sampler
    assert len(np.unique(starts)) > 0.9 * (high + 1)


def test_split_too_short_raises_user_error(prepared, tmp_path):
    folder, meta = prepared
    n = meta["val_tokens"]
    BlockSource(folder, "val", seq_len=n - 2, batch_size=2)  # just long enough
    for seq_len in (n - 1, n, 10 * n):
        with pytest.raises(UserError, match="val split"):
            BlockSource(folder, "val", seq_len=seq_len, batch_size=2)
    # an empty split file (numpy cannot even map it) is the same user error
    with pytest.raises(UserError, match="0 tokens"):
        BlockSource(_arange_corpus(tmp_path, 100), "val", seq_len=4, batch_size=2)


def test_block_source_without_prepared_data(tmp_path, prepared):
    with pytest.raises(UserError, match="no prepared data in"):
        BlockSource(str(tmp_path), "train", seq_len=8, batch_size=2)
    folder, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    os.remove(copy / "meta.json")
    with pytest.raises(UserError, match="no prepared data in"):
        BlockSource(str(copy), "train", seq_len=8, batch_size=2)


def test_data_package_imports_one_way():
    """No two modules of minilm/data import each other (at the top or inside a function): the
    package reads from the bottom (reading.py) up, with no circle to untangle."""
    import ast
    import glob
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minilm", "data")
    imports = {}
    for path in glob.glob(os.path.join(folder, "*.py")):
        name = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        imports[name] = {node.module.rsplit(".", 1)[-1] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module
                         and node.module.startswith("minilm.data.")}
    circles = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports.get(b, ()))
    assert circles == []
