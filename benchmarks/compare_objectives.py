"""Does pretraining pay, and which objective pays most? One table, from text that ships with Python.

    python benchmarks/compare_objectives.py --budget tiny --work cmp-tiny          # CPU, 2 cores
    python benchmarks/compare_objectives.py --budget gpu --device cuda --work cmp-gpu

The experiment, all through train.py (one subprocess per run, this same python):

1. A labelled task, built without a download and without importing anything: which standard-
   library package a docstring comes from (asyncio, email, importlib, ...: DEFAULT_PACKAGES).
   Docstrings are read with `ast`. The split is by MODULE: each package's modules are dealt to
   validation or training, so a validation docstring comes from a file no training row comes
   from, and no text is in both (texts found in two packages are dropped; a text found in a
   validation and a training module stays in validation only). Balanced: --labelled_per_class
   training and --val_per_class validation rows per package, drawn with --task_seed. Written to
   WORK/task/{train,val}.tsv. The stdlib differs between Python versions, so the task does too:
   the table says which Python made it.
2. A pretraining corpus: the built-in one (pydoc topics + stdlib docstrings, what train.py reads
   without --data) MINUS every document that holds a docstring of a held-out (validation) module,
   so no pretrained model has seen a validation text. Training docstrings stay in: unlabelled
   text from the task's domain is what pretraining is for. Written to WORK/task/pretrain.txt.
3. One tokenizer and one set of token files for every pretraining run (WORK/prepared), then the
   same small encoder shape pretrained with each objective for the same number of input tokens
   (steps x batch_size x seq_len), --seeds seeds each; then each checkpoint fine-tuned on the
   task (train.py --objective classify --init_from ...: rtd's discriminator, t5's encoder), and
   the same shape fine-tuned from scratch (no --init_from, but --tokenizer: the pretraining runs'
   tokenizer, so scratch and pretrained differ in their weights alone). --probe adds a linear probe
   (--freeze_backbone) of each pretrained backbone.
4. One table, printed and written to WORK/table.md: mean +- half the range over the seeds (with
   two seeds, each seed sits at one end), the last evaluation of each run (no choice made on the
   validation set). Curves drawn with minilm.plot into WORK/pretraining.png and finetuning.png.

Every run has its own out_dir under WORK/runs and a compare.json beside its checkpoint; a run that
finished with the same command and the same input files is not run again, so an interrupted
comparison picks up where it stopped (and a changed flag reruns only what it changes).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minilm.data.reading import DOC_SEPARATOR, builtin_documents   # noqa: E402
from minilm.errors import UserError                                 # noqa: E402
from minilm.plot import plot_runs, read_metrics                     # noqa: E402

# what classify's evaluation rows in metrics.jsonl call accuracy and macro-F1
ACCURACY, MACRO_F1 = "val_acc", "val_macro_f1"

# ----------------------------------------------------------------------------- the labelled task
# Seven packages with 150+ docstrings spread over several modules, so whole modules can be held
# out (logging has three), and that every CPython install has. json, concurrent or http have too
# few to fill both splits at the default sizes once a module is held out; tkinter is large enough
# but distributions ship it separately (Debian's python3-tk), so a default with it fails there.
DEFAULT_PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "unittest", "xml")
MIN_DOCSTRING_CHARS = 40    # as builtin_documents: shorter ones are mostly "Return self." and the like
SKIP_FOLDERS = {"test", "tests", "__pycache__"}


def normalized(text: str) -> str:
    """One line, single spaces: what a TSV cell can hold, and what the leak check compares."""
    return " ".join(text.split())


def docstrings_of(path: str) -> list[str]:
    """The module, class and function docstrings of a .py file longer than MIN_DOCSTRING_CHARS (the
    rule builtin_documents uses), parsed with ast; [] for a file that does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                          ast.AsyncFunctionDef)))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > MIN_DOCSTRING_CHARS]


def package_modules(package: str, stdlib: str) -> dict[str, list[str]]:
    """{module path relative to the stdlib: its normalized docstrings} for every .py file of a
    stdlib package (its tests left out), in sorted order."""
    root = os.path.join(stdlib, package)
    if not os.path.isdir(root):
        raise UserError(f"--packages: {package!r} is not a package folder of this Python's standard library "
                        f"({stdlib}); name packages such as {', '.join(DEFAULT_PACKAGES[:3])}")
    modules = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_FOLDERS)
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            modules[os.path.relpath(path, stdlib)] = [normalized(d) for d in docstrings_of(path)]
    return modules


def stable_order(names) -> list[str]:
    """Names in an order that looks random but is the same on every machine and Python (no hash())."""
    return sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())


def hold_out_modules(modules: dict[str, list[str]], val_needed: int, train_needed: int) -> set[str]:
    """The modules whose docstrings go to validation: taken in stable_order while validation has
    fewer than val_needed texts, skipping a module that would leave training fewer than
    train_needed. Whole modules, so validation and training never share a file."""
    total = sum(len(texts) for texts in modules.values())
    held, held_count = set(), 0
    for name in stable_order(modules):
        if held_count >= val_needed:
            break
        if modules[name] and total - held_count - len(modules[name]) >= train_needed:
            held.add(name)
            held_count += len(modules[name])
    return held


@dataclass
class Task:
    train: list[tuple[str, str]]               # (text, label) rows, balanced, shuffled
    val: list[tuple[str, str]]
    val_modules: dict[str, list[str]] = field(default_factory=dict)   # {module: its docstrings}


