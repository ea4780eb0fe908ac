"""Evaluating a classifier on a labelled file without training (Model.evaluate, sample.py
--evaluate): the numbers are the hand computation's on a small file, every row is classified as
classify() classifies it, the file is read as training reads labelled rows, and bad input (a label
the model does not know, a missing column, a checkpoint that is no classifier) is one line."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import minilm
from minilm.errors import UserError
from tests.conftest import run_in_process
from tests.test_api import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LABELS = ["food", "space", "sport"]   # save_tiny's classifier's labels, in id order
# (text, true label, the prediction the test's stand-in head makes for that row, in row order)
ROWS = [("Add the flour.", "food", "food"), ("Stir the soup.", "food", "food"), ("Bake the bread.", "food", "space"),
        ("The rocket rose.", "space", "space"), ("A comet passed.", "space", "sport"),
        ("The match ended in a draw.", "sport", "sport")]


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    return {name: save_tiny(folder / f"{name}.pt", name, tokenizer) for name in ("classify", "mlm")}


def write_rows(path, rows, text_field="text", label_field="label") -> str:
    """rows of (text, label) as a .tsv, .csv or .jsonl file, by the name's extension."""
    path = str(path)
    if path.endswith(".jsonl"):
        lines = [json.dumps({text_field: text, label_field: label}) for text, label in rows]
    else:
        sep = "\t" if path.endswith(".tsv") else ","
        lines = [f"{text_field}{sep}{label_field}"] + [f'"{text}"{sep}{label}' if sep == "," else f"{text}{sep}{label}"
                                                       for text, label in rows]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def planned_head(model, predictions: list[str]):
    """Make the classifier predict `predictions`, row after row in file order (one-hot logits),
    through the objective's own logits(), whatever the batch size."""
    planned = iter([LABELS.index(label) for label in predictions])

    def logits(input_ids, lengths):
        return F.one_hot(torch.tensor([next(planned) for _ in range(input_ids.shape[0])]), len(LABELS)).float()
    model.objective.logits = logits


@pytest.mark.parametrize("extension", ["tsv", "csv", "jsonl"])
def test_the_numbers_are_the_hand_computation_s(extension, checkpoints, tmp_path):
    """6 rows (and two skipped: an empty text, an empty label); true x predicted:
         food:  food food space        space: space sport        sport: sport
    confusion [[2 1 0] [0 1 1] [0 0 1]], accuracy 4/6; precision food 2/2, space 1/2, sport 1/2;
    recall food 2/3, space 1/2, sport 1/1; F1 4/5, 1/2, 2/3, macro-F1 their mean."""
    rows = [(text, label) for text, label, _ in ROWS[:3]] + [("", "food"), ("No label here.", " ")] + \
        [(text, f" {label} ") for text, label, _ in ROWS[3:]]        # a label is read stripped, as in training
    path = write_rows(tmp_path / f"rows.{extension}", rows)
    model = minilm.load(checkpoints["classify"], device="cpu")
    planned_head(model, [prediction for _, _, prediction in ROWS])
    result = model.evaluate(path, batch_size=4)
    assert (result.rows, result.skipped, result.labels) == (6, 2, LABELS)
    assert result.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.precision == pytest.approx({"food": 1.0, "space": 0.5, "sport": 0.5})
    assert result.recall == pytest.approx({"food": 2 / 3, "space": 0.5, "sport": 1.0})
    assert result.macro_f1 == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    report = result.report()
    assert report.startswith(f"6 rows of {path} (2 skipped: an empty text or label)\naccuracy  0.6667\n"
                             f"macro-F1  {(4 / 5 + 1 / 2 + 2 / 3) / 3:.4f}\n")
    assert "\nlabel  precision  recall    rows\nfood      1.0000  0.6667       3\nspace     0.5000  0.5000       2\n" \
           "sport     0.5000  1.0000       1\nconfusion matrix (rows: true label, columns: predicted):\n" in report
    assert report.endswith(" food |     2     1     0\nspace |     0     1     1\nsport |     0     0     1")


def test_a_label_never_predicted_or_never_true_has_no_precision_or_recall(checkpoints, tmp_path):
    """Precision of a label nothing was predicted as, recall of a label no row has: None ("-"); a
    label absent from both is left out of macro-F1 (confusion_metrics)."""
    path = write_rows(tmp_path / "rows.tsv", [("Add the flour.", "food"), ("The rocket rose.", "space")])
    model = minilm.load(checkpoints["classify"], device="cpu")
    planned_head(model, ["food", "food"])
    result = model.evaluate(path)
    assert result.precision == {"food": 0.5, "space": None, "sport": None}
    assert result.recall == {"food": 1.0, "space": 0.0, "sport": None}
    assert result.macro_f1 == pytest.approx((2 / 3 + 0.0) / 2)
    assert "\nspace          -  0.0000       1\nsport          -       -       0\n" in result.report()


