"""Row data (minilm/data/rows.py): tables prepared once into token files plus an (n_rows,
n_columns, 2) index. The stratified split's exact counts, the label order, the one-line errors, the
skipped rows, RowTable.cells against plain Python slicing, and --val_data taken as it is."""
from __future__ import annotations

import numpy as np
import pytest

from minilm.data import RowTable, prepare_rows
from minilm.data.rows import label_order
from minilm.errors import UserError
from minilm.tokenizer import PAD_ID

WORDS = "apple river stone cloud music garden window paper silver forest candle ocean".split()


def write_tsv(path, rows, header=("text", "label")):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(row) + "\n")
    return str(path)


def text_of(i: int) -> str:
    """A different text for every i, of 1 to 6 words."""
    return " ".join(WORDS[(i * 7 + k * 5) % len(WORDS)] for k in range(1 + i % 6))


def prepare(tmp_path, source, tokenizer, logs=None, **kwargs):
    return prepare_rows(source, tokenizer, str(tmp_path / "data"), columns=[("text", "--text_field")],
                        label_column="label", num_workers=1, log=(logs.append if logs is not None else lambda _: None),
                        **kwargs)


def test_stratified_split_gives_each_class_its_exact_share(tmp_path, tokenizer):
    # a: 20 rows, b: 10, c: 3, d: 1 (it stays in training: a class keeps one row there)
    labels = ["a"] * 20 + ["b"] * 10 + ["c"] * 3 + ["d"]
    rows = [(text_of(i), label) for i, label in enumerate(labels)]
    meta = prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, val_fraction=0.2)
    names = meta["labels"]
    assert names == ["a", "b", "c", "d"]
    val = RowTable(str(tmp_path / "data"), "val")
    train = RowTable(str(tmp_path / "data"), "train")
    # round(0.2 * n) per class, at most n - 1: a 4, b 2, c round(0.6) = 1, d 0
    assert np.bincount(val.labels, minlength=4).tolist() == [4, 2, 1, 0]
    assert np.bincount(train.labels, minlength=4).tolist() == [16, 8, 2, 1]
    assert meta["val_rows"] == 7 and meta["train_rows"] == 27


def test_label_order_is_numeric_when_every_label_is_a_number(tmp_path, tokenizer):
    assert label_order(["10", "2", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["-1", "0.5", "3"]) == ["-1", "0.5", "3"]
    assert label_order(["b", "10", "a", "2"]) == ["10", "2", "a", "b"]      # one non-number: plain strings
    rows = [(text_of(i), label) for i, label in enumerate(["10", "2", "1"] * 4)]
    meta = prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, val_fraction=0.25)
    assert meta["labels"] == ["1", "2", "10"]
    train = RowTable(str(tmp_path / "data"), "train")
    assert train.label_names == ["1", "2", "10"]
    # ids follow that order: the label "10" is id 2
    assert sorted(set(train.labels.tolist())) == [0, 1, 2]


def test_validation_label_unseen_in_training_is_one_line(tmp_path, tokenizer):
    train = write_tsv(tmp_path / "train.tsv", [(text_of(i), "ab"[i % 2]) for i in range(6)])
    val = write_tsv(tmp_path / "val.tsv", [(text_of(1), "a"), (text_of(2), "zebra")])
    with pytest.raises(UserError, match=r"label 'zebra', which no training row has") as err:
        prepare(tmp_path, train, tokenizer, val_source=val)
    assert "\n" not in str(err.value)


def test_rows_with_an_empty_cell_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [(text_of(i), "ab"[i % 2]) for i in range(10)]
    rows[3] = ("   ", "a")          # only whitespace: no text
    rows[6] = (text_of(6), " ")     # no label
    logs: list[str] = []
    meta = prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, logs=logs, val_fraction=0.2)
    assert meta["skipped_rows"] == 2
    assert meta["train_rows"] + meta["val_rows"] == 8
    assert any("2 rows with an empty cell skipped" in line for line in logs), logs


def test_cells_equal_python_slices(tmp_path, tokenizer):
    rows = [(text_of(i) + " " + text_of(i + 3), "ab"[i % 2]) for i in range(40)]
    prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, val_fraction=0.1)
    table = RowTable(str(tmp_path / "data"), "train")
    tokens = [int(t) for t in table.tokens]
    picked = np.random.default_rng(0).integers(0, len(table), size=25)
    for width, offset in ((3, 0), (8, 0), (64, 0), (4, 2)):
        ids, lengths = table.cells(picked, 0, width, offset)
        for row, got, length in zip(picked, ids.tolist(), lengths.tolist()):
            start, n = int(table.starts[row, 0]), int(table.lengths[row, 0])
            cell = tokens[start:start + n][offset:offset + width]
            assert got == cell + [PAD_ID] * (width - len(cell))
            assert length == len(cell)


def test_val_data_is_used_as_it_is(tmp_path, tokenizer):
    train_rows = [(text_of(i), "abc"[i % 3]) for i in range(12)]
    val_rows = [(text_of(100 + i), label) for i, label in enumerate("cabbac")]
    meta = prepare(tmp_path, write_tsv(tmp_path / "train.tsv", train_rows), tokenizer,
                   val_source=write_tsv(tmp_path / "val.tsv", val_rows))
    train = RowTable(str(tmp_path / "data"), "train")
    val = RowTable(str(tmp_path / "data"), "val")
    assert meta["train_rows"] == 12 and meta["val_rows"] == 6      # no split of --data at all
    assert [meta["labels"][i] for i in val.labels] == list("cabbac")   # every row, in file order
    assert [meta["labels"][i] for i in train.labels] == [label for _, label in train_rows]
    for row, (text, _) in enumerate(val_rows):
        ids, length = val.cells(np.array([row]), 0, 64)
        assert ids[0, :length[0]].tolist() == tokenizer.encode(text)


def test_json_lines_and_a_json_array_give_the_same_rows_as_a_tsv(tmp_path, tokenizer):
    """The same table as .tsv, .jsonl and a .json array: the same labels and the same tokens;
    a numeric JSON label is read as its JSON spelling, a row that is no object is one line."""
    import json
    rows = [(text_of(i), str(i % 3)) for i in range(30)]
    tsv = write_tsv(tmp_path / "t.tsv", rows)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": int(label), "other": 1}) + "\n" for t, label in rows))
    array = tmp_path / "t.json"
    array.write_text(json.dumps([{"text": t, "label": label} for t, label in rows]))
    tables = []
    for name, source in (("tsv", tsv), ("jsonl", str(jsonl)), ("json", str(array))):
        prepare(tmp_path / name, source, tokenizer, val_fraction=0.2)
        table = RowTable(str(tmp_path / name / "data"), "train")
        tables.append((table.label_names, table.labels.tolist(), [int(t) for t in table.tokens]))
    assert tables[0] == tables[1] == tables[2]
    assert tables[0][0] == ["0", "1", "2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n42\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: a row must be a JSON object with named fields"):
        prepare(tmp_path / "bad", str(bad), tokenizer)


def test_a_class_always_keeps_a_training_row(tmp_path, tokenizer):
    """round(0.6 * 1) = 1 would send a one-row class to validation whole; it stays in training."""
    labels = ["a"] * 5 + ["b"]
    rows = [(text_of(i), label) for i, label in enumerate(labels)]
    prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, val_fraction=0.6)
    train = RowTable(str(tmp_path / "data"), "train")
    val = RowTable(str(tmp_path / "data"), "val")
    assert np.bincount(train.labels, minlength=2).tolist() == [2, 1]
    assert np.bincount(val.labels, minlength=2).tolist() == [3, 0]
