"""benchmarks/speedrun.py: the tokens-to-target arithmetic on hand-made curves (closed forms), the
roff stripper and the man-page corpus on a hand-made manual tree, and one tiny end-to-end run of
the script (two rows, a few steps) whose table must agree with the runs' own metrics."""
from __future__ import annotations

import gzip
import json
import os
import random

import pytest

from minilm.errors import UserError
from tests.conftest import load_benchmark


speedrun = load_benchmark("speedrun")


# ----------------------------------------------------------------------------- tokens to target
def test_steps_to_target_interpolates_between_evaluations():
    curve = [(50, 5.0), (100, 4.0), (150, 3.0), (200, 2.5)]
    # 3.5 lies halfway between the evaluations at 100 (4.0) and 150 (3.0)
    assert speedrun.steps_to_target(curve, 3.5) == pytest.approx(125.0)
    # a quarter of the way from 150 (3.0) to 200 (2.5)
    assert speedrun.steps_to_target(curve, 2.875) == pytest.approx(162.5)
    assert speedrun.steps_to_target(curve, 3.0) == pytest.approx(150.0)   # exactly at an evaluation
    assert speedrun.steps_to_target(curve, 6.0) == 50.0                    # already there at the first one
    assert speedrun.steps_to_target(curve, 2.0) is None                    # never reached
    # the FIRST crossing counts, not a later one after the curve went back up
    bumpy = [(50, 4.0), (100, 2.0), (150, 3.5), (200, 1.0)]
    assert speedrun.steps_to_target(bumpy, 3.0) == pytest.approx(50 + 50 * (4.0 - 3.0) / (4.0 - 2.0))


def test_summary_target_is_the_baselines_mean_final_loss_and_ratios_follow():
    base = [[(100, 4.0), (200, 3.0), (300, 2.2)], [(100, 4.2), (200, 3.2), (300, 2.4)]]   # finals 2.2, 2.4
    fast = [[(100, 3.0), (200, 2.0), (300, 1.8)], [(100, 3.2), (200, 2.4), (300, 2.0)]]
    summary = speedrun.summarize({"baseline": base, "+fast": fast},
                                 {"baseline": [1.1, 1.2], "+fast": [1.0, 1.05]})
    assert summary["target"] == pytest.approx(2.3)
    rows = summary["rows"]
    # the baseline's seed-mean curve is (4.1, 3.1, 2.3): it reaches its own mean final loss at the end
    assert rows["baseline"]["steps_to_target"] == pytest.approx(300.0)
    assert rows["baseline"]["ratio"] == pytest.approx(1.0)
    # +fast's mean curve (3.1, 2.2, 1.9): 2.3 is 0.8/0.9 of the way from step 100 to 200
    assert rows["+fast"]["steps_to_target"] == pytest.approx(100 + 100 * 0.8 / 0.9)
    assert rows["+fast"]["ratio"] == pytest.approx((100 + 100 * 0.8 / 0.9) / 300)
    # each seed's own crossing: baseline seed 2 (final 2.4) never gets to 2.3
    assert rows["baseline"]["seed_steps_to_target"][0] == pytest.approx(200 + 100 * 0.7 / 0.8)
    assert rows["baseline"]["seed_steps_to_target"][1] is None
    assert rows["+fast"]["seed_steps_to_target"] == [pytest.approx(100 + 100 * 0.7 / 1.0),
                                                     pytest.approx(200 + 100 * 0.1 / 0.4)]
    lines = speedrun.table(summary, 2)
    assert lines[2] == "| baseline | 2 | 2.3000 ± 0.1000 | 1.1500 ± 0.0500 | 300 | 1.00x |"
    assert lines[3] == "| +fast | 2 | 1.9000 ± 0.1000 | 1.0250 ± 0.0250 | 189 | 0.63x |"


def test_a_row_that_never_reaches_the_target_says_so():
    summary = speedrun.summarize({"baseline": [[(10, 3.0), (20, 2.0)]], "+slow": [[(10, 3.5), (20, 2.5)]]},
                                 {"baseline": [1.0], "+slow": [1.2]})
    assert summary["rows"]["+slow"]["steps_to_target"] is None and summary["rows"]["+slow"]["ratio"] is None
    assert speedrun.table(summary, 1)[3] == "| +slow | 1 | 2.5000 | 1.2000 | not reached | - |"


