"""benchmarks/compare_objectives.py's data: the labelled task (which stdlib package a docstring
comes from) and the pretraining corpus without its validation modules. The runs themselves are
train.py's and tested there; what this file pins is that the comparison is honest: balanced
classes, the same task on every run, no text in both splits, no validation text in pretraining."""
from __future__ import annotations

import collections
import csv
import os

import pytest

from minilm.errors import UserError
from tests.conftest import load_benchmark

PACKAGES = ("logging", "unittest", "xml")   # three packages keep the stdlib parse short


compare = load_benchmark("compare_objectives")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    files = compare.prepare_task(str(folder), PACKAGES, labelled_per_class=20, val_per_class=10, seed=3,
                                 log=lambda msg: None)
    return files, compare.build_task(PACKAGES, labelled_per_class=20, val_per_class=10, seed=3)


def read_tsv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["text", "label"]
    return [tuple(row) for row in rows[1:]]


def test_task_is_balanced_deterministic_and_written_as_built(written):
    files, task = written
    assert collections.Counter(label for _, label in task.train) == {p: 20 for p in PACKAGES}
    assert collections.Counter(label for _, label in task.val) == {p: 10 for p in PACKAGES}
    again = compare.build_task(PACKAGES, labelled_per_class=20, val_per_class=10, seed=3)
    assert (again.train, again.val) == (task.train, task.val)
    other = compare.build_task(PACKAGES, labelled_per_class=20, val_per_class=10, seed=4)
    assert set(other.train) != set(task.train)   # the seed draws the rows
    # one row per line, two cells: normalized texts hold no tab or newline
    assert read_tsv(files.train) == task.train and read_tsv(files.val) == task.val


def test_no_text_in_both_splits_and_validation_only_from_held_out_modules(written):
    _, task = written
    train_texts, val_texts = {t for t, _ in task.train}, {t for t, _ in task.val}
    assert len(train_texts) == len(task.train) and len(val_texts) == len(task.val)   # no duplicates
    assert not train_texts & val_texts
    held_out = {t for texts in task.val_modules.values() for t in texts}
    assert val_texts <= held_out and not train_texts & held_out
    for label in PACKAGES:   # each package holds out whole modules of its own
        assert any(module.startswith(label + os.sep) for module in task.val_modules)
    for text, label in task.val:
        assert any(text in texts for module, texts in task.val_modules.items()
                   if module.startswith(label + os.sep))


def test_pretraining_corpus_holds_no_held_out_docstring(written):
    files, task = written
    with open(files.corpus, encoding="utf-8") as f:
        corpus = f.read()
    documents = corpus.split("\n" + compare.DOC_SEPARATOR + "\n")
    flat = compare.normalized(corpus)
    held_out = {t for texts in task.val_modules.values() for t in texts}
    assert held_out and not [text for text in held_out if text in flat]
    # what was dropped is only that: the rest of the built-in corpus, training docstrings included, is there
    assert len(documents) > 300
    assert sum(text in flat for text, _ in task.train) >= 0.9 * len(task.train)


def test_whitespace_does_not_hide_a_held_out_docstring():
    documents = ["Intro.\n\nReturn the   answer,\n    computed once.", "Unrelated text."]
    kept, dropped = compare.pretraining_documents(["Return the answer, computed once."], documents)
    assert (kept, dropped) == (["Unrelated text."], 1)


def test_hold_out_takes_whole_modules_until_validation_is_full_and_leaves_training_enough():
    modules = {f"pkg/m{i}.py": [f"text {i}.{j}" for j in range(size)]
               for i, size in enumerate([5, 30, 4, 6, 8])}
    held = compare.hold_out_modules(modules, val_needed=10, train_needed=20)
    held_count = sum(len(modules[m]) for m in held)
    assert held_count >= 10 and 53 - held_count >= 20
    assert held == compare.hold_out_modules(dict(reversed(modules.items())), 10, 20)   # not the dict's order
    # holding the 30-docstring module would leave training 23 < 30: it stays in training
    assert "pkg/m1.py" not in compare.hold_out_modules(modules, val_needed=10, train_needed=30)


