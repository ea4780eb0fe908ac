"""train.py and sample.py as a user runs them: the happy path end to end, and every bad input
answered by one line on stderr with exit code 2, never a traceback.

run() starts a real process; run_in_process() (tests/conftest.py) runs the same command line in
this one, for checks that need no process of their own. One end-to-end run per kind of command
stays a real process: training, sampling, resuming, a training error and the exit wiring."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, load_script, run_in_process

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--seq_len", "32", "--batch_size", "4",
        "--vocab_size", "512", "--eval_batches", "1", "--log_every", "1", "--warmup_steps", "1",
        "--device", "cpu", "--threads", "1"]

pytestmark = pytest.mark.usefixtures("peak_flops_once")   # for the runs in this process


def run(script, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_user_error(result, *fragments):
    """Exit code 2 and exactly one line on stderr, 'error: ...', that mentions each fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    """A tiny model trained for a few steps through the real command line."""
    out = tmp_path_factory.mktemp("run")
    result = run("train.py", "--data", corpus_dir, "--out_dir", out, "--max_steps", 4, "--eval_every", 4, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_train_prints_config_progress_and_saves(trained):
    out, stdout = trained
    # the resolved config is printed at start, progress lines carry the promised fields
    assert "[model]" in stdout and "n_layer=1" in stdout and "[train]" in stdout
    step_lines = [ln for ln in stdout.splitlines() if ln.startswith("step") and "tok/s" in ln]
    assert len(step_lines) == 4
    for field in ("loss", "lr", "tok/s", "MFU", "ETA"):
        assert field in step_lines[-1]
    assert "val loss" in stdout and "bpb" in stdout
    # the run's provenance is printed once, before training
    run_lines = [ln for ln in stdout.splitlines() if ln.startswith("run:")]
    assert len(run_lines) == 1, run_lines
    fields = dict(item.split("=", 1) for item in run_lines[0][len("run:"):].split())
    assert fields["torch"] == torch.__version__ and fields["world_size"] == "1"
    assert "git_commit" in fields
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert any("val_bpb" in r for r in records)
    assert os.path.exists(os.path.join(out, "ckpt-00000004.pt"))


def test_prepared_data_is_reused_only_for_the_same_flags(trained, tmp_path, corpus_dir):
    """train.py's reuse decision (tokenizer_and_data, called in-process to keep this fast) on a
    copy of the trained run's out_dir: the same flags reuse it; another --val_fraction or
    --character_coverage prepares again and says why."""
    from minilm.config import parse_overrides
    from minilm.data import load_meta
    train_script = load_script("train.py")
    out, _ = trained
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(os.path.join(out, "tokenizer.model"), copy)
    shutil.copytree(os.path.join(out, "data"), copy / "data")
    first = load_meta(copy / "data")

    def rerun(*flags):
        cfg = parse_overrides(["--data", corpus_dir, "--out_dir", str(copy), *map(str, TINY), "--num_workers", "1",
                               *flags])
        lines = []
        train_script.tokenizer_and_data(cfg, log=lines.append)
        return lines, load_meta(copy / "data")

    lines, meta = rerun()
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines
    assert meta == first
    lines, meta = rerun("--text_field", "body")  # no .jsonl data: the field does not matter
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines

    lines, meta = rerun("--val_fraction", "0.3")
    assert lines[0] == "preparing again: --val_fraction changed (0.05 -> 0.3)", lines
    assert any(ln.startswith("prepared ") for ln in lines)
    assert first["val_documents"] == 3 and meta["val_documents"] == 18
    assert meta["val_tokens"] > 3 * first["val_tokens"]
    assert meta["settings"]["val_fraction"] == 0.3
    lines, again = rerun("--val_fraction", "0.3")
    assert len(lines) == 1 and lines[0].startswith("reusing"), lines
    assert again == meta

    lines, _ = rerun("--val_fraction", "0.3", "--character_coverage", "0.99")
    assert lines[0] == "preparing again: --character_coverage changed (0.9995 -> 0.99)", lines


def test_sample_prints_text_from_the_checkpoint_alone(trained):
    out, _ = trained
    result = run("sample.py", "--ckpt", out, "--prompt", "The", "--num_samples", 2,
                 "--max_new_tokens", 10, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- sample") == 2
    samples = result.stdout.split("--- sample")[1:]
    assert all(s.split("\n", 1)[1].startswith("The") for s in samples)
    assert result.stderr == ""  # everything fitted the context window: no note


def test_sample_past_the_context_window_says_so_once(trained):
    out, _ = trained
    result = run_in_process("sample.py", "--ckpt", os.path.join(out, "ckpt-00000004.pt"), "--num_samples", 1,
                            "--max_new_tokens", 50, "--device", "cpu", "--top_k", 5)
    assert result.returncode == 0, result.stderr
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "context window (32 tokens)" in notes[0]


def test_resume_continues_and_refuses_a_new_shape(trained, tmp_path):
    out, _ = trained
    resumed = run("train.py", "--out_dir", out, "--resume", "--max_steps", 6, "--eval_every", 100)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout and "resumed from" in resumed.stdout
    assert "step      6/6" in resumed.stdout
    assert_user_error(run_in_process("train.py", "--out_dir", out, "--resume", "--n_layer", 3), "--n_layer", "resum")


def test_invalid_utf8_is_replaced_and_reported(tmp_path, corpus_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in sorted(os.listdir(corpus_dir))[:30]:
        (folder / name).write_bytes(open(os.path.join(corpus_dir, name), "rb").read())
    (folder / "broken.txt").write_bytes(b"caf\xe9 and na\xefve text\n" * 3)
    result = run_in_process("train.py", "--data", folder, "--out_dir", tmp_path / "out", "--max_steps", 1, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 invalid UTF-8 bytes replaced" in result.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "vocab", "heads", "flag", "dtype", "preset"])
def test_bad_training_input_is_one_line(case, tmp_path, corpus_dir):
    args = ["--out_dir", tmp_path / "out", "--max_steps", 1, "--warmup_steps", 0]
    expect = []
    if case == "missing":
        args += ["--data", tmp_path / "nope.txt"]
        expect = ["does not exist"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        args += ["--data", tmp_path / "empty.txt"]
        expect = ["empty"]
    elif case == "binary":
        (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
        args += ["--data", tmp_path / "blob.bin"]
        expect = ["binary"]
    elif case == "vocab":
        args += ["--data", corpus_dir, "--vocab_size", 60000]
        expect = ["vocab_size 60000", "--vocab_size"]
    elif case == "heads":
        args += ["--n_embd", 30, "--n_head", 4]
        expect = ["divisible by n_head"]
    elif case == "flag":
        args += ["--max_step", 5]
        expect = ["unknown flag --max_step", "did you mean --max_steps"]
    elif case == "dtype":
        args += ["--dtype", "fp16", "--device", "cpu", "--data", corpus_dir]
        expect = ["fp16"]
    elif case == "preset":
        args += ["--preset", "huge"]
        expect = ["--preset", "tiny"]
    # one case through a real process, so the CLI's error wiring stays covered end to end
    runner = run if case == "flag" else run_in_process
    assert_user_error(runner("train.py", *args), *expect)


def test_checkpoint_whose_vocab_does_not_match_its_tokenizer(trained, tmp_path):
    out, _ = trained
    state = torch.load(os.path.join(out, "ckpt-00000004.pt"), weights_only=True)
    state["config"]["model"]["vocab_size"] = 640
    torch.save(state, tmp_path / "bad.pt")
    assert_user_error(run_in_process("sample.py", "--ckpt", tmp_path / "bad.pt"), "512", "640")


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sample_refuses_bad_checkpoints(tmp_path):
    assert_user_error(run_in_process("sample.py", "--ckpt", tmp_path / "none.pt"), "no checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    assert_user_error(run_in_process("sample.py", "--ckpt", tmp_path / "junk.pt"), "cannot load")
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"config": {}, "model": Payload(str(marker))}, f)
    assert_user_error(run_in_process("sample.py", "--ckpt", tmp_path / "evil.pt"), "cannot load")
    assert not marker.exists()
    # the same payload inside torch.save's zip format, met by train.py --resume (a file, then as
    # the newest checkpoint of an out_dir, where it is skipped as unloadable)
    torch.save({"config": {}, "model": Payload(str(marker))}, tmp_path / "evil-zip.pt")
    assert_user_error(run_in_process("train.py", "--resume", tmp_path / "evil-zip.pt", "--out_dir", tmp_path / "o"),
                      "cannot load", "refused to unpickle")
    (tmp_path / "run").mkdir()
    os.replace(tmp_path / "evil-zip.pt", tmp_path / "run" / "ckpt-00000009.pt")
    assert_user_error(run_in_process("train.py", "--resume", "--out_dir", tmp_path / "run"),
                      "none of the 1 checkpoints")
    assert not marker.exists()
    assert_user_error(run_in_process("sample.py", "--top_p", 0), "--top_p")
    assert_user_error(run_in_process("sample.py", "--top_k", -1), "--top_k")
    assert_user_error(run_in_process("sample.py", "--temperature", -0.5), "--temperature")
    assert_user_error(run_in_process("sample.py", "--temprature", 1), "did you mean --temperature")


def test_ci_runs_the_readme_test_command_verbatim():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = readme.split("```bash\n")[1:]
    commands = [b.split("```", 1)[0].strip() for b in blocks]
    test_command = next(c for c in commands if "pytest" in c)
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert test_command in ci
    main_command = commands[0]
    assert "python train.py" in main_command and "python sample.py" in main_command


def test_library_imports_no_hugging_face_package():
    import re
    hf = r"(transformers|tokenizers|datasets|accelerate|huggingface_hub|safetensors)"
    banned = re.compile(rf"^\s*(from|import)\s+{hf}\b|import_module\(\s*['\"]{hf}|__import__\(\s*['\"]{hf}", re.M)
    sources = [os.path.join(ROOT, f) for f in ("train.py", "sample.py")]
    for root, _, names in os.walk(os.path.join(ROOT, "minilm")):
        sources += [os.path.join(root, n) for n in names if n.endswith(".py")]
    for path in sources:
        assert not banned.search(open(path).read()), path


@pytest.mark.parametrize("outcome,code", [("return", 0), ("user_error", 2), ("stopped", 143)])
def test_torchrun_worker_exit_keeps_output_and_code(outcome, code):
    """Under torchrun, run_cli ends the process with os._exit (see minilm.distributed.exit_process):
    output still buffered in Python must be flushed first, and the exit code must survive."""
    script = (
        "import sys\n"
        "from minilm.cli import run_cli\n"
        "from minilm.errors import UserError\n"
        "def main(argv):\n"
        "    sys.stdout.write('buffered line without a newline')\n"
        f"    if {outcome!r} == 'user_error': raise UserError('bad flag; fix it')\n"
        f"    if {outcome!r} == 'stopped': raise SystemExit(143)\n"
        "run_cli(main)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    env.pop("PYTHONUNBUFFERED", None)   # buffered, as stdout to a pipe or a file normally is
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered line without a newline"
    assert result.stderr == ("error: bad flag; fix it\n" if outcome == "user_error" else "")


def test_a_reader_that_goes_away_ends_the_program_quietly():
    """`sample.py ... | head -1`: the pipe closes under a program still printing. Python raises
    BrokenPipeError (it ignores SIGPIPE); the command line stops with no traceback and 141, as a
    shell tool killed by SIGPIPE does."""
    program = ("import sys; sys.path.insert(0, sys.argv[1]); from minilm.cli import run_cli\n"
               "def main(argv):\n    for i in range(200000):\n        print('line', i)\n"
               "run_cli(main)\n")
    reader = subprocess.Popen([sys.executable, "-c", program, ROOT], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    reader.stdout.readline()
    reader.stdout.close()   # the reader goes away, as `head -1` does
    _, stderr = reader.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()[-2000:]
    assert reader.returncode == 141


def code_words(path: str) -> list[tuple[int, str]]:
    """(line, text) of every identifier and string literal of a Python file's code: its comments
    and docstrings left out."""
    import ast
    import io
    import tokenize
    with open(path, encoding="utf-8") as f:
        source = f.read()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
            if token.type in (tokenize.NAME, tokenize.STRING) and token.start[0] not in docstrings]


@pytest.mark.parametrize("path", ["train.py", "minilm/trainer.py", "minilm/faults.py", "minilm/provenance.py",
                                  "minilm/run_dir.py"])
def test_the_training_path_names_no_objective(path):
    """train.py and the files it calls on name no objective in code: what an objective needs of a
    run (its `auto` options, its label set, which parents it starts from, its report) is a hook it
    overrides in its own file (objectives/base.py, run hooks)."""
    import re
    from minilm.objectives import OBJECTIVES
    found = [(line, text) for line, text in code_words(os.path.join(ROOT, path)) for name in OBJECTIVES
             if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", text)]
    assert found == []


def test_train_py_reads_in_one_sitting():
    """train.py is the path (config, tokenizer and data, objective, Trainer); the plumbing around it
    lives in minilm/provenance.py and minilm/run_dir.py."""
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250