def test_mean_curve_averages_the_steps_every_seed_evaluated():
    assert speedrun.mean_curve([[(1, 2.0), (2, 4.0), (3, 1.0)], [(1, 4.0), (2, 2.0)]]) == [(1, 3.0), (2, 3.0)]


def test_rows_are_cumulative_and_folders_distinct():
    class Args:
        only, objective, steps, eval_every, eval_batches, threads, device = [], "clm", 10, 5, 2, 1, "cpu"
        vocab_size, corpus_path, val_fraction, extra = 512, "c.txt", 0.05, []
    runs = speedrun.plan(speedrun.ROWS, [1, 2], Args, "out")
    last = {run.row: run.flags for run in runs if run.seed == 1}
    names = [name for name, _ in speedrun.ROWS]
    for before, after in zip(names, names[1:]):   # each row: the one before it plus its own flags
        assert last[after][:len(last[before])] == last[before]
        assert last[after][len(last[before]):] == dict(speedrun.ROWS)[after]
    assert len({run.out_dir for run in runs}) == len(runs) == 2 * len(names)
    Args.only = ["+wsd"]   # a row alone still carries the rows before it
    (one, _) = speedrun.plan(speedrun.ROWS, [1, 2], Args, "out")
    assert one.flags[-2:] == ["--schedule", "wsd"] and "muon" in one.flags


def test_row_flag_replaces_a_rows_own_flags_or_adds_one_on_top():
    rows = speedrun.with_rows(speedrun.ROWS, ["+muon=--optimizer muon --muon_lr 0.02", "+big=--n_embd 384"])
    assert dict(rows)["+muon"] == ["--optimizer", "muon", "--muon_lr", "0.02"]
    assert [n for n, _ in rows] == [n for n, _ in speedrun.ROWS] + ["+big"]
    assert dict(speedrun.ROWS)["+muon"] == ["--optimizer", "muon"]   # the module's rows are untouched
    with pytest.raises(UserError, match="NAME=FLAGS"):
        speedrun.with_rows(speedrun.ROWS, ["+muon"])


# ----------------------------------------------------------------------------- the corpus
PAGE = r""".\" a comment that must not appear
.de XX
.ft B
..
.TH LS 1 "2026" "GNU coreutils"
.ie n \{\
.ds x hidden
.\}
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
List information about the \fBFILE\fPs (the current
directory by default). Sort \(lqentries\(rq alphabetically\(em see \fI\-\-sort\fR.
.TP
.BR \-a ", " \-\-all
do not ignore entries starting with .
.nf
line one
  line two
.fi
.SH "SEE ALSO"
.BR dir (1)
"""


def test_roff_to_text_keeps_the_words_and_drops_the_typesetting():
    text = speedrun.roff_to_text(PAGE)
    assert text.split("\n") == [
        "NAME", "ls - list directory contents", "", "DESCRIPTION",
        'List information about the FILEs (the current directory by default). '
        'Sort "entries" alphabetically-- see --sort.',
        "-a, --all", "do not ignore entries starting with .", "line one", "  line two", "", "SEE ALSO", "dir(1)"]