def test_bad_packages_and_sizes_are_one_line_errors():
    with pytest.raises(UserError, match=r"--packages: 'nosuchpackage' is not a package folder"):
        compare.build_task(("logging", "nosuchpackage"), 4, 4)
    with pytest.raises(UserError, match=r"--packages needs at least two different packages"):
        compare.build_task(("logging", "logging"), 4, 4)
    with pytest.raises(UserError, match=r"^logging has \d+ training and \d+ validation docstrings .* lower "
                                        r"--labelled_per_class \(5000\)"):
        compare.build_task(("logging", "xml"), 5000, 4)


def fake_stdlib(root, packages: dict[str, dict[str, list[str]]]) -> str:
    """A folder laid out like the standard library: {package: {module file: [docstrings]}}."""
    for package, modules in packages.items():
        os.makedirs(os.path.join(root, package), exist_ok=True)
        for module, docstrings in modules.items():
            body = "".join(f"def f{i}():\n    {text!r}\n" for i, text in enumerate(docstrings))
            with open(os.path.join(root, package, module), "w", encoding="utf-8") as f:
                f.write(body)
    return str(root)


def test_a_text_of_two_packages_is_dropped_and_one_of_two_splits_stays_in_validation(tmp_path):
    shared_in_a = "This sentence is repeated in every module of package a, word for word."
    in_both = "This sentence is found in package a and in package b, so it has no single label."
    unique = lambda package, module, i: f"Docstring {i} of {package}/{module}, long enough to be kept here."
    layout = {package: {f"m{m}.py": [unique(package, m, i) for i in range(3)] for m in range(4)}
              for package in ("a", "b")}
    for docstrings in layout["a"].values():
        docstrings.append(shared_in_a)
    layout["a"]["m1.py"].append(in_both)
    layout["b"]["m2.py"].append(in_both)
    stdlib = fake_stdlib(tmp_path, layout)
    for seed in range(5):
        task = compare.build_task(("a", "b"), labelled_per_class=9, val_per_class=3, seed=seed, stdlib=stdlib)
        train_texts, val_texts = {t for t, _ in task.train}, {t for t, _ in task.val}
        assert shared_in_a not in train_texts
        assert in_both not in train_texts | val_texts
        assert len(task.val_modules) == 2   # one whole module per package holds 3 texts or more
    with pytest.raises(UserError, match=r"^a has 9 training and 4 validation docstrings"):
        compare.build_task(("a", "b"), labelled_per_class=10, val_per_class=3, stdlib=stdlib)


def test_scratch_differs_from_the_pretrained_rows_in_its_initial_weights_alone(written, tmp_path):
    """The plan: every fine-tuning run of a seed has the same flags but its start; a pretrained
    row starts from its own pretraining run's checkpoint, scratch from random weights with the
    shared tokenizer (--tokenizer) and the pretraining runs' shape."""
    files, _ = written
    args = compare.parse_args(["--budget", "micro", "--work", str(tmp_path), "--objectives", "mlm,rtd"])
    prepare, pretraining, finetuning = compare.plan(["mlm", "rtd"], [1, 2], args.budget_sizes, files, args,
                                                    str(tmp_path))

    def flag(run, name):
        return run.flags[run.flags.index(name) + 1] if name in run.flags else None

    for seed in (1, 2):
        scratch = finetuning["finetune", compare.SCRATCH, seed]
        assert flag(scratch, "--tokenizer") == os.path.join(prepare.out_dir, "tokenizer.model")
        assert flag(scratch, "--init_from") is None
        for objective in ("mlm", "rtd"):
            run = finetuning["finetune", objective, seed]
            assert flag(run, "--init_from") == pretraining[objective, seed].final_checkpoint
            assert flag(run, "--tokenizer") is None   # the parent brings its own, the same one
            for shared in ("--data", "--val_data", "--seed", "--lr", "--batch_size", "--max_steps"):
                assert flag(run, shared) == flag(scratch, shared), shared
        for name in ("--n_layer", "--n_embd", "--seq_len"):
            assert flag(scratch, name) == flag(pretraining["mlm", seed], name), name


# ----------------------------------------------------------------------------- the man-page task
def fake_pages(counts: dict[str, int], extra=()):
    """Pages as speedrun.corpus_pages yields them: {section: how many}, each with a text of its own."""
    pages = [compare_page(f"/man/{section}/p{i}.gz", section, f"NAME p{i} - page {i} of {section}. " + "words " * 80)
             for section, n in counts.items() for i in range(n)]
    return pages + list(extra)


