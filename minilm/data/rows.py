"""Row data: tables whose every row is one example (labelled text, a translation pair, an anchor
with its positive), tokenized once into token files with an offsets index.

    prepare_rows(source, tokenizer, folder, columns=[("text", "--text_field")], label_column="label")
        -> folder/train.bin, folder/val.bin      the tokens of every cell, row after row, no <eos>
           folder/train.rows.npy, val.rows.npy   int64 (n_rows, n_columns, 2): (start, length) of
                                                 each cell in the split's .bin
           folder/train.labels.npy, ...          int64 (n_rows,) label ids, when there is a label
           folder/meta.json                      + columns, labels (id -> name), rows per split
    RowTable(folder, "train")                    the split, memory-mapped, with .cells(rows, column, width)

The label names are sorted (label_order: numerically when every label is a number, else as
strings), so the same file gives the same ids on every machine and in every process; they are
stored in meta.json and, by the objective, in the checkpoint. A classifier needs two labels or more.

The validation split: --val_data names a file of its own; else, with labels, a stratified split:
each class gives round(val_fraction * its rows) rows, evenly spaced through that class (at least
one row of a class stays in training); when that gives no row at all, the largest classes of two
rows or more give one row each. Without labels, evenly spaced rows. A validation label that no
training row has is an error (the model could never predict it), so data whose every label has a
single row cannot be split: it needs --val_data.

A row with an empty required cell (only whitespace, a JSON null, or a .tsv/.csv row too short to
reach the column) is skipped and counted in meta.json's skipped_rows and the log line, never
silently dropped, never a crash.
"""
from __future__ import annotations

import math
import os

import numpy as np

from minilm.data.preparation import (
    _encoder,
    _jobs,
    _publish,
    inspect_prepared,
    token_dtype,
    tokenizer_fingerprint,
    writing_prepared,
)
from minilm.data.reading import (
    PROGRESS_EVERY,
    Progress,
    ReadStats,
    display,
    iter_rows,
    resolve_files,
)
from minilm.errors import UserError
from minilm.tokenizer import PAD_ID, Tokenizer



def _number(name: str) -> float | None:
    """The number a label spells, or None: for a name that is no number, and for nan, which has no
    place in an order (every comparison with it is False)."""
    try:
        value = float(name)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def label_order(names) -> list[str]:
    """The label names in id order: numeric order when every name is a number other than nan ("2"
    before "10", "-inf" first; equal numbers such as "1" and "1.0" by their spelling), else plain
    string order. A total order either way, so the ids never depend on the order of the names."""
    numbers = {name: _number(name) for name in set(names)}
    if all(value is not None for value in numbers.values()):
        return sorted(numbers, key=lambda name: (numbers[name], name))
    return sorted(numbers)


