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


def test_stratified_split_statistics_every_validation_label_is_trained():
    """Over many label distributions (a long tail of one-row classes, a few large ones, all
    classes tiny) and fractions: every validation label keeps a training row, each class gives
    exactly min(round(f * n), n - 1) rows when any class gives one, else one row of each of the
    largest classes; only data of one-row classes alone gets no validation row."""
    from minilm.data.rows import _stratified_val
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_classes = int(rng.integers(1, 60))
        sizes = np.minimum(rng.zipf(1.6 + rng.random(), size=n_classes), 500)
        if trial % 5 == 0:
            sizes = rng.integers(1, 4, size=n_classes)      # every class tiny
        labels = rng.permutation(np.repeat(np.arange(n_classes), sizes))
        f = float(rng.choice([0.01, 0.05, 0.1, 0.3, 0.6, 0.9]))
        is_val = _stratified_val(labels, f)
        val_count = np.bincount(labels[is_val], minlength=n_classes)
        train_count = np.bincount(labels[~is_val], minlength=n_classes)
        assert (train_count >= 1).all()                              # every label is trained
        shares = np.minimum(np.round(f * sizes).astype(int), sizes - 1)
        if shares.sum() > 0:
            assert val_count.tolist() == shares.tolist()
        elif (sizes >= 2).any():
            assert set(val_count.tolist()) <= {0, 1}
            assert val_count.sum() == min(max(1, round(f * len(labels))), int((sizes >= 2).sum()))
            picked = sizes[val_count == 1]
            assert picked.min() >= max(sizes[(val_count == 0) & (sizes >= 2)], default=2)   # the largest ones
        else:
            assert not is_val.any()


@pytest.mark.parametrize("labels, message", [
    ([str(i) for i in range(3000)], r"has a single row of each of its 3000 labels.*--val_data FILE$"),
    (["a", "b"], r"has a single row of each of its 2 labels"),
    (["a"] * 6, r"has rows of one label only \('a' in --label_field 'label'\); a classifier needs two labels"),
])
def test_a_split_that_cannot_train_every_validation_label_is_one_line(tmp_path, tokenizer, labels, message):
    rows = [(text_of(i), label) for i, label in enumerate(labels)]
    with pytest.raises(UserError, match=message) as err:
        prepare(tmp_path, write_tsv(tmp_path / "t.tsv", rows), tokenizer, val_fraction=0.05)
    assert "\n" not in str(err.value)


def test_one_training_label_with_val_data_is_one_line(tmp_path, tokenizer):
    train = write_tsv(tmp_path / "train.tsv", [(text_of(i), "a") for i in range(6)])
    val = write_tsv(tmp_path / "val.tsv", [(text_of(1), "a")])
    with pytest.raises(UserError, match=r"has rows of one label only \('a'"):
        prepare(tmp_path, train, tokenizer, val_source=val)


def test_label_order_is_a_total_order_with_nan_and_inf_spellings():
    """nan is no number (every comparison with it is False, so a numeric sort of it depended on the
    order the names came in, hence on PYTHONHASHSEED); inf and -inf are. The rule, for every order."""
    import itertools
    for names in itertools.permutations(["10", "nan", "2", "inf", "-inf"]):
        assert label_order(names) == ["-inf", "10", "2", "inf", "nan"]        # not all numbers: strings
    for names in itertools.permutations(["10", "inf", "2", "-inf", "1.0", "1"]):
        assert label_order(names) == ["-inf", "1", "1.0", "2", "10", "inf"]   # all numbers: by value
    for names in itertools.permutations(["NaN", "nan", "3"]):
        assert label_order(names) == ["3", "NaN", "nan"]



@pytest.mark.parametrize("suffix, sep", [(".tsv", "\t"), (".csv", ",")])
def test_a_header_naming_a_read_column_twice_is_one_line(tmp_path, tokenizer, suffix, sep):
    path = tmp_path / f"t{suffix}"
    path.write_text(sep.join(["text", "label", "text"]) + "\n"
                    + "".join(sep.join([text_of(i), "ab"[i % 2], "other"]) + "\n" for i in range(8)))
    with pytest.raises(UserError, match=rf"t{suffix} has 2 columns named 'text' \(columns 1 and 3 of its header\), "
                                        r"which --text_field names; rename all but one") as err:
        prepare(tmp_path, str(path), tokenizer)
    assert "\n" not in str(err.value)