def compare_page(path, section, text):
    import types
    return types.SimpleNamespace(path=path, section=section, package="pkg", text=text)


def test_manpage_task_is_balanced_by_page_and_its_validation_pages_stay_out_of_pretraining(tmp_path):
    counts = {"man1": 30, "man5": 25, "man8": 20}
    copy = compare_page("/man/man1/copy-of-a-val-page.gz", "man1", "")
    pages = fake_pages(counts)
    task = compare.build_manpage_task(pages, ("man1", "man5", "man8"), labelled_per_class=10, val_per_class=5, seed=1)
    assert collections.Counter(label for _, label in task.train) == {"1": 10, "5": 10, "8": 10}
    assert collections.Counter(label for _, label in task.val) == {"1": 5, "5": 5, "8": 5}
    train_texts, val_texts = {t for t, _ in task.train}, {t for t, _ in task.val}
    assert len(train_texts) == 30 and len(val_texts) == 15 and not train_texts & val_texts
    # each row is its page's start, cut at a word, and carries its page's section
    by_row = {compare.page_row(p.text): p for p in pages}
    for text, label in task.train + task.val:
        assert len(text) <= compare.ROW_CHARS and not text.endswith(" ") and by_row[text].section == "man" + label
    # the split is fixed by the page paths; the seed draws the training rows only
    other = compare.build_manpage_task(pages, ("man1", "man5", "man8"), 10, 5, seed=2)
    assert set(other.val) == set(task.val) and set(other.train) != set(task.train)
    assert compare.build_manpage_task(list(reversed(pages)), ("man1", "man5", "man8"), 10, 5, seed=1).val == task.val
    # pretraining: every page but the validation ones, and a copy of a validation page goes too
    val_page = next(p for p in pages if compare.page_row(p.text) in val_texts)
    copy.text = "See also.\n" + val_page.text
    files = compare.prepare_manpage_task(str(tmp_path), ("man1", "man5", "man8"), 10, 5, seed=1,
                                         pages=pages + [copy], log=lambda msg: None)
    with open(files.corpus, encoding="utf-8") as f:
        documents = f.read().split("\n" + compare.DOC_SEPARATOR + "\n")
    flat = compare.normalized(" ".join(documents))
    assert len(documents) == len(pages) + 1 - 15 - 1
    assert not [t for t in val_texts if t in flat]
    assert all(t in flat for t in train_texts)   # unlabelled text of the task's own pages stays in
    assert read_tsv(files.train) == compare.build_manpage_task(pages + [copy], ("man1", "man5", "man8"), 10, 5, 1).train


def test_manpage_row_shared_by_two_pages_is_in_neither_split_and_short_sections_are_one_line_errors():
    twin = "NAME twin - installed twice. " + "same words " * 60
    pages = fake_pages({"man1": 14, "man7": 12}, extra=[compare_page("/man/man1/twin.gz", "man1", twin),
                                                        compare_page("/man/man7/twin.gz", "man7", twin)])
    for seed in range(4):
        task = compare.build_manpage_task(pages, ("man1", "man7"), labelled_per_class=7, val_per_class=5, seed=seed)
        assert compare.page_row(twin) not in {t for t, _ in task.train + task.val}
    with pytest.raises(UserError, match=r"^section man7 has 12 pages with a row of their own; it needs 13: lower"):
        compare.build_manpage_task(pages, ("man1", "man7"), labelled_per_class=8, val_per_class=5)
    with pytest.raises(UserError, match=r"--sections needs at least two different sections"):
        compare.build_manpage_task(pages, ("man1",), 2, 2)