def build_task(packages=DEFAULT_PACKAGES, labelled_per_class: int = 64, val_per_class: int = 40,
               seed: int = 0, stdlib: str | None = None) -> Task:
    """The labelled task (see the module docstring). Deterministic for a given Python's stdlib,
    packages, sizes and seed. UserError, naming the package, when one cannot fill its quota."""
    if len(packages) < 2 or len(set(packages)) < len(packages):
        raise UserError(f"--packages needs at least two different packages, got {','.join(packages)}")
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    modules = {package: package_modules(package, stdlib) for package in packages}
    # a text found in two packages has no single answer: out of both
    owners: dict[str, set[str]] = {}
    for package, by_module in modules.items():
        for texts in by_module.values():
            for text in texts:
                owners.setdefault(text, set()).add(package)
    ambiguous = {text for text, found_in in owners.items() if len(found_in) > 1}
    rng = random.Random(seed)
    task = Task(train=[], val=[])
    for package in packages:
        by_module = {name: sorted(set(texts) - ambiguous) for name, texts in modules[package].items()}
        held = hold_out_modules(by_module, val_per_class, labelled_per_class)
        val_texts = sorted({t for name in held for t in by_module[name]})
        train_texts = sorted({t for name, texts in by_module.items() if name not in held for t in texts}
                             - set(val_texts))
        if len(val_texts) < val_per_class or len(train_texts) < labelled_per_class:
            raise UserError(f"{package} has {len(train_texts)} training and {len(val_texts)} validation docstrings "
                            f"after holding out whole modules; lower --labelled_per_class ({labelled_per_class}) "
                            f"or --val_per_class ({val_per_class}), or drop it from --packages")
        task.train += [(text, package) for text in rng.sample(train_texts, labelled_per_class)]
        task.val += [(text, package) for text in rng.sample(val_texts, val_per_class)]
        task.val_modules.update({name: modules[package][name] for name in sorted(held)})
    rng.shuffle(task.train)
    rng.shuffle(task.val)
    return task