def write_page(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(text.encode())


def page(name: str) -> str:
    return f".TH {name} 1\n.SH NAME\n{name} \\- a tool\n.SH DESCRIPTION\n" + f"The {name} tool does things. " * 12


def test_corpus_takes_english_pages_in_order_caps_each_package_and_is_cached(tmp_path):
    root, info = tmp_path / "man", tmp_path / "dpkg"
    for name in ("zeta", "alpha", "beta", "gamma"):
        write_page(str(root / "man1" / f"{name}.1.gz"), page(name))
    write_page(str(root / "man3" / "delta.3.gz"), page("delta"))
    write_page(str(root / "man3" / "redirect.3.gz"), ".so man3/delta.3\n")      # a redirect: not a page
    os.symlink("delta.3.gz", root / "man3" / "link.3.gz")                        # a symlink: not a page
    write_page(str(root / "fr" / "man1" / "alpha.1.gz"), page("alphafr"))         # a translation: left out
    info.mkdir()
    (info / "big:amd64.list").write_text("".join(f"{root}/man1/{n}.1.gz\n" for n in ("zeta", "alpha", "beta", "gamma")))
    (info / "small.list").write_text(f"{root}/man3/delta.3.gz\n")
    cache = str(tmp_path / "cache")
    path = speedrun.build_corpus(cache, str(root), max_pages_per_package=2, log=lambda m: None, dpkg_info=str(info))
    docs = open(path, encoding="utf-8").read().split(f"\n{speedrun.DOC_SEPARATOR}\n")
    # section, then name; two pages of "big" (alpha, beta: the first two in that order), then delta
    assert [d.split("\n")[1].split(" ")[0] for d in docs] == ["alpha", "beta", "delta"]
    assert "alphafr" not in open(path, encoding="utf-8").read()
    rows = open(os.path.join(cache, "packages.tsv"), encoding="utf-8").read().splitlines()
    assert rows[0] == "package\tpages\tcharacters"
    assert {r.split("\t")[0]: int(r.split("\t")[1]) for r in rows[1:]} == {"big": 2, "small": 1}
    meta = json.load(open(os.path.join(cache, "corpus.json"), encoding="utf-8"))
    assert meta["documents"] == 3 and meta["bytes"] == os.path.getsize(path)
    said = []
    speedrun.build_corpus(cache, str(root), max_pages_per_package=2, log=said.append, dpkg_info=str(info))
    assert said and said[0].startswith("corpus: reusing")
    speedrun.build_corpus(cache, str(root), max_pages_per_package=0, log=said.append, dpkg_info=str(info))
    assert len(open(path, encoding="utf-8").read().split(speedrun.DOC_SEPARATOR)) == 5   # no cap: all five


def test_bad_rows_are_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="unknown row"):
        speedrun.main(["--out", str(tmp_path), "--rows", "baseline,+nothing"])
    with pytest.raises(UserError, match="unknown row"):
        speedrun.main(["--out", str(tmp_path), "--objective", "mlm", "--rows", "+qk_norm"])


# ----------------------------------------------------------------------------- end to end, tiny
def test_tiny_end_to_end_table_matches_the_runs(tmp_path, monkeypatch, capsys):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n<|endoftext|>\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(40)))
    # two rows that need nothing but today's flags: the real ROWS are pinned by the tests above
    monkeypatch.setattr(speedrun, "ROWS", [("baseline", []), ("+lr", ["--lr", "0.004"])])
    out = str(tmp_path / "out")
    argv = ["--out", out, "--corpus", str(corpus), "--seeds", "1", "--steps", "4", "--eval_every", "2",
            "--eval_batches", "2", "--parallel", "2", "--vocab_size", "512",
            "--extra", "--n_layer 2 --n_embd 64 --n_head 2 --seq_len 32 --batch_size 4 --warmup_steps 1"]
    speedrun.main(argv)
    results = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    for row in ("baseline", "+lr"):
        folder = os.path.join(out, "runs", speedrun.folder_name(row) + "-s1337")
        evals = speedrun.evaluations(folder)
        assert [e["step"] for e in evals] == [2, 4]
        assert results["rows"][row]["final_loss"] == [evals[-1]["val_loss"]]
        assert f"| {row} | 1 | {evals[-1]['val_loss']:.4f} | {evals[-1]['val_bpb']:.4f} |" in table
        assert not [n for n in os.listdir(folder) if n.startswith("ckpt-")]   # checkpoints not kept
    assert results["rows"]["baseline"]["ratio"] == 1.0
    assert results["target"] == results["rows"]["baseline"]["final_loss"][0]
    assert results["tokens_per_step"] == 4 * 32   # batch x seq_len
    base = results["rows"]["baseline"]
    assert base["tokens_to_target"] == pytest.approx(base["steps_to_target"] * 4 * 32)
    # again, one row asked for: the baseline (the target) comes with it; both are done, nothing trains
    capsys.readouterr()
    speedrun.main(argv + ["--rows", "+lr"])
    said = capsys.readouterr().out
    assert said.count("done before, skipped") == 2 and "the baseline row sets the target" in said
    assert json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))["rows"] == results["rows"]