def test_one_pretraining_serves_every_seed_and_a_variant_is_its_objective_with_flags(written, tmp_path):
    """--pretrain_seeds 1 --seeds 3: one pretraining run per row, and fine-tuning seeds 1-3 all start
    from it; --variant adds a row of the same objective with extra flags; the default budget leaves
    each objective its own lr (no --lr passed), in pretraining and in fine-tuning (where a
    pretrained backbone and scratch take classify's own), unless --finetune_lr names one for all."""
    files, _ = written
    args = compare.parse_args(["--budget", "default", "--work", str(tmp_path), "--seeds", "3", "--pretrain_seeds",
                               "1", "--variant", "rtd-none=rtd --embedding_sharing none"])
    assert (args.task, args.labelled_per_class, args.finetune_batch_size) == ("manpages", 100, 32)
    _, pretraining, finetuning = compare.plan(["mlm", "rtd-none"], [1, 2, 3], args.budget_sizes, files, args,
                                              str(tmp_path))
    assert sorted(pretraining) == [("mlm", 1), ("rtd-none", 1)]
    variant = pretraining["rtd-none", 1].flags
    assert variant[variant.index("--objective") + 1] == "rtd" and variant[-2:] == ["--embedding_sharing", "none"]
    assert "--lr" not in variant and "--lr" not in pretraining["mlm", 1].flags
    for seed in (1, 2, 3):
        run = finetuning["finetune", "rtd-none", seed]
        assert run.flags[run.flags.index("--init_from") + 1] == pretraining["rtd-none", 1].final_checkpoint
        assert run.flags[run.flags.index("--seed") + 1] == str(seed)
        assert "--lr" not in run.flags and "--lr" not in finetuning["finetune", compare.SCRATCH, seed].flags
    args = compare.parse_args(["--budget", "default", "--work", str(tmp_path), "--finetune_lr", "1e-3"])
    _, _, finetuning = compare.plan(["mlm"], [1], args.budget_sizes, files, args, str(tmp_path))
    for row in ("mlm", compare.SCRATCH):
        flags = finetuning["finetune", row, 1].flags
        assert flags[flags.index("--lr") + 1] == "0.001" and flags[flags.index("--min_lr") + 1] == "0.0001"
    for bad in (["--pretrain_seeds", "4", "--seeds", "3"], ["--variant", "=rtd"], ["--variant", "x="]):
        with pytest.raises(UserError, match="--pretrain_seeds must be between|--variant"):
            compare.parse_args(bad)


def test_frozen_features_tell_a_collapsed_backbone_from_one_that_separates_the_classes(tmp_path, tokenizer,
                                                                                         monkeypatch):
    """frozen_features: the validation rows' mean pairwise cosine and nearest-centroid accuracy.
    A backbone whose every row is the same vector reads cosine 1 and no better than the majority
    guess; one whose vector says which class word a row holds reads 100%. Rows are cut to the
    window as classify cuts them."""
    import types

    import minilm.api
    import torch
    rows = [(f"{'apple' if i % 2 else 'river'} text number {i}", "fruit" if i % 2 else "water") for i in range(12)]
    compare.write_tsv(tmp_path / "train.tsv", rows[:8])
    compare.write_tsv(tmp_path / "val.tsv", rows[8:] + [("apple " * 500, "fruit")])
    apple, river = tokenizer.encode("apple")[0], tokenizer.encode("river")[0]
    seen = []

    def by_word(objective, batch, device):
        seen.extend(len(row) for row in batch)
        return torch.tensor([[1.0 + 5 * (apple in row), 1.0 + 5 * (river in row)] for row in batch])

    objective = types.SimpleNamespace(backbone=types.SimpleNamespace(cfg=types.SimpleNamespace(seq_len=16)),
                                      model_kind="encoder")
    monkeypatch.setattr(minilm.api, "mean_hidden_states", by_word)
    cosine, accuracy = compare.frozen_features(objective, tokenizer, str(tmp_path / "train.tsv"),
                                               str(tmp_path / "val.tsv"))
    assert accuracy == 1.0 and cosine < 0.9 and max(seen) == 16   # <eos> + 15 tokens of the long row
    monkeypatch.setattr(minilm.api, "mean_hidden_states", lambda o, batch, d: torch.ones(len(batch), 4))
    cosine, accuracy = compare.frozen_features(objective, tokenizer, str(tmp_path / "train.tsv"),
                                               str(tmp_path / "val.tsv"))
    assert cosine == pytest.approx(1.0) and accuracy == pytest.approx(3 / 5)   # every row called "fruit"