def write_tsv(path: str, rows: list[tuple[str, str]]) -> None:
    """A header (text, label) and one row per line; texts are normalized, so hold no tab or newline."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("text\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")


# ----------------------------------------------------------------------------- the pretraining corpus
def pretraining_documents(held_out_texts, documents=None) -> tuple[list[str], int]:
    """(the built-in corpus's documents that hold none of `held_out_texts`, how many were dropped).

    A built-in document is a pydoc topic or one module's docstrings joined (builtin_documents);
    the check is on normalized text, so it does not depend on how the docstrings were joined, and
    it also drops a training module that repeats a validation module's docstring."""
    needles = sorted(set(held_out_texts))
    kept, dropped = [], 0
    for document in (builtin_documents() if documents is None else documents):
        flat = normalized(document)
        if any(needle in flat for needle in needles):
            dropped += 1
        else:
            kept.append(document)
    return kept, dropped


def write_corpus(path: str, documents: list[str]) -> None:
    """Documents separated by lines that hold only <|endoftext|> (what train.py --data reads)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(f"\n{DOC_SEPARATOR}\n".join(d.strip("\n") for d in documents) + "\n")


def write_if_changed(path: str, write) -> bool:
    """Call write(tmp) and move tmp over `path` only when the bytes differ: an unchanged file keeps
    its modification time, so train.py reuses the data it prepared from it (train.py's
    data_signature holds sizes and mtimes) and finished runs stay finished. True when it changed."""
    tmp = path + ".tmp"
    write(tmp)
    with open(tmp, "rb") as new:
        fresh = new.read()
    if os.path.exists(path):
        with open(path, "rb") as old:
            if old.read() == fresh:
                os.unlink(tmp)
                return False
    os.replace(tmp, path)
    return True


@dataclass
class TaskFiles:
    train: str          # WORK/task/train.tsv
    val: str            # WORK/task/val.tsv
    corpus: str         # WORK/task/pretrain.txt
    summary: str        # one line for the report


def write_task(folder: str, task: Task, documents: list[str]) -> TaskFiles:
    """train.tsv, val.tsv and pretrain.txt under `folder`, each rewritten only when it changed."""
    files = TaskFiles(os.path.join(folder, "train.tsv"), os.path.join(folder, "val.tsv"),
                      os.path.join(folder, "pretrain.txt"), "")
    write_if_changed(files.train, lambda p: write_tsv(p, task.train))
    write_if_changed(files.val, lambda p: write_tsv(p, task.val))
    write_if_changed(files.corpus, lambda p: write_corpus(p, documents))
    return files


def prepare_task(folder: str, packages=DEFAULT_PACKAGES, labelled_per_class: int = 64,
                 val_per_class: int = 40, seed: int = 0, log=print) -> TaskFiles:
    """Build the labelled task and the pretraining corpus without it; write them under `folder`."""
    os.makedirs(folder, exist_ok=True)
    task = build_task(packages, labelled_per_class, val_per_class, seed)
    held_out = [text for texts in task.val_modules.values() for text in texts]
    documents, dropped = pretraining_documents(held_out)
    files = write_task(folder, task, documents)
    chars = sum(len(d) for d in documents)
    files.summary = (f"task: {len(packages)} packages ({', '.join(packages)}), {labelled_per_class} training and "
                     f"{val_per_class} validation docstrings each ({len(task.train)} / {len(task.val)} rows); "
                     f"validation from {len(task.val_modules)} held-out modules. Pretraining corpus: the built-in "
                     f"one minus {dropped} documents that hold a held-out module's docstring: {len(documents)} "
                     f"documents, {chars / 1e6:.2f} M characters")
    log(files.summary)
    return files


# ----------------------------------------------------------------------------- the man-page task
# Which section of the manual a page is from, read from its first ROW_CHARS characters (the NAME
# line and what follows: the synopsis, the start of the description). Six sections with 190+ pages
# in the speedrun corpus (4 and 6 have ~30 and 1): user commands, system calls, library functions,
# file formats, overviews and conventions, administration. The pages are the English manual pages
# this machine's Debian packages installed (benchmarks/speedrun.py's corpus: at most 300 pages of
# one package, so google-cloud-cli's 15k generated pages do not drown the rest). Not public-domain
# text in the strict sense: each page has its package's free licence (GPL, BSD, the Linux man-pages
# "verbatim" licence, ...); no public-domain prose of this size ships with the Debian packages here.
MANPAGE_SECTIONS = ("man1", "man2", "man3", "man5", "man7", "man8")
ROW_CHARS = 400


ROW_FROM = ("start", "description")


def page_row(text: str, row_chars: int = ROW_CHARS, row_from: str = "start") -> str | None:
    """A page's first row_chars characters on one line, cut at the last space (no half word).
    row_from "description": the first row_chars after its DESCRIPTION heading instead, without the
    NAME line and the synopsis (an `#include` or a list of options says the section by itself);
    None for a page without that heading."""
    if row_from == "description":
        lines = text.split("\n")
        heading = next((i for i, line in enumerate(lines) if line.strip() == "DESCRIPTION"), None)
        if heading is None:
            return None
        text = "\n".join(lines[heading + 1:])
    flat = normalized(text)
    if len(flat) <= row_chars:
        return flat
    cut = flat.rfind(" ", 0, row_chars + 1)
    return flat[:cut if cut > 0 else row_chars]


def build_manpage_task(pages, sections=MANPAGE_SECTIONS, labelled_per_class: int = 100, val_per_class: int = 50,
                       seed: int = 0, row_chars: int = ROW_CHARS, row_from: str = "start") -> Task:
    """The section task from `pages` (speedrun.Page: path, section, text). The split is by PAGE: per
    section, the first val_per_class pages in stable_order of their paths are validation, and
    labelled_per_class training rows are drawn with `seed` from the rest. A row text that two pages
    share (the same page installed twice, a generated family) is in neither split. Task.val_modules
    maps each validation page's path to its whole text: what the pretraining corpus must not hold.
    row_from: page_row's; a page with no row there (no DESCRIPTION heading) is left out."""
    if len(sections) < 2 or len(set(sections)) < len(sections):
        raise UserError(f"--sections needs at least two different sections, got {','.join(sections)}")
    rows: dict[str, list] = {}
    for page in pages:
        row = page_row(page.text, row_chars, row_from) if page.section in sections else None
        if row is not None:
            rows.setdefault(row, []).append(page)
    by_section: dict[str, list] = {section: [] for section in sections}
    for text, found_in in rows.items():
        if len(found_in) == 1:
            by_section[found_in[0].section].append(found_in[0])
    rng = random.Random(seed)
    task = Task(train=[], val=[])
    for section in sections:
        by_path = {page.path: page for page in by_section[section]}
        ordered = [by_path[path] for path in stable_order(by_path)]
        val_pages, rest = ordered[:val_per_class], ordered[val_per_class:]
        if len(val_pages) < val_per_class or len(rest) < labelled_per_class:
            raise UserError(f"section {section} has {len(ordered)} pages with a row of their own; it needs "
                            f"{val_per_class + labelled_per_class}: lower --labelled_per_class ({labelled_per_class}) "
                            f"or --val_per_class ({val_per_class}), or drop it from --sections")
        label = section.removeprefix("man")
        task.val += [(page_row(page.text, row_chars, row_from), label) for page in val_pages]
        task.train += [(page_row(page.text, row_chars, row_from), label)
                       for page in rng.sample(rest, labelled_per_class)]
        task.val_modules.update({page.path: [normalized(page.text)] for page in val_pages})
    rng.shuffle(task.train)
    rng.shuffle(task.val)
    return task


def manpage_pages():
    """The speedrun corpus's pages (benchmarks/speedrun.py), read once per call: ~5 s."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import speedrun
    return list(speedrun.corpus_pages())


def prepare_manpage_task(folder: str, sections=MANPAGE_SECTIONS, labelled_per_class: int = 100,
                         val_per_class: int = 50, seed: int = 0, pages=None, log=print,
                         row_from: str = "start") -> TaskFiles:
    """The section task and its pretraining corpus: every page of the speedrun corpus except the
    validation pages, and except any page that holds a validation row (a copy of a held-out page)."""
    os.makedirs(folder, exist_ok=True)
    pages = manpage_pages() if pages is None else pages
    task = build_manpage_task(pages, sections, labelled_per_class, val_per_class, seed, row_from=row_from)
    held_out_paths = set(task.val_modules)
    kept = [page.text for page in pages if page.path not in held_out_paths]
    documents, dropped = pretraining_documents([text for text, _ in task.val], kept)
    files = write_task(folder, task, documents)
    chars = sum(len(d) for d in documents)
    where = "first" if row_from == "start" else "first after DESCRIPTION:"
    files.summary = (f"task: the manual section of a page's {where} {ROW_CHARS} characters, {len(sections)} sections "
                     f"({', '.join(s.removeprefix('man') for s in sections)}), {labelled_per_class} training and "
                     f"{val_per_class} validation pages each ({len(task.train)} / {len(task.val)} rows). Pretraining "
                     f"corpus: the {len(pages)} pages of the speedrun corpus minus the {len(held_out_paths)} validation "
                     f"pages and {dropped} copies of one: {len(documents)} documents, {chars / 1e6:.2f} M characters")
    log(files.summary)
    return files


# ----------------------------------------------------------------------------- budgets
@dataclass
class Budget:
    """One size of the experiment. Every number is also a flag of this script."""
    model: dict                    # train.py model flags: the one encoder shape every row shares
    batch_size: int
    pretrain_tokens: int           # input tokens per pretraining run: steps = tokens / (batch_size * seq_len)
    pretrain_lr: float | None      # None: each objective's own default lr (rtd's differs from mlm's)
    finetune_epochs: float         # passes over the labelled training rows
    finetune_lr: float | None      # None: each row's default (classify's: pretrained or from scratch)
    evals: int                     # evaluations per run (the points of each validation curve)
    note: str
    finetune_batch_size: int = 16
    task: str = "stdlib"           # the labelled task: "stdlib" (docstrings) or "manpages" (sections)


BUDGETS = {
    # a smoke test of the whole pipeline: every run for a few steps (minutes, mostly start-up)
    "micro": Budget(dict(n_layer=1, n_head=2, n_embd=64, seq_len=64, vocab_size=1024), batch_size=8,
                    pretrain_tokens=8 * 64 * 6, pretrain_lr=2e-3, finetune_epochs=0.1, finetune_lr=1e-3, evals=2,
                    note="a smoke test: the numbers mean nothing"),
    # the CPU table: the tiny preset's shape, ~0.65 epoch of the corpus per objective; about 15-20
    # minutes on 2 quiet cores (7 objectives x 2 seeds: 14 pretraining and 16 fine-tuning runs)
    "tiny": Budget(dict(n_layer=2, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), batch_size=16,
                   pretrain_tokens=400_000, pretrain_lr=2e-3, finetune_epochs=5, finetune_lr=1e-3, evals=6,
                   note="CPU, about 15-20 minutes on 2 cores"),
    # the same shape pretrained 5x longer (~3 epochs): where the tiny table shows no gain, this asks
    # whether more pretraining buys one; about an hour on 2 cores
    "cpu": Budget(dict(n_layer=2, n_head=4, n_embd=128, seq_len=128, vocab_size=2048), batch_size=16,
                  pretrain_tokens=2_000_000, pretrain_lr=2e-3, finetune_epochs=5, finetune_lr=1e-3, evals=6,
                  note="CPU, about an hour on 2 cores"),
    # one GPU: the small preset's shape (the bench config), ~25 epochs of the 1.9 MB corpus per run
    "gpu": Budget(dict(n_layer=6, n_head=6, n_embd=384, seq_len=256, vocab_size=4096), batch_size=64,
                  pretrain_tokens=16_000_000, pretrain_lr=1e-3, finetune_epochs=10, finetune_lr=2e-4, evals=10,
                  note="one GPU (--device cuda)"),
    # issue 23's measurement: the default encoder shape, ~3 M tokens of pretraining at each objective's
    # own lr (not one lr for all), 600 labelled man-page rows, fine-tuned 10 epochs at batch 32 (~190
    # steps) at each row's own fine-tuning lr, what a user gets without --lr (1e-3, scratch 3e-4);
    # with --pretrain_seeds 1 --seeds 3 about 2 hours on 2 cores for 4 objectives
    "default": Budget(dict(n_layer=4, n_head=4, n_embd=256, seq_len=128, vocab_size=4096), batch_size=16,
                      pretrain_tokens=3_000_000, pretrain_lr=None, finetune_epochs=10, finetune_lr=None, evals=6,
                      finetune_batch_size=32, task="manpages",
                      note="the default shape, 3 M tokens, the man-page task; hours on 2 cores"),
}

# the masked / denoising objectives the table compares by default, in this order, where they exist
DENOISING = ("mlm", "wwm", "span", "mlm+sop", "rtd", "plm", "t5")
SCRATCH = "scratch"   # the row fine-tuned with no --init_from
LEFT_OUT = {   # objectives that are no masked/denoising encoder objective, and why
    "sop": "a sentence-order head alone, no token-level objective: mlm+sop is compared instead",
    "clm": "a decoder: not in the default encoder comparison; name it in --objectives to add its row",
    "prefix_lm": "a decoder: not in the default encoder comparison; name it in --objectives to add its row",
    "classify": "the fine-tuning objective itself",
}


def reason_not_comparable(name: str) -> str | None:
    """Why objective `name` cannot be pretrained on the plain-text corpus and then fine-tuned, or None."""
    from minilm.data import source_class
    from minilm.objectives import data_kind_for, objective_class
    if source_class(data_kind_for(name)).prepares == "rows":
        return "it reads rows of a table (pairs or labels), not the running text of this corpus"
    if any(objective_class(part).model_kind not in ("encoder", "seq2seq", "decoder", "prefix_decoder")
           for part in name.split("+")):
        return "its model is no backbone a classifier can start from"
    return None


def choose_objectives(given: str, log=print) -> list[str]:
    """--objectives (comma-separated) checked, or by default every masked/denoising objective that
    exists (DENOISING, then any later one that reads running text), saying why others are left out."""
    from minilm.objectives import OBJECTIVES, objective_class
    if given:
        names = [n.strip() for n in given.split(",") if n.strip()]
        for name in names:
            for part in name.split("+"):
                objective_class(part)   # a one-line error with the known names for a typo
            reason = reason_not_comparable(name) if name != SCRATCH else None
            if reason:
                raise UserError(f"--objectives: {name} cannot be in this comparison: {reason}")
        return [n for n in dict.fromkeys(names) if n != SCRATCH]
    chosen = [name for name in DENOISING if all(part in OBJECTIVES for part in name.split("+"))]
    for name in OBJECTIVES:
        if name in chosen:
            continue
        reason = LEFT_OUT.get(name) or reason_not_comparable(name)
        if reason:
            log(f"not compared: {name} ({reason})")
        else:
            chosen.append(name)   # a later masked/denoising objective on running text
    return chosen


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str                      # its folder under WORK/runs, and its legend name in the plots
    flags: list[str]               # train.py's command line
    inputs: list[str]              # files it reads: a change to one (size, mtime) means running it again
    max_steps: int
    out_dir: str = ""

    @property
    def final_checkpoint(self) -> str:
        return os.path.join(self.out_dir, f"ckpt-{self.max_steps:08d}.pt")   # minilm/checkpoint.py's name


RECORD = "compare.json"   # in each run's out_dir: how it was run, and how long it took


def inputs_signature(paths: list[str]) -> list:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


def finished_record(run: Run) -> dict | None:
    """The record of a finished run made with the same command and the same inputs, or None."""
    path = os.path.join(run.out_dir, RECORD)
    if not (os.path.exists(path) and os.path.exists(run.final_checkpoint)):
        return None
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    same = record.get("flags") == run.flags and record.get("inputs") == inputs_signature(run.inputs)
    return record if same else None


def execute(run: Run, log=print) -> dict:
    """Run train.py for `run` (unless it finished before with the same command and inputs) and
    return its record: {"flags", "inputs", "wall_s"}. The output goes to out_dir/train.log."""
    record = finished_record(run)
    if record is not None:
        log(f"  {run.name}: done before ({record['wall_s']:.0f} s), skipped")
        return record
    os.makedirs(run.out_dir, exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "train.py"), *run.flags, "--overwrite", "true"]
    log_path = os.path.join(run.out_dir, "train.log")
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().strip().splitlines()[-15:]
        log("\n".join("    " + line for line in tail))
        raise UserError(f"{run.name} failed (exit code {code}); its output is in {log_path}")
    record = {"flags": run.flags, "inputs": inputs_signature(run.inputs), "wall_s": wall}
    with open(os.path.join(run.out_dir, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    log(f"  {run.name}: {wall:.0f} s, {summary_of(run.out_dir)}")
    return record


def evaluations(out_dir: str) -> list[dict]:
    """The evaluation rows of a run's metrics.jsonl (those with a val_loss), in order."""
    return [row for row in read_metrics(out_dir, log=lambda msg: None) if "val_loss" in row]


def bpb_of(row: dict) -> float | None:
    """Validation bits per byte of an evaluation row: val_bpb, or a part's (mlm+sop: val_mlm/bpb)."""
    if "val_bpb" in row:
        return row["val_bpb"]
    parts = [value for key, value in sorted(row.items()) if key.startswith("val_") and key.endswith("bpb")]
    return parts[0] if parts else None


def summary_of(out_dir: str) -> str:
    rows = evaluations(out_dir)
    if not rows:
        return "no evaluation"
    last = rows[-1]
    if MACRO_F1 in last:   # a classifier's evaluation (pretraining rows may have a val_acc too)
        return f"val acc {last.get(ACCURACY, float('nan')):.3f}, macro-F1 {last[MACRO_F1]:.3f}"
    bpb = bpb_of(last)
    return f"val loss {last['val_loss']:.3f}" + (f", bpb {bpb:.3f}" if bpb is not None else "")


def step_flags(max_steps: int, evals: int) -> list[str]:
    """The schedule and logging flags of a run of max_steps steps with about `evals` evaluations."""
    return ["--max_steps", str(max_steps), "--warmup_steps", str(max(1, max_steps // 10)),
            "--eval_every", str(max(1, max_steps // evals)), "--log_every", str(max(1, max_steps // 50)),
            "--ckpt_every", str(max_steps), "--keep_checkpoints", "1"]


def device_flags(args) -> list[str]:
    flags = ["--device", args.device]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    return flags


def model_flags(budget: Budget) -> list[str]:
    return [part for key, value in budget.model.items() for part in (f"--{key}", str(value))]


def folder_name(objective: str) -> str:
    return objective.replace("+", "_")


def plan(objectives: list[str], seeds: list[int], budget: Budget, files: TaskFiles, args, work: str):
    """(the preparing run, {(objective, seed): pretraining Run}, {(kind, objective, seed): fine-tuning
    Run}) where kind is "finetune" or "probe", and the scratch row's objective is SCRATCH."""
    runs = os.path.join(work, "runs")
    seq_len = budget.model["seq_len"]
    pretrain_steps = max(1, round(budget.pretrain_tokens / (budget.batch_size * seq_len)))
    common = device_flags(args)
    prepare = Run("prepare", ["--objective", "mlm", "--data", files.corpus, "--out_dir", os.path.join(work, "prepared"),
                              "--max_steps", "0", *model_flags(budget), *common], [files.corpus], 0,
                  os.path.join(work, "prepared"))
    variants = getattr(args, "variants", {})
    pretraining = {}
    for objective in objectives:
        base, extra = variants.get(objective, (objective, []))
        for seed in pretrain_seeds(seeds, args):
            name = f"pretrain-{folder_name(objective)}-seed{seed}"
            out = os.path.join(runs, name)
            lr = [] if budget.pretrain_lr is None else ["--lr", str(budget.pretrain_lr),
                                                        "--min_lr", str(budget.pretrain_lr / 10)]
            flags = ["--objective", base, "--data", files.corpus, "--out_dir", out, "--seed", str(seed),
                     "--batch_size", str(budget.batch_size), *lr, "--eval_batches", str(args.eval_batches),
                     *step_flags(pretrain_steps, budget.evals), *model_flags(budget), *common, *extra]
            pretraining[objective, seed] = Run(name, flags, [files.corpus], pretrain_steps, out)
    n_train = count_rows(files.train)
    finetune_steps = max(1, round(args.finetune_epochs * n_train / args.finetune_batch_size))
    finetuning = {}
    kinds = ["finetune", "probe"] if args.probe else ["finetune"]
    for kind in kinds:
        for objective in [*objectives, SCRATCH]:
            if kind == "probe" and objective == SCRATCH:
                continue   # a probe of random weights measures nothing pretraining did
            for seed in seeds:
                name = f"{kind}-{folder_name(objective)}-seed{seed}"
                out = os.path.join(runs, name)
                lr = [] if args.finetune_lr is None else ["--lr", str(args.finetune_lr),
                                                          "--min_lr", str(args.finetune_lr / 10)]
                flags = ["--objective", "classify", "--data", files.train, "--val_data", files.val,
                         "--out_dir", out, "--seed", str(seed), "--batch_size", str(args.finetune_batch_size),
                         *lr, *step_flags(finetune_steps, budget.evals), *common]
                inputs = [files.train, files.val]
                if objective == SCRATCH:   # the masked LMs' shape: they all add a norm on the embeddings
                    # and the pretraining runs' tokenizer: the same ids, so only the weights differ
                    tokenizer = os.path.join(prepare.out_dir, "tokenizer.model")
                    flags += model_flags(budget) + ["--embed_norm", "true", "--tokenizer", tokenizer]
                    inputs.append(tokenizer)
                else:
                    parent = pretraining[objective, parent_seed(seed, seeds, args)].final_checkpoint
                    flags += ["--init_from", parent]
                    inputs.append(parent)
                if kind == "probe":
                    flags += ["--freeze_backbone", "true"]
                if args.pooling:
                    flags += ["--pooling", args.pooling]
                finetuning[kind, objective, seed] = Run(name, flags, inputs, finetune_steps, out)
    return prepare, pretraining, finetuning


def pretrain_seeds(seeds: list[int], args) -> list[int]:
    """The seeds that pretrain: the first --pretrain_seeds of `seeds` (all of them by default)."""
    return seeds[:getattr(args, "pretrain_seeds", None) or len(seeds)]


def parent_seed(seed: int, seeds: list[int], args) -> int:
    """The pretraining seed fine-tuning seed `seed` starts from: itself when every seed pretrains;
    with fewer pretraining seeds, the fine-tuning seeds take them in turn."""
    pretrained = pretrain_seeds(seeds, args)
    return pretrained[seeds.index(seed) % len(pretrained)]


def count_rows(tsv: str) -> int:
    with open(tsv, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1   # the header


def copy_prepared(prepared: str, out_dir: str) -> None:
    """The shared tokenizer and token files into a pretraining run's out_dir: train.py reuses them
    (same data file, vocab size and preparation flags), so every objective reads the same ids and
    no run pays for training a tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(os.path.join(prepared, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))
    shutil.copytree(os.path.join(prepared, "data"), os.path.join(out_dir, "data"), dirs_exist_ok=True)


# ----------------------------------------------------------------------------- the table
def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds each seed sits at one end of mean +- that."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def cell(values: list[float], digits: int, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean, half = spread(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def read_tsv_rows(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t", 1)) for line in f.readlines()[1:]]


def frozen_features(objective, tokenizer, train_tsv: str, val_tsv: str) -> tuple[float, float]:
    """What a backbone's features hold before any fine-tuning: (the mean pairwise cosine of the
    validation rows' vectors, nearest-centroid accuracy). A row's vector is minilm's embed: the
    mean of the final hidden states (t5: its encoder's). Each class's centroid is the mean of its
    training rows' unit vectors, centred on all training rows' mean; a validation row gets the
    class of the nearest centroid (cosine).
    A collapsed backbone (every row the same vector) has cosine ~1 and centroid accuracy near
    chance, whatever fine-tuning then does; no training, so no seed."""
    import torch

    from minilm.api import batches, mean_hidden_states
    from minilm.tokenizer import EOS_ID
    train, val = read_tsv_rows(train_tsv), read_tsv_rows(val_tsv)
    labels = sorted({label for _, label in train})
    keep = objective.backbone.cfg.seq_len - 1   # cut as classify cuts a row: to the window

    def vectors_of(rows):   # embed's framing (<eos> first; t5: last), the texts cut to the window
        ids = [tokenizer.encode(text)[:keep] for text, _ in rows]
        framed = [row + [EOS_ID] if objective.model_kind == "seq2seq" else [EOS_ID] + row for row in ids]
        return torch.nn.functional.normalize(torch.cat([mean_hidden_states(objective, batch, "cpu")
                                                        for batch in batches(framed, 32)]), dim=-1)

    with torch.no_grad():
        vectors = [vectors_of(train), vectors_of(val)]
    n = len(val)
    cosine = ((vectors[1] @ vectors[1].t()).sum() - n) / (n * (n - 1))
    # centred on the training rows' mean first: a direction every row shares (a masked LM's
    # vectors have one, cosine ~0.97) says nothing about the class but would dominate the cosines
    mean = vectors[0].mean(0)
    centred = [torch.nn.functional.normalize(v - mean, dim=-1) for v in vectors]
    train_labels = torch.tensor([labels.index(label) for _, label in train])
    centroids = torch.stack([centred[0][train_labels == k].mean(0) for k in range(len(labels))])
    predicted = (centred[1] @ centroids.t()).argmax(-1)
    accuracy = (predicted == torch.tensor([labels.index(label) for _, label in val])).float().mean().item()
    return float(cosine), accuracy


def load_backbone(checkpoint: str, random_weights: bool = False):
    """(objective in eval mode, tokenizer) of a pretraining checkpoint on the CPU; random_weights:
    the same model with fresh weights (torch.manual_seed(0)), what scratch starts from."""
    import torch

    from minilm.api import load
    from minilm.objectives import build_objective
    model = load(checkpoint, device="cpu", log=lambda msg: None)
    if not random_weights:
        return model.objective, model.tokenizer
    torch.manual_seed(0)
    cfg = model.config
    return build_objective(cfg.train.objective, cfg.model, model.tokenizer, cfg.obj).eval(), model.tokenizer


def checkpoint_features(checkpoint: str, train_tsv: str, val_tsv: str, random_weights: bool = False):
    """frozen_features of a pretraining run's final checkpoint (or, random_weights, of its model
    with fresh weights: load_backbone)."""
    objective, tokenizer = load_backbone(checkpoint, random_weights)
    return frozen_features(objective, tokenizer, train_tsv, val_tsv)


def last_train_loss(out_dir: str) -> float | None:
    """The training loss of a run's last logged step: does the classifier fit its labelled rows?"""
    rows = [row for row in read_metrics(out_dir, log=lambda msg: None) if "loss" in row and "val_loss" not in row]
    return rows[-1]["loss"] if rows else None


def table(objectives, seeds, records, pretraining, finetuning, probe: bool, pretrained_seeds=None,
          features=None) -> list[str]:
    """The markdown table: one row per objective and one for scratch. "vs scratch": the mean over
    seeds of (this row's accuracy - scratch's with the same fine-tuning seed), in points, and how
    many seeds beat their scratch seed; "train loss": the fine-tuning's last logged training loss;
    `features` {row: frozen_features of its (first) backbone} adds two columns."""
    pretrained_seeds = pretrained_seeds or seeds
    header = ["objective", "pretraining time (s)", "pretraining tokens", "val bpb", "accuracy (%)", "macro-F1 (%)",
              "vs scratch (points)", "train loss"]
    if features:
        header += ["frozen cos(rows)", "frozen centroid acc (%)"]
    if probe:
        header += ["probe accuracy (%)", "probe macro-F1 (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    scratch = [evaluations(finetuning["finetune", SCRATCH, seed].out_dir)[-1].get(ACCURACY) for seed in seeds]
    for objective in [*objectives, SCRATCH]:
        row = [objective]
        if objective == SCRATCH:
            row += ["-", "0", "-"]
        else:
            runs = [pretraining[objective, seed] for seed in pretrained_seeds]
            last = [evaluations(run.out_dir)[-1] for run in runs]
            tokens = max(r["tokens"] for r in read_metrics(runs[0].out_dir, log=lambda msg: None))
            row += [cell([records[run.name]["wall_s"] for run in runs], 0), human(tokens),
                    cell([bpb_of(r) for r in last], 3)]
        for kind in (["finetune", "probe"] if probe else ["finetune"]):
            if (kind, objective, seeds[0]) not in finetuning:
                row += ["-", "-"]
                continue
            last = [evaluations(finetuning[kind, objective, seed].out_dir)[-1] for seed in seeds]
            row += [cell([r.get(ACCURACY) for r in last], 1, 100), cell([r.get(MACRO_F1) for r in last], 1, 100)]
            if kind == "finetune":
                gains = [r.get(ACCURACY) - s for r, s in zip(last, scratch)]
                above = sum(g > 0 for g in gains)
                row += ["-" if objective == SCRATCH else f"{100 * sum(gains) / len(gains):+.1f} ({above}/{len(gains)})",
                        cell([last_train_loss(finetuning[kind, objective, seed].out_dir) for seed in seeds], 3)]
                if features:
                    cosine, accuracy = features.get(objective, (None, None))
                    row += ["-" if cosine is None else f"{cosine:.3f}", "-" if accuracy is None else f"{100 * accuracy:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def human(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k"


def draw(paths: list[str], out: str, log=print) -> None:
    try:
        plot_runs(paths, out, log=lambda msg: None)
        log(f"wrote {out}")
    except UserError as err:
        log(f"no {os.path.basename(out)}: {err}\n  then: python -m minilm.plot {' '.join(paths)} -o {out}")


# ----------------------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, as every minilm command
        raise UserError(f"{message} (see python benchmarks/compare_objectives.py --help)")


def parse_args(argv: list[str]):
    parser = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog="budgets: " + "; ".join(f"{name}: {b.note}" for name, b in BUDGETS.items()))
    parser.add_argument("--work", default="compare-out", help="folder for the task, every run, the table and plots")
    parser.add_argument("--budget", default="tiny", choices=list(BUDGETS), help="sizes; the flags below override")
    parser.add_argument("--objectives", default="", help="comma-separated, e.g. mlm,rtd (default: every masked/"
                                                         "denoising objective that exists)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per row (the spread is over these)")
    parser.add_argument("--pretrain_seeds", type=int, default=0, help="how many of the seeds pretrain (0: all); "
                        "the fine-tuning seeds then start from them in turn (issue 23: one pretraining, 3 seeds)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OBJECTIVE FLAGS",
                        help="an extra row: an objective with train.py flags, e.g. "
                             "'rtd-none=rtd --embedding_sharing none' (repeatable)")
    parser.add_argument("--task", choices=["stdlib", "manpages"], help="the labelled task (default: the budget's)")
    parser.add_argument("--sections", default=",".join(MANPAGE_SECTIONS), help="--task manpages: the classes")
    parser.add_argument("--row_from", default="start", choices=ROW_FROM,
                        help="--task manpages: a row is the page's start, or its DESCRIPTION section's (no "
                             "synopsis: a harder task, less lexical)")
    parser.add_argument("--pretrain_tokens", type=int, help="input tokens per pretraining run")
    parser.add_argument("--pretrain_lr", type=float)
    parser.add_argument("--eval_batches", type=int, default=10, help="batches per pretraining evaluation")
    parser.add_argument("--finetune_epochs", type=float, help="passes over the labelled training rows")
    parser.add_argument("--finetune_lr", type=float, help="one fine-tuning lr for every row (default: the "
                                                          "budget's; the default budget's: each row's own)")
    parser.add_argument("--finetune_batch_size", type=int)
    parser.add_argument("--probe", action="store_true", help="also a linear probe (--freeze_backbone) per row")
    parser.add_argument("--pooling", default="", help="classify's --pooling (default: its own)")
    parser.add_argument("--features", action="store_true", help="also each backbone's frozen features: the "
                        "validation rows' mean cosine and nearest-centroid accuracy (frozen_features)")
    parser.add_argument("--labelled_per_class", type=int, help="training rows per class (64 stdlib, 100 manpages)")
    parser.add_argument("--val_per_class", type=int, help="validation rows per class (40 stdlib, 50 manpages)")
    parser.add_argument("--packages", default=",".join(DEFAULT_PACKAGES), help="the classes: stdlib packages")
    parser.add_argument("--task_seed", type=int, default=0, help="which docstrings the task draws")
    parser.add_argument("--device", default="cpu", help="train.py --device: cpu, cuda, cuda:N, mps")
    parser.add_argument("--dtype", default="", help="train.py --dtype (default: its auto, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="train.py --threads (0: torch's default)")
    args = parser.parse_args(argv)
    budget = BUDGETS[args.budget]
    for name in ("pretrain_tokens", "pretrain_lr", "finetune_epochs", "finetune_lr", "finetune_batch_size", "task"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(budget, name))
    sizes = (100, 50) if args.task == "manpages" else (64, 40)
    if args.labelled_per_class is None:
        args.labelled_per_class = sizes[0]
    if args.val_per_class is None:
        args.val_per_class = sizes[1]
    args.variants = {}
    for spec in args.variant:
        name, _, command = spec.partition("=")
        words = command.split()
        if not name.strip() or not words or "+" in name or name.strip() == SCRATCH:
            raise UserError(f"--variant {spec!r}: write NAME=OBJECTIVE FLAGS, e.g. 'rtd-none=rtd --embedding_sharing none'")
        args.variants[name.strip()] = (words[0], words[1:])
    for name in ("seeds", "pretrain_tokens", "eval_batches", "finetune_batch_size", "labelled_per_class",
                 "val_per_class"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("pretrain_lr", "finetune_epochs", "finetune_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise UserError(f"--{name} must be above 0, got {getattr(args, name)}")
    if args.pretrain_seeds < 0 or args.pretrain_seeds > args.seeds:
        raise UserError(f"--pretrain_seeds must be between 0 (all) and --seeds ({args.seeds}), got {args.pretrain_seeds}")
    args.budget_sizes = dataclasses.replace(budget, pretrain_tokens=args.pretrain_tokens, pretrain_lr=args.pretrain_lr)
    return args


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    args = parse_args(argv)
    budget, work = args.budget_sizes, os.path.abspath(args.work)
    packages = tuple(p.strip() for p in args.packages.split(",") if p.strip())
    seeds = list(range(1, args.seeds + 1))
    objectives = choose_objectives(args.objectives)
    for name, (base, _) in args.variants.items():
        choose_objectives(base)   # a one-line error for an objective that cannot be compared
        objectives.append(name)
    print(f"objectives: {', '.join(objectives)} and {SCRATCH}; seeds {seeds}; budget {args.budget} "
          f"({budget.note}); work folder {work}")
    if args.task == "manpages":
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        files = prepare_manpage_task(os.path.join(work, "task"), sections, args.labelled_per_class,
                                     args.val_per_class, args.task_seed, row_from=args.row_from)
        classes, what = len(sections), "pages' first characters"
    else:
        files = prepare_task(os.path.join(work, "task"), packages, args.labelled_per_class, args.val_per_class,
                             args.task_seed)
        classes, what = len(packages), "docstrings"
    prepare, pretraining, finetuning = plan(objectives, seeds, budget, files, args, work)
    print(f"preparing the shared tokenizer and token files ({prepare.out_dir})")
    execute_always(prepare)
    records = {}
    print(f"pretraining: {len(pretraining)} runs of {next(iter(pretraining.values())).max_steps} steps "
          f"({budget.batch_size} x {budget.model['seq_len']} tokens each)" if objectives else "pretraining: none")
    for run in pretraining.values():
        if finished_record(run) is None:
            copy_prepared(prepare.out_dir, run.out_dir)
        records[run.name] = execute(run)
    print(f"fine-tuning: {len(finetuning)} runs of {next(iter(finetuning.values())).max_steps} steps")
    for run in finetuning.values():
        records[run.name] = execute(run)
    features = {}
    if args.features:
        for objective in objectives:
            checkpoint = pretraining[objective, seeds[0]].final_checkpoint
            features[objective] = checkpoint_features(checkpoint, files.train, files.val)
        if objectives:   # scratch: the first row's model with fresh weights (the shape every row shares)
            features[SCRATCH] = checkpoint_features(pretraining[objectives[0], seeds[0]].final_checkpoint,
                                                    files.train, files.val, random_weights=True)
    lines = [f"Fine-tuned on {count_rows(files.train)} labelled {what} ({args.labelled_per_class} per class, "
             f"{classes} classes: chance is {100 / classes:.1f} %), validated on {count_rows(files.val)} "
             f"held out from pretraining; mean ± half the range over {len(seeds)} fine-tuning seed(s) "
             f"from {len(pretrain_seeds(seeds, args))} pretraining seed(s); the last evaluation of each "
             f"run (no selection on the validation set). Budget {args.budget}, device {args.device}, "
             f"Python {sys.version.split()[0]}.", "",
             *table(objectives, seeds, records, pretraining, finetuning, args.probe, pretrain_seeds(seeds, args),
                    features)]
    with open(os.path.join(work, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n\n(written to {os.path.join(work, 'table.md')})")
    first = seeds[0]   # every pretraining seed list starts with it
    draw([pretraining[o, first].out_dir for o in objectives], os.path.join(work, "pretraining.png"))
    draw([finetuning["finetune", o, first].out_dir for o in [*objectives, SCRATCH]],
         os.path.join(work, "finetuning.png"))
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


def execute_always(run: Run) -> None:
    """A run with no final checkpoint (--max_steps 0, preparing only): train.py itself reuses what is there."""
    os.makedirs(run.out_dir, exist_ok=True)
    command = [sys.executable, os.path.join(REPO, "train.py"), *run.flags]
    log_path = os.path.join(run.out_dir, "train.log")
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        raise UserError(f"{run.name} failed (exit code {code}); its output is in {log_path}")


if __name__ == "__main__":
    from minilm.cli import run_cli
    run_cli(main)
