"""One run folder, one run: the lock, fresh runs among old checkpoints (--overwrite), resume that
checks its data and its model, retention that counts only loadable files, metrics without
duplicate rows, and continued pretraining with --init_from.

The command lines run in this process (run_in_process) unless a real process is the point: a lock
held by another process, torchrun, and one end-to-end --init_from run."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from minilm import run_dir
from minilm.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from minilm.errors import UserError
from minilm.run_dir import RunLock, check_run_dir, clear_previous_run, keep_metrics_up_to
from minilm.tokenizer import Tokenizer
from tests.conftest import ROOT, load_script, run_in_process
from tests.test_cli import TINY, assert_user_error, run
from tests.test_trainer import make_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")


# ----------------------------------------------------------------------------- the lock
def test_a_second_lock_on_a_folder_is_refused_until_released(tmp_path):
    first = RunLock.acquire(str(tmp_path))
    with pytest.raises(UserError, match=rf"in use by another run \(process {os.getpid()} "):
        RunLock.acquire(str(tmp_path))
    first.release()
    RunLock.acquire(str(tmp_path)).release()


def hold_lock_in_child(folder):
    """A child process that takes the lock and waits; returns it once the lock is held."""
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r})\n"
            "from minilm.run_dir import RunLock\n"
            f"lock = RunLock.acquire({str(folder)!r}); print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    child = hold_lock_in_child(tmp_path)
    with pytest.raises(UserError, match=f"process {child.pid} "):
        RunLock.acquire(str(tmp_path))
    child.send_signal(signal.SIGKILL)     # no chance to clean up
    child.wait()
    child.stdout.close()
    RunLock.acquire(str(tmp_path)).release()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """Where flock is missing, a lock file naming a live process on this host is respected and
    one naming a dead process is stale."""
    monkeypatch.setattr(run_dir, "fcntl", None)
    child = hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(UserError, match=f"process {child.pid} "):
            RunLock.acquire(str(tmp_path))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    # the child is gone, its pid is still written in the file: stale, taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == child.pid
    lock = RunLock.acquire(str(tmp_path))
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_train_refuses_a_folder_another_run_holds(tmp_path, corpus_dir):
    out = tmp_path / "run"
    out.mkdir()
    child = hold_lock_in_child(out)
    try:
        result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--max_steps", 1, *TINY)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert_user_error(result, "in use by another run", f"process {child.pid}")
    # refused before any work: no tokenizer, no token files were written over the other run's
    assert sorted(os.listdir(out)) == [".lock"]


def test_under_torchrun_every_process_stops_when_rank_0_refuses(tmp_path, corpus_dir):
    """Rank 0 alone takes the lock; its one-line refusal reaches every process (distributed.on_main),
    which otherwise would wait at the next collective for a rank that has already exited."""
    out = tmp_path / "run"
    out.mkdir()
    child = hold_lock_in_child(out)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 os.path.join(ROOT, "train.py"), "--data", corpus_dir, "--out_dir", str(out),
                                 "--max_steps", "1", *map(str, TINY)],
                                capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert result.returncode != 0
    # every process that got to say something said the refusal (torchrun may end rank 1 as soon
    # as rank 0 exits, before it prints), and it all ended well inside the timeout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all("in use by another run" in line for line in errors), result.stderr[-2000:]
    assert sorted(os.listdir(out)) == [".lock"]


# ----------------------------------------------------------------------------- fresh runs, --overwrite
def fake_checkpoint(folder, step):
    save_checkpoint(checkpoint_path(str(folder), step), {"config": {}, "model": {"w": torch.full((2,), step)}})


def test_a_fresh_start_among_checkpoints_needs_overwrite(tmp_path):
    fake_checkpoint(tmp_path, 600)
    (tmp_path / "metrics.jsonl").write_text('{"step": 600, "loss": 1.0}\n')
    with pytest.raises(UserError, match="already holds 1 checkpoint.*--resume.*--init_from.*--overwrite"):
        check_run_dir(str(tmp_path), fresh=True, overwrite=False)
    check_run_dir(str(tmp_path), fresh=False, overwrite=False)   # --resume continues them
    # --overwrite never deletes the checkpoint an --init_from run starts from
    parent = checkpoint_path(str(tmp_path), 600)
    with pytest.raises(UserError, match="would delete .*ckpt-00000600.pt"):
        check_run_dir(str(tmp_path), fresh=True, overwrite=True, keep=(parent,))
    check_run_dir(str(tmp_path), fresh=True, overwrite=True)
    assert list_checkpoints(str(tmp_path)) == [parent]         # checking deletes nothing
    assert clear_previous_run(str(tmp_path)) == ["ckpt-00000600.pt", "metrics.jsonl"]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- retention
def test_a_damaged_newer_file_takes_no_retention_slot(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    damaged = checkpoint_path(str(tmp_path), 9)
    with open(damaged, "wb") as f:
        f.write(b"PK\x03\x04 cut short by a crash")
    deleted = prune_checkpoints(str(tmp_path), 2)
    # the two newest checkpoints that load are kept; the damaged one is left for inspection
    assert deleted == [checkpoint_path(str(tmp_path), 1)]
    assert list_checkpoints(str(tmp_path)) == [checkpoint_path(str(tmp_path), s) for s in (2, 3, 9)]


# ----------------------------------------------------------------------------- metrics
def test_resume_drops_the_metric_rows_it_redoes(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "val_loss": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo'   # torn by a crash
    (tmp_path / "metrics.jsonl").write_text(text)
    assert keep_metrics_up_to(str(tmp_path), 4) == 3
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:4] + [rows[-1]]
    assert keep_metrics_up_to(str(tmp_path), 4) == 0


def test_a_full_disk_while_logging_names_the_last_checkpoint(tmp_path, prepared, tokenizer, monkeypatch):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=4, ckpt_every=2, log_every=1, eval_every=100)
    trainer = make_trainer(cfg, prepared, tokenizer)
    trainer.fit(until=2)
    real_write = os.write

    def full_disk(fd, data):
        real_write(fd, data[: len(data) // 2])     # part of the line reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(UserError, match=r"No space left on device; .*ckpt-00000002.pt is the last good checkpoint"):
        trainer.fit()
    monkeypatch.undo()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]   # no torn third line


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def first_run(tmp_path_factory, corpus_dir):
    """A tiny clm run of 4 steps with a checkpoint every 2, through the command line."""
    out = tmp_path_factory.mktemp("first") / "run"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--max_steps", 4, "--ckpt_every", 2,
                            "--eval_every", 100, *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def copy_run(first_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


def test_a_fresh_run_in_a_used_folder_is_refused_then_overwritten(first_run, tmp_path, corpus_dir):
    out = copy_run(first_run, tmp_path)
    args = ["--data", corpus_dir, "--out_dir", out, "--max_steps", 1, *TINY]
    assert_user_error(run_in_process("train.py", *args), "already holds 2 checkpoint(s)", "--overwrite")
    result = run_in_process("train.py", *args, "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deleted 2 checkpoint(s)" in result.stdout
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["ckpt-00000001.pt"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 1]   # train + val row


def test_resume_compares_values_not_flag_names(first_run, tmp_path, corpus_dir):
    out = copy_run(first_run, tmp_path)
    # the original command again, plus --resume: nothing changes, so it goes on
    same = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--ckpt_every", 2, "--eval_every", 100,
                          *TINY, "--resume", "--max_steps", 5)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "resumed from" in same.stdout and "at step 4" in same.stdout
    assert_user_error(run_in_process("train.py", "--out_dir", out, "--resume", "--rope_base", 500000),
                      "--rope_base cannot change", "resuming")
    # the same rule in-process (fast): what changes the computed function, the objective or the data
    path = os.path.join(out, "ckpt-00000005.pt")
    state = load_checkpoint(path)
    train_script = load_train_script()
    assert train_script.config_for_resume(["--dropout", "0.1", "--lr", "1e-3"], state, path).train.lr == 1e-3
    for flag, value in (("--norm_eps", "1e-6"), ("--embed_norm", "true"), ("--n_layer", "2"),
                        ("--position", "learned"), ("--tie_embeddings", "false"), ("--preset", "small")):
        with pytest.raises(UserError, match="cannot change when resuming"):
            train_script.config_for_resume([flag, value], state, path)
    with pytest.raises(UserError, match="--objective cannot change.*--init_from"):
        train_script.config_for_resume(["--objective", "mlm"], state, path)
    for flag, value in (("--data", str(tmp_path)), ("--val_fraction", "0.2"), ("--text_field", "body")):
        with pytest.raises(UserError, match=f"{flag} cannot change.*--init_from"):
            train_script.config_for_resume([flag, value], state, path)


def load_train_script():
    return load_script("train.py")


def test_resume_prepares_missing_or_foreign_data_with_its_own_tokenizer(first_run, tmp_path, corpus_dir):
    out = copy_run(first_run, tmp_path)
    original = (out / "data" / "train.bin").read_bytes()
    shutil.rmtree(out / "data")
    resumed = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 5)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "is missing: preparing it again with the checkpoint's tokenizer" in resumed.stdout
    assert (out / "data" / "train.bin").read_bytes() == original    # the very tokens it trained on

    # another run's tokenizer re-prepared the folder (same vocab size): prepared again, same tokens
    from minilm.data import prepare
    from tests.conftest import corpus_texts
    other = Tokenizer.train(corpus_texts(80)[40:], 512)
    prepare(corpus_dir, other, str(out / "data"), num_workers=1, log=lambda *_: None)
    assert (out / "data" / "train.bin").read_bytes() != original
    resumed = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 6)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "was made by another tokenizer: preparing it again" in resumed.stdout
    assert (out / "data" / "train.bin").read_bytes() == original


def test_resume_refuses_edited_source_it_cannot_reproduce(first_run, tmp_path, corpus_dir):
    data = tmp_path / "corpus"
    shutil.copytree(corpus_dir, data)
    out = tmp_path / "run"
    first = run_in_process("train.py", "--data", data, "--out_dir", out, "--max_steps", 2, "--eval_every", 100, *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(data / "doc000.txt", "a") as f:
        f.write("\nAn edit made after the checkpoint.\n")
    # prepared tokens intact: resume goes on with them and says the source changed
    resumed = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "changed since" in resumed.stdout and "--init_from" in resumed.stdout
    # prepared tokens gone and the source edited: they cannot be made again
    shutil.rmtree(out / "data")
    assert_user_error(run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 4), "changed since",
                      "--init_from")


def test_sample_falls_back_past_a_damaged_newest_checkpoint(first_run, tmp_path):
    out = copy_run(first_run, tmp_path)
    with open(out / "ckpt-00000004.pt", "r+b") as f:
        f.truncate(1000)
    result = run_in_process("sample.py", "--ckpt", out, "--num_samples", 1, "--max_new_tokens", 3, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "skipping" in result.stderr and "ckpt-00000004.pt" in result.stderr
    assert result.stdout.count("--- sample") == 1
    # resuming from step 2 redoes steps 3 and 4: each step's row appears once in metrics.jsonl
    resumed = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 4)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "dropped 3 row(s) logged after step 2" in resumed.stdout   # steps 3, 4 and the val row of 4
    train_rows = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert train_rows == [1, 2, 3, 4]


def test_max_steps_zero_prepares_and_stops(tmp_path, corpus_dir):
    out = tmp_path / "run"
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, *TINY, "--max_steps", 0,
                            "--warmup_steps", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "nothing to train" in result.stdout
    assert (out / "tokenizer.model").exists() and (out / "data" / "train.bin").stat().st_size > 0
    assert list_checkpoints(str(out)) == []


# ----------------------------------------------------------------------------- --init_from
def test_init_from_continues_pretraining_on_new_text(first_run, tmp_path):
    new_text = tmp_path / "new"
    new_text.mkdir()
    sentences = [f"Document {i} talks about gardens, rivers and the number {i * 7}.\n" * 30 for i in range(12)]
    for i, doc in enumerate(sentences):
        (new_text / f"{i}.txt").write_text(doc)
    out = tmp_path / "child"
    parent_path = os.path.join(first_run, "ckpt-00000004.pt")
    result = run("train.py", "--init_from", first_run, "--data", new_text, "--out_dir", out, "--max_steps", 2,
                 "--eval_every", 100, "--batch_size", 4, "--log_every", 1, "--warmup_steps", 1, "--device", "cpu",
                 "--threads", 1, "--lr", 1e-9, "--min_lr", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"initialized from {parent_path} (step 4, clm)" in result.stdout
    parent = load_checkpoint(parent_path)
    child = load_checkpoint(os.path.join(out, "ckpt-00000002.pt"))
    # the parent's tokenizer, byte for byte, never retrained
    assert (out / "tokenizer.model").read_bytes() == Tokenizer(parent["tokenizer"].numpy().tobytes()).model_bytes
    assert torch.equal(child["tokenizer"], parent["tokenizer"])
    # the first step started from the parent's weights (lr 1e-9: two steps move them by ~1e-9)
    for key, value in parent["model"].items():
        assert torch.allclose(child["model"][key], value, atol=1e-6), key
    # step 0, fresh optimizer and schedule; the parent is recorded
    assert child["step"] == 2 and child["config"]["train"]["init_from"] == parent_path   # the file a folder meant
    assert child["parent"] == {"path": os.path.abspath(parent_path), "step": 4, "objective": "clm"}
    assert child["config"]["model"] == parent["config"]["model"]
    # the tokens come from the new text, encoded with the parent's tokenizer
    tokenizer = Tokenizer.load(str(out / "tokenizer.model"))
    tokens = np.fromfile(out / "data" / "train.bin", dtype=np.uint16)
    assert "gardens, rivers" in tokenizer.decode(tokens[:200].tolist())
    assert "gardens" not in tokenizer.decode(np.fromfile(os.path.join(first_run, "data", "train.bin"),
                                                         dtype=np.uint16).tolist())


def test_init_from_refuses_a_backbone_that_does_not_fit(first_run, tmp_path):
    out = tmp_path / "child"
    # a clm backbone has no embedding norm, which the masked LMs' encoder needs
    assert_user_error(run_in_process("train.py", "--init_from", first_run, "--out_dir", out, "--objective", "mlm"),
                      "--init_from", "embed_norm")
    parent_path = os.path.join(first_run, "ckpt-00000004.pt")
    with pytest.raises(UserError, match="n_layer=1 but --n_layer 3 was asked"):
        load_train_script().config_for_init(["--n_layer", "3"], load_checkpoint(parent_path), parent_path)
    from minilm.config import parse_overrides
    from minilm.distributed import DistInfo
    argv = ["--init_from", parent_path, "--resume", "--out_dir", str(out)]
    with pytest.raises(UserError, match="--resume continues a run, --init_from starts a new one"):
        load_train_script().train(parse_overrides(argv), argv, DistInfo(), log=lambda *_: None)
    assert not out.exists() or list_checkpoints(str(out)) == []


def test_init_from_moves_a_masked_lm_backbone_and_head_into_span(tmp_path, corpus_dir):
    parent_dir = tmp_path / "mlm"
    first = run_in_process("train.py", "--data", corpus_dir, "--out_dir", parent_dir, "--objective", "mlm",
                           "--max_steps", 1, "--eval_every", 100, *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    child_dir = tmp_path / "span"
    result = run_in_process("train.py", "--init_from", parent_dir, "--data", corpus_dir, "--out_dir", child_dir,
                            "--objective", "span", "--max_steps", 1, "--eval_every", 100, "--batch_size", 4,
                            "--warmup_steps", 1, "--device", "cpu", "--threads", 1, "--lr", 1e-9, "--min_lr", 0)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(step 1, mlm): the backbone, " in result.stdout and "head tensor(s)" in result.stdout
    assert "start from scratch" not in result.stdout        # the span objective has the very same head
    parent = load_checkpoint(os.path.join(parent_dir, "ckpt-00000001.pt"))["model"]
    child = load_checkpoint(os.path.join(child_dir, "ckpt-00000001.pt"))["model"]
    assert set(parent) == set(child)
    assert all(torch.allclose(parent[k], child[k], atol=1e-6) for k in parent)


# ----------------------------------------------------------------------------- --overwrite: check first, delete last
def files_in(folder) -> dict:
    """Every file under `folder` that is not hidden (the lock and the run mark are), with its bytes:
    what a run that stops with an error must leave as it found it."""
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith("."):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.mark.parametrize("case", ["a typo in --data", "no --label_field column", "--data is the run folder",
                                  "--data inside the run folder", "a bad row deep in --data"])
def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(case, first_run, tmp_path, corpus_dir):
    """--overwrite with bad input: the one-line error, and the previous run's files all still there
    (they used to be deleted first, and the error came after)."""
    out = copy_run(first_run, tmp_path)
    args = ["--data", corpus_dir]
    if case == "a typo in --data":
        args, fragments = ["--data", corpus_dir + "-typo"], ["does not exist"]
    elif case == "no --label_field column":
        (tmp_path / "reviews.tsv").write_text("text\tcategory\ngood film\tpos\nbad film\tneg\n")
        args, fragments = ["--objective", "classify", "--data", tmp_path / "reviews.tsv"], ["'label'", "--label_field"]
    elif case == "--data is the run folder":
        (out / "my_notes.txt").write_text("Text the user keeps beside the run. " * 40)
        args, fragments = ["--data", out], ["--data", "--out_dir", "outside"]
    elif case == "--data inside the run folder":
        shutil.copytree(corpus_dir, out / "texts")
        args, fragments = ["--data", out / "texts"], ["--data", "--out_dir", "outside"]
    else:   # found only while the tokenizer reads the data: after every check that reads first rows
        rows = tmp_path / "rows.jsonl"
        rows.write_text("".join(json.dumps({"text": f"Row {i} says something."}) + "\n" for i in range(40))
                        + '{"body": "the text is elsewhere"}\n')
        args, fragments = ["--data", rows], ["rows.jsonl:41", "--text_field"]
    before = files_in(out)
    assert list_checkpoints(str(out))
    result = run_in_process("train.py", *args, "--out_dir", out, "--overwrite", "--max_steps", 1, *TINY)
    assert_user_error(result, *fragments)
    assert files_in(out) == before


def test_a_folder_minilm_did_not_make_is_never_written_over(tmp_path, corpus_dir):
    """A fresh run into a folder of the user's own files with a run's names (metrics.jsonl,
    tokenizer.model, data/) is refused in one line, --overwrite or not; one with unrelated files
    only takes the run beside them, and they stay through a later --overwrite."""
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "survey.csv").write_text("a,b\n1,2\n")
    (out / "metrics.jsonl").write_text('{"accuracy": 0.9}\n')
    (out / "tokenizer.model").write_bytes(b"my own tokenizer")
    (out / "notes.txt").write_text("my notes")
    before = files_in(out)
    args = ["--data", corpus_dir, "--out_dir", out, "--max_steps", 0, *TINY]
    for extra in ([], ["--overwrite"]):
        assert_user_error(run_in_process("train.py", *args, *extra), "not a minilm run folder", "metrics.jsonl",
                          "tokenizer.model", "another --out_dir")
        assert files_in(out) == before
    for name in ("metrics.jsonl", "tokenizer.model"):
        (out / name).unlink()
    shutil.rmtree(out / "data")
    for extra in ([], ["--overwrite"]):
        result = run_in_process("train.py", *args, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        assert (out / "notes.txt").read_text() == "my notes" and (out / "data" / "train.bin").exists()


def test_overwrite_removes_every_file_the_previous_run_wrote(first_run, tmp_path, corpus_dir):
    """best.pt of the previous run (a classifier's) would answer `sample.py --ckpt out/best.pt`
    after an --overwrite run that writes none; tensorboard events and a killed save's temporary
    would mix in too. The tokenizer and token files made from the same data are kept, and the log
    says so. A folder from before minilm marked its run folders counts by its checkpoints."""
    out = copy_run(first_run, tmp_path)
    (out / ".minilm-run").unlink(missing_ok=True)   # as an older minilm left its run folders
    shutil.copy(out / "ckpt-00000004.pt", out / "best.pt")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"the previous run's curves")
    (out / ".tmp-ckpt-00000006.pt-x1y2").write_bytes(b"half a checkpoint")
    (out / "notes.txt").write_text("mine")
    tokens = (out / "data" / "train.bin").read_bytes()
    result = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--overwrite", "--max_steps", 1,
                            "--eval_every", 100, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(n for n in os.listdir(out) if n not in (".lock", ".minilm-run")) == \
        ["ckpt-00000001.pt", "data", "metrics.jsonl", "notes.txt", "tokenizer.model"]
    assert "deleted 2 checkpoint(s)" in result.stdout and "best.pt" in result.stdout
    assert "reusing" in result.stdout and (out / "data" / "train.bin").read_bytes() == tokens
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 1]


def test_every_name_a_run_writes_is_one_the_run_folder_rules_know(tmp_path, texts):
    """The names --overwrite deletes and a folder minilm did not make refuses to hold are one list
    (run_dir.is_run_output): a classify run, which writes the most kinds of file (best.pt too),
    leaves nothing outside it."""
    table = tmp_path / "rows.tsv"
    table.write_text("text\tlabel\n" + "".join(" ".join(doc[:300].split()) + f"\t{'ab'[i % 2]}\n"
                                                for i, doc in enumerate(texts)))
    out = tmp_path / "run"
    result = run_in_process("train.py", "--objective", "classify", "--data", table, "--out_dir", out,
                            "--max_steps", 2, "--eval_every", 1, "--ckpt_every", 1, *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert "best.pt" in names and "metrics.jsonl" in names
    assert [n for n in names if not run_dir.is_run_output(n) and n not in (run_dir.LOCK_NAME, run_dir.MARK_NAME)] == []
