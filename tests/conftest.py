"""Shared fixtures: one small tokenizer and one small prepared corpus for the whole session,
so each test file does not pay for sentencepiece training again."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))


def load_script(name: str):
    """A top-level script (train.py, sample.py) as a module, to call its functions in-process:
    much faster than a subprocess where the test needs no command line."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module named NAME (benchmarks/ is no package), to test its functions."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_in_process(script: str, *args) -> subprocess.CompletedProcess:
    """`python script args` without a new interpreter: the script's main goes through run_cli, as
    its last line does, with sys.argv set and stdout and stderr captured, and the exit code
    (sys.exit in exit_process) caught. Returns what tests.test_cli.run returns, in ~1 s instead of
    5-10 s (no interpreter and torch start-up, no first-use costs paid again).

    For what the checks need of the command line (exit code, one `error:` line, output); keep
    run() for what needs a real process: signals, torchrun, exit_process's own wiring, and one
    end-to-end run per kind of command. What a run changes in this process is put back: the
    thread count (--threads) and torch's random state (train.py seeds it)."""
    from minilm.distributed import launched_by_torchrun
    assert not launched_by_torchrun(), "run_cli would end this process with os._exit"
    module = load_script(script)
    argv = [os.path.join(ROOT, script), *map(str, args)]
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    try:
        code, out, err = run_main(module.main, argv)
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng)
    return subprocess.CompletedProcess(argv, code, out, err)


def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    """A command's `main` through run_cli with sys.argv = argv, stdout and stderr captured and its
    exit caught: (exit code, stdout, stderr)."""
    import contextlib
    import io
    from minilm.cli import run_cli
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                run_cli(main)
                code = 0
            except SystemExit as stop:
                code = stop.code
    finally:
        sys.argv = saved_argv
    return code, stdout.getvalue(), stderr.getvalue()


def corpus_texts(n_docs: int = 60) -> list[str]:
    """The first documents of the built-in corpus: real English prose, no download."""
    from minilm.data import builtin_documents
    docs = []
    for doc in builtin_documents():
        docs.append(doc)
        if len(docs) == n_docs:
            break
    return docs


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread: with two on a busy 2-core machine, OpenMP's
    hand-offs made each forward pass of the test models ~100x slower (150 ms instead of 1 ms).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _peak_flops(device: str, dtype: torch.dtype) -> float:
    from minilm.flops import measure_peak_flops
    return measure_peak_flops(device, dtype)


@pytest.fixture
def peak_flops_once(monkeypatch):
    """Trainer.fit measures the matmul peak, for the MFU column only, at every start (~0.5 s of
    large matmuls); a module that starts many runs measures it once per device and dtype for the
    whole session (as test_trainer.py sets trainer.peak_flops to skip it). Opt in with
    `pytestmark = pytest.mark.usefixtures("peak_flops_once")`; the MFU column is still computed."""
    import minilm.trainer
    monkeypatch.setattr(minilm.trainer, "measure_peak_flops",
                        lambda device, dtype=torch.float32: _peak_flops(str(torch.device(device)), dtype))


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return corpus_texts()


@pytest.fixture(scope="session")
def tokenizer(texts):
    from minilm.tokenizer import Tokenizer
    return Tokenizer.train(texts, vocab_size=1024)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, texts):
    """A folder of .txt files (one document each) made from the built-in corpus."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(texts):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir, tokenizer):
    """corpus_dir tokenized into train/val memmaps: (folder, meta)."""
    from minilm.data import prepare
    folder = str(tmp_path_factory.mktemp("prepared"))
    meta = prepare(corpus_dir, tokenizer, folder, val_fraction=0.1, num_workers=1, log=lambda *_: None)
    return folder, meta