def test_a_description_row_skips_the_synopsis_and_a_page_without_one_is_left_out():
    page = "NAME\nopen - open a file\n\nSYNOPSIS\n#include <fcntl.h>\n\nDESCRIPTION\nThe open() call opens " + \
        "the file named by its path. " * 30
    row = compare.page_row(page, 100, "description")
    assert row.startswith("The open() call opens the file") and "#include" not in row and len(row) <= 100
    assert compare.page_row(page, 100).startswith("NAME open - open a file SYNOPSIS #include")
    assert compare.page_row("NAME\nx - no sections here. " + "words " * 50, 100, "description") is None
    pages = fake_pages({"man2": 9, "man3": 9}, extra=[compare_page("/man/man2/bare.gz", "man2", "NAME bare " * 40)])
    for p in pages:
        p.text = p.text.replace("NAME", "NAME\nSYNOPSIS\nf(int);\nDESCRIPTION\n", 1) if "bare" not in p.path else p.text
    task = compare.build_manpage_task(pages, ("man2", "man3"), 6, 3, seed=0, row_from="description")
    assert all(not text.startswith("NAME") for text, _ in task.train + task.val)
    with pytest.raises(UserError, match="section man2 has 9 pages with a row of their own; it needs 10"):
        compare.build_manpage_task(pages, ("man2", "man3"), 7, 3, seed=0, row_from="description")


def test_backbone_probe_reads_a_length_direction_and_class_centroids():
    """benchmarks/backbone_probe.py's numbers on vectors made to hold one thing each: vectors that
    vary only with the row's length put all their spread on one direction, correlated +-1 with it;
    vectors that hold the class give centroid accuracy 1 whatever direction they all share."""
    import torch
    backbone_probe = load_benchmark("backbone_probe")
    labels = torch.tensor([0, 1, 2] * 4)
    lengths = torch.arange(12) + 20
    shared = torch.tensor([10.0, 0, 0, 0])
    by_class = shared + torch.eye(4)[labels] * 0.5
    by_length = shared + torch.stack([torch.zeros(12), torch.zeros(12), torch.zeros(12), lengths.float() / 10], 1)
    numbers = backbone_probe.probe(by_class, labels, by_class, labels, lengths)
    assert numbers["centroid"] == 1.0 and numbers["cos"] > 0.99   # one shared direction, the class still read
    numbers = backbone_probe.probe(by_length, labels, by_length, labels, lengths)
    assert numbers["pc1"] > 0.999 and abs(numbers["r(length)"]) > 0.999
    assert numbers["centroid"] < 0.7


def test_backbone_probe_explain_tells_a_content_direction_from_a_length_direction(monkeypatch):
    """--explain's two readings of the first principal direction. Token states that say "code or
    prose" (each row a fixed share of code tokens, spread evenly, so a row's first 60 tokens hold
    the same share) give a direction with the prose token at one end and the code token at the
    other, and cutting the rows barely moves them along it; states that say "how long is this row"
    (every token 1/length along one axis) move the cut rows by many times their spread."""
    import types

    import torch
    backbone_probe = load_benchmark("backbone_probe")
    prose, code = 7, 9
    rows = []
    for b in range(24):   # row b: length 80 + b, every (b % 4 + 2)-th token is code
        period = b % 4 + 2
        rows.append([code if i % period == 0 else prose for i in range(80 + b)])

    def content_states(objective, rows):
        return [torch.tensor([[1.0 if t == code else -1.0, 0.0, 5.0] for t in row]) for row in rows]

    def length_states(objective, rows):
        return [torch.tensor([[10.0 / len(row), 0.01 * (t == code), 5.0] for t in row]) for row in rows]

    tokenizer = types.SimpleNamespace(sp=types.SimpleNamespace(id_to_piece=lambda i: f"piece{i}"))
    monkeypatch.setattr(backbone_probe, "final_states", content_states)
    found = backbone_probe.explain_direction(None, tokenizer, rows)
    ends = {found["low"][0][0], found["high"][0][0]}
    assert ends == {"piece7", "piece9"} and found["low"][0][1] * found["high"][0][1] < 0
    assert abs(found["cut shift"]) < 0.3
    monkeypatch.setattr(backbone_probe, "final_states", length_states)
    assert abs(backbone_probe.explain_direction(None, tokenizer, rows)["cut shift"]) > 3