def _stratified_val(labels: np.ndarray, val_fraction: float) -> np.ndarray:
    """A bool mask over rows: per class, round(val_fraction * n) rows, evenly spaced, at most n - 1,
    so every class keeps a training row. When that gives no row at all (every class too small for
    a share), the last row of each of the largest classes of two rows or more, up to
    max(1, round(val_fraction * rows)) rows; none when every class has a single row."""
    is_val = np.zeros(len(labels), dtype=bool)
    _, sizes = np.unique(labels, return_counts=True)
    # each class's rows in file order, one argsort for all classes (not one scan per class)
    members_of = np.split(np.argsort(labels, kind="stable"), np.cumsum(sizes)[:-1])
    for members in members_of:
        n = len(members)
        k = min(round(val_fraction * n), n - 1)
        if k > 0:
            i = np.arange(n)
            is_val[members[(i + 1) * k // n > i * k // n]] = True
    if not is_val.any():
        largest = np.argsort(-sizes, kind="stable")
        for c in largest[sizes[largest] >= 2][:max(1, round(val_fraction * len(labels)))]:
            is_val[members_of[c][-1]] = True
    return is_val


def _even_val(n: int, val_fraction: float) -> np.ndarray:
    k = min(max(1, round(val_fraction * n)), n - 1)
    i = np.arange(n)
    return (i + 1) * k // n > i * k // n


def row_texts(source: str, columns: list[tuple[str, str]], *, optional: set[str] = frozenset(),
              files: list[str] | None = None, log=print, progress_every: float = PROGRESS_EVERY):
    """Every non-empty text cell of the named columns, for Tokenizer.train."""
    progress = Progress(log, "reading text for the tokenizer", every=progress_every)
    for row in iter_rows(source, columns, optional=optional, files=files, progress=progress):
        for cell in row:
            if cell:
                yield cell


def _read_split(source, files, columns, optional, label_column, log, progress_every, what):
    """Pass 1 over one file set: which rows are kept, and their labels (names). Returns
    (keep bool array, label names of kept rows or None, stats)."""
    stats = ReadStats()
    keep, labels = [], []
    cols = columns + ([(label_column, "--label_field")] if label_column else [])
    required = [i for i, (name, _) in enumerate(columns) if name not in optional]
    for row in iter_rows(source, cols, optional=optional, files=files, stats=stats,
                         progress=Progress(log, f"counting rows{what}", every=progress_every)):
        label = (row[-1] or "").strip() if label_column else ""    # None: a short row or a JSON null
        ok = all(row[i] is not None and row[i].strip() for i in required) and (not label_column or label)
        keep.append(ok)
        if ok and label_column:
            labels.append(label)
    return np.array(keep, dtype=bool), (labels if label_column else None), stats


def prepare_rows(source: str, tokenizer: Tokenizer, folder: str, *, columns: list[tuple[str, str]],
                 label_column: str | None = None, optional: set[str] = frozenset(), val_source: str | None = None,
                 val_fraction: float = 0.05, num_workers: int = 0, log=print, files: list[str] | None = None,
                 val_files: list[str] | None = None, extra_meta: dict | None = None,
                 progress_every: float = PROGRESS_EVERY) -> dict:
    """Tokenize the rows of `source` (and of `val_source`, when given, for validation) into
    `folder`; return (and save) the meta. columns: (column name, its flag) of the text cells, in
    the order the source reads them; label_column: the column of string labels, or None."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    files = files if files is not None else resolve_files(source, exclude=folder, log=log)
    keep, labels, count = _read_split(source, files, columns, optional, label_column, log, progress_every, "")
    if not keep.any():
        raise UserError(f"--data {display(source)} holds no row with every column filled "
                        f"({', '.join(name for name, _ in columns)})")
    if val_source:
        val_files = val_files if val_files is not None else resolve_files(val_source, exclude=folder, log=log)
        val_keep, val_labels, val_count = _read_split(val_source, val_files, columns, optional, label_column,
                                                      log, progress_every, " of --val_data")
        if not val_keep.any():
            raise UserError(f"--val_data {display(val_source)} holds no row with every column filled")
    names = label_order(labels) if label_column else None
    if names is not None and len(names) < 2:
        raise UserError(f"--data {display(source)} has rows of one label only ({names[0]!r} in --label_field "
                        f"{label_column!r}); a classifier needs two labels or more: add rows of another label")
    label_id = {name: i for i, name in enumerate(names)} if names else {}
    if val_source:
        unseen = sorted(set(val_labels) - set(label_id)) if label_column else []
        if unseen:
            raise UserError(f"--val_data {display(val_source)} has label {unseen[0]!r}, which no training row has "
                            f"(training labels: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}); "
                            "fix the label or add training rows for it")
        kept_is_val = None
    else:
        if keep.sum() < 2:
            raise UserError(f"--data {display(source)} has {int(keep.sum())} usable row; a validation split needs "
                            "at least 2 (or pass --val_data FILE)")
        kept_ids = np.array([label_id[name] for name in labels]) if label_column else None
        kept_is_val = (_stratified_val(kept_ids, val_fraction) if label_column
                       else _even_val(int(keep.sum()), val_fraction))
        if label_column and not kept_is_val.any():
            raise UserError(f"--data {display(source)} has a single row of each of its {len(names)} labels: no "
                            "row can be held out for validation whose label training still sees; give some "
                            "labels two rows or more, or pass --val_data FILE")

    # pass 2: tokenize each kept row's cells, in order; the encoder keeps the order of the jobs
    def cells(src, fls, keep_mask, is_val_of_kept):
        kept = 0
        for i, row in enumerate(iter_rows(src, columns, optional=optional, files=fls)):
            if i >= len(keep_mask) or not keep_mask[i]:
                continue
            is_val = bool(is_val_of_kept[kept]) if is_val_of_kept is not None else src is val_source
            kept += 1
            for cell in row:
                yield (cell or "", False, is_val)

    def all_cells():
        yield from cells(source, files, keep, kept_is_val)
        if val_source:
            yield from cells(val_source, val_files, val_keep, None)

    n_columns = len(columns)
    split_labels = {False: [], True: []}
    if label_column:
        if val_source:
            split_labels[False] = [label_id[n] for n in labels]
            split_labels[True] = [label_id[n] for n in val_labels]
        else:
            for name, v in zip(labels, kept_is_val):
                split_labels[bool(v)].append(label_id[name])

    os.makedirs(folder, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    paths = {}
    for split, is_val in (("train", False), ("val", True)):
        paths[(is_val, "bin")] = os.path.join(folder, f"{split}.bin")
        paths[(is_val, "rows")] = os.path.join(folder, f"{split}.rows.npy")
        if label_column:
            paths[(is_val, "labels")] = os.path.join(folder, f"{split}.labels.npy")
    tmp = {k: v + ".tmp" for k, v in paths.items()}
    lengths = {False: [], True: []}
    total_chars = count.chars + (val_count.chars if val_source else 0)
    workers = num_workers or os.cpu_count() or 1
    log(f"tokenizing {int(keep.sum()) + (int(val_keep.sum()) if val_source else 0):,} rows "
        f"({total_chars:,} characters) with {workers} worker{'s' if workers > 1 else ''}")
    progress = Progress(log, "tokenizing", total=total_chars, every=progress_every)
    counts = {False: 0, True: 0}
    with _encoder(tokenizer, workers) as encode, writing_prepared(folder, tmp):
        with open(tmp[(False, "bin")], "wb") as train_file, open(tmp[(True, "bin")], "wb") as val_file:
            out = {False: train_file, True: val_file}
            for job_result, chars in encode(_jobs(all_cells())):
                for ids, is_val in job_result:
                    out[is_val].write(ids.astype(dtype).tobytes())
                    counts[is_val] += len(ids)
                    lengths[is_val].append(len(ids))
                progress.add(chars)
        n_rows = {}
        for is_val in (False, True):
            length = np.array(lengths[is_val], dtype=np.int64).reshape(-1, n_columns)
            start = (np.cumsum(length.reshape(-1)) - length.reshape(-1)).reshape(-1, n_columns)
            n_rows[is_val] = len(length)
            _save_npy(tmp[(is_val, "rows")], np.stack([start, length], axis=-1))
            if label_column:
                _save_npy(tmp[(is_val, "labels")], np.array(split_labels[is_val], dtype=np.int64))
        skipped = int((~keep).sum()) + (int((~val_keep).sum()) if val_source else 0)
        meta = dict(vocab_size=tokenizer.vocab_size, dtype=np.dtype(dtype).name, kind="rows",
                    train_tokens=counts[False], val_tokens=counts[True],
                    train_rows=n_rows[False], val_rows=n_rows[True], skipped_rows=skipped,
                    columns=[name for name, _ in columns], label_column=label_column, labels=names,
                    source=source, val_source=val_source or None, chars=total_chars,
                    replaced_invalid_utf8=count.replaced + (val_count.replaced if val_source else 0),
                    tokenizer=tokenizer_fingerprint(tokenizer), **(extra_meta or {}))
        _publish(folder, tmp, paths, tokenizer, meta)
    log(f"prepared {display(source)}: {n_rows[False]:,} train / {n_rows[True]:,} val rows "
        f"({counts[False]:,} / {counts[True]:,} tokens)"
        + (f", {len(names)} labels" if names else "")
        + (f"; {skipped:,} row{'s' if skipped != 1 else ''} with an empty cell skipped" if skipped else ""))
    return meta


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


class RowTable:
    """One split of prepared row data, memory-mapped.

        tokens  (n_tokens,)            every cell's tokens, row after row
        starts, lengths (n_rows, n_columns)
        labels  (n_rows,) int64        when the data has a label column, else None
        label_names                    id -> name
    """

    def __init__(self, folder: str, split: str):
        meta, damage = inspect_prepared(folder)
        if damage is not None:
            raise UserError(f"the prepared data in {display(folder)} is damaged: {damage}; prepare it again")
        if meta is None:
            raise UserError(f"no prepared data in {folder}; run train.py with --data to prepare it")
        if meta.get("kind") != "rows":
            raise UserError(f"{display(folder)} holds running text, not rows of a table; prepare it again "
                            "(a fresh --out_dir)")
        self.meta, self.split = meta, split
        self.columns = list(meta["columns"])
        self.label_names = list(meta.get("labels") or [])
        rows = np.load(os.path.join(folder, f"{split}.rows.npy"))
        self.starts, self.lengths = rows[..., 0], rows[..., 1]
        self.labels = (np.load(os.path.join(folder, f"{split}.labels.npy")) if meta.get("label_column") else None)
        path = os.path.join(folder, f"{split}.bin")
        dtype = np.dtype(meta["dtype"])
        self.tokens = (np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else
                       np.zeros(1, dtype=dtype))   # numpy cannot map an empty file
        if len(self.starts) == 0:
            raise UserError(f"the {split} split of {display(folder)} has no rows; give more rows or raise --val_fraction")

    def __len__(self) -> int:
        return len(self.starts)

    def cells(self, rows: np.ndarray, column: int, width: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The first `width` tokens of one column's cell in each of `rows` (skipping `offset`), as
        (ids (len(rows), width) int64 padded with PAD_ID, lengths (len(rows),)): one fancy-index read."""
        start = self.starts[rows, column] + offset
        length = np.clip(self.lengths[rows, column] - offset, 0, width)
        t = np.arange(width)[None, :]
        idx = np.minimum(start[:, None] + t, len(self.tokens) - 1)
        ids = np.where(t < length[:, None], self.tokens[idx].astype(np.int64), PAD_ID)
        return ids, length.astype(np.int64)