def test_every_row_is_classified_as_classify_classifies_it(checkpoints, tmp_path):
    """The real head, no stand-in: each row's prediction is classify()'s best label, whatever the
    batch size; a text past the window keeps its first tokens, as in classify() and training."""
    model = minilm.load(checkpoints["classify"], device="cpu")
    texts = [text for text, _, _ in ROWS] + [" ".join(["word"] * 60)]
    truth = [label for _, label, _ in ROWS] + ["food"]
    path = write_rows(tmp_path / "rows.jsonl", list(zip(texts, truth)))
    best = [ranked[0][0] for ranked in model.classify(texts)]
    expected = torch.zeros(3, 3, dtype=torch.long)
    for true, predicted in zip(truth, best):
        expected[LABELS.index(true), LABELS.index(predicted)] += 1
    for batch_size in (1, 3, 64):
        assert torch.equal(model.evaluate(path, batch_size=batch_size).confusion, expected)


def test_bad_input_is_a_one_line_error(checkpoints, tmp_path):
    model = minilm.load(checkpoints["classify"], device="cpu")
    unknown = write_rows(tmp_path / "unknown.tsv", [("Add the flour.", "food"), ("A goal.", "football"),
                                                    ("A save.", "football"), ("Rain.", "weather")])
    cases = [
        (lambda: model.evaluate(unknown), r"unknown.tsv has labels the model does not know: 'football' \(2 rows\), "
                                          r"'weather' \(1 row\); it predicts food, space, sport"),
        (lambda: model.evaluate(unknown, label_field="tag"), r"has no column 'tag' \(its columns: text, label\); "
                                                             r'pass label_field="NAME"'),
        (lambda: model.evaluate(str(tmp_path / "missing.tsv")), r"^evaluate\(\): \S+missing.tsv does not exist"),
        (lambda: model.evaluate(write_rows(tmp_path / "empty.tsv", [("", "food")])),
         r"empty.tsv has no row to evaluate \(1 skipped"),
        (lambda: model.evaluate(None), r"^path must be a labelled .tsv/.csv/.jsonl file"),
        (lambda: model.evaluate(unknown, text_field=3), r"^text_field must be a str, got 3"),
        (lambda: model.evaluate(unknown, batch_size=0), r"^batch_size must be >= 1, got 0"),
        (lambda: minilm.load(checkpoints["mlm"], device="cpu").evaluate(unknown),
         r"^evaluate\(\) needs a classifier checkpoint \(--objective classify\); .*encoder \(mlm\): use fill\("),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- sample.py --evaluate
def sample(*args):
    return run_in_process("sample.py", *args, "--device", "cpu")


def test_sample_py_prints_the_evaluation(checkpoints, tmp_path):
    path = write_rows(tmp_path / "rows.csv", [(text, label) for text, label, _ in ROWS], text_field="sentence",
                      label_field="topic")
    result = sample("--ckpt", checkpoints["classify"], "--evaluate", path, "--text_field", "sentence",
                    "--label_field", "topic")
    assert result.returncode == 0, result.stderr
    expected = minilm.load(checkpoints["classify"], device="cpu").evaluate(path, text_field="sentence",
                                                                         label_field="topic")
    assert result.stdout == expected.report() + "\n"


@pytest.mark.parametrize("flags, message", [
    (["--label_field", "tag"], r"has no column 'tag' \(its columns: text, label\); pass --label_field NAME"),
    ([], r"has labels the model does not know: 'football' \(1 row\)"),
    (["--ckpt_is_mlm"], r"--evaluate needs a classifier checkpoint \(--objective classify\); .*\(mlm\): use --fill"),
    (["--classify", "a text"], r"--classify \(classifiers\) and --evaluate \(classifiers\) exclude each other"),
    (["--text_field_alone"], r"--text_field and --label_field name the columns of --evaluate's file"),
])
def test_sample_py_refuses_bad_input_in_one_line(flags, message, checkpoints, tmp_path):
    path = write_rows(tmp_path / "rows.tsv", [("Add the flour.", "food"), ("A goal.", "football")])
    ckpt = checkpoints["mlm" if "--ckpt_is_mlm" in flags else "classify"]
    if "--text_field_alone" in flags:
        args = ["--ckpt", ckpt, "--prompt", "a", "--text_field", "sentence"]
    else:
        args = ["--ckpt", ckpt, "--evaluate", path] + [f for f in flags if f != "--ckpt_is_mlm"]
    result = sample(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