def pair_table(path, fields, rows):
    """A table of `fields` as .tsv (a header) or .jsonl (one object per row)."""
    import json
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(dict(zip(fields, row))) + "\n" for row in rows))
    else:
        write_tsv(path, rows, header=fields)
    return str(path)


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
@pytest.mark.parametrize("kind, flags, wrong", [
    ("labelled", ["--text_field", "txt"], "--text_field"),
    ("labelled", ["--label_field", "lable"], "--label_field"),
    ("pairs", ["--pair_field", "positiv"], "--pair_field"),
    ("pairs", ["--pair_field", "positive", "--negative_field", "negativ"], "--negative_field"),
    ("parallel", ["--text_field", "en", "--pair_field", "frr"], "--pair_field"),
])
def test_every_column_a_flag_names_must_exist(tmp_path, tokenizer, suffix, kind, flags, wrong):
    """A misspelt column is a one-line error naming its flag, also an optional one (a hard negative,
    which a row may leave empty): a typo must not train without it."""
    from minilm.config import parse_overrides
    from minilm.data import SOURCES
    fields = {"labelled": ("text", "label"), "pairs": ("text", "positive", "negative"),
              "parallel": ("en", "fr")}[kind]
    rows = [tuple(text_of(i + k) if name != "label" else "ab"[i % 2] for k, name in enumerate(fields))
            for i in range(8)]
    source = pair_table(tmp_path / f"t{suffix}", fields, rows)
    columns, optional, label = SOURCES[kind].row_columns(parse_overrides(flags).data)
    with pytest.raises(UserError, match=rf"{wrong} NAME to read another") as err:
        prepare_rows(source, tokenizer, str(tmp_path / "data"), columns=columns, optional=optional,
                     label_column=label, num_workers=1, log=lambda _: None)
    assert "\n" not in str(err.value)


def test_a_hard_negative_column_some_rows_leave_out_is_read(tmp_path, tokenizer):
    """The other side of the rule above: a JSON row may leave an optional field out, or null."""
    import json
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": text_of(i), "positive": text_of(i + 1),
                                        **({"negative": text_of(i + 2)} if i % 3 == 0 else
                                           {"negative": None} if i % 3 == 1 else {})}) + "\n" for i in range(9)))
    meta = prepare_rows(str(path), tokenizer, str(tmp_path / "data"), optional={"negative"},
                        columns=[("text", "--text_field"), ("positive", "--pair_field"), ("negative", "--negative_field")],
                        num_workers=1, log=lambda _: None)
    assert meta["train_rows"] + meta["val_rows"] == 9 and meta["skipped_rows"] == 0


def test_short_tsv_rows_and_json_nulls_are_skipped_and_counted(tmp_path, tokenizer):
    """A .tsv row without its label cell, and JSON rows whose label or text is null, are skipped and
    counted like an empty cell, not a crash and not an error."""
    import json
    rows = [(text_of(i), "ab"[i % 2]) for i in range(10)]
    tsv = tmp_path / "t.tsv"
    write_tsv(tsv, rows)
    with open(tsv, "a", encoding="utf-8") as f:
        f.write("a text and no label cell\n" + "\n".join("\t".join(row) for row in rows[:2]) + "\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows)
                     + json.dumps({"text": "a text", "label": None}) + "\n"
                     + json.dumps({"text": None, "label": "a"}) + "\n")
    for source, kept in ((tsv, 12), (jsonl, 10)):
        logs: list[str] = []
        meta = prepare(tmp_path / source.suffix[1:], str(source), tokenizer, logs=logs, val_fraction=0.2)
        skipped = 13 - kept if source == tsv else 2
        assert meta["skipped_rows"] == skipped and meta["train_rows"] + meta["val_rows"] == kept
        assert any(f"{skipped} row{'s' if skipped > 1 else ''} with an empty cell skipped" in line for line in logs)


def test_a_json_row_naming_a_read_field_twice_is_one_line(tmp_path, tokenizer):
    """json keeps the last of two equal keys; which one the user meant is unknowable. A field that
    is not read may repeat."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(f'{{"text": "{text_of(i)}", "label": "{"ab"[i % 2]}", "x": 1, "x": 2}}\n'
                            for i in range(6)) + '{"text": "one", "label": "a", "text": "two"}\n')
    with pytest.raises(UserError, match=r"t.jsonl:7: this row has the field 'text', which --text_field names, twice"):
        prepare(tmp_path, str(path), tokenizer)
