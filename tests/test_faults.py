"""Runs that survive crashes, bad data and bad files: atomic checkpoints, retention, resume from
the newest loadable file, signals, non-finite losses, full disks, and one-line errors.

Command lines run in this process (run_in_process) unless a real process is the point: a save
killed mid-write, signals, and one end-to-end one-line error."""
from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilm.checkpoint import (list_checkpoints, load_checkpoint, newest_loadable, prune_checkpoints,
                               save_checkpoint)
from minilm.errors import UserError
from minilm.objectives.clm import CausalLM
from tests.conftest import ROOT, load_script, run_in_process
from tests.test_cli import TINY, assert_user_error, run
from tests.test_trainer import make_config, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")


# ----------------------------------------------------------------------------- checkpoint files
def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    """A child process rewrites the same checkpoint in a loop and is SIGKILLed at arbitrary
    moments: the file on disk always loads, and it is always one complete version."""
    path = str(tmp_path / "ckpt-00000001.pt")
    save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(4)}, "version": 0})
    child = (f"import sys, torch; sys.path.insert(0, {ROOT!r})\n"
             "from minilm.checkpoint import save_checkpoint\n"
             "for v in range(1, 10**6):\n"
             f"    save_checkpoint({path!r}, {{'config': {{}}, 'model': {{'w': torch.full((4_000_000,), float(v))}}, "
             "'version': v})\n"
             "    print(v, flush=True)\n")
    for delay in (0.05, 0.23, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()                   # its first save is done (importing torch can be slow)
        time.sleep(delay)                        # then kill it at some moment of a later save
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = torch.load(path, weights_only=True)   # never a half-written file (a state, no model: not checked)
        w = state["model"]["w"]
        assert torch.all(w == state["version"]) and w.numel() in (4, 4_000_000)
        assert state["version"] >= 1           # one of the child's saves, whole
    # no temporary files are mistaken for checkpoints
    assert list_checkpoints(str(tmp_path)) == [path]


def full_disk(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class WriteCutOff:
    """A file opened for writing whose writes stop, as on a full disk or a crash, once `limit`
    bytes have gone through: the bytes up to the limit reach the file, then OSError."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, data):
        if len(data) > self.left:
            self.f.write(bytes(data[:self.left]))
            self.f.flush()
            self.left = 0
            full_disk()
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("short_by", [None, 1, 4096, 0], ids=["nothing-written", "all-but-one-byte", "4KiB-short",
                                                              "all-bytes-then-fail"])
def test_an_overwrite_cut_off_at_any_byte_leaves_the_previous_file_whole(tmp_path, monkeypatch, short_by):
    """Deterministic: every file the checkpoint module opens for writing (through os.fdopen or
    open) stops accepting bytes `short_by` bytes before the end of the new checkpoint (None:
    at the first byte). The checkpoint already at that path is untouched and loads, no
    temporary file is left behind, and the error is one line."""
    import builtins

    import minilm.checkpoint as checkpoint_module
    folder = tmp_path / "run"
    path = str(folder / "ckpt-00000007.pt")
    save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(1000)}, "version": 0})
    before = (folder / "ckpt-00000007.pt").read_bytes()
    newer = {"config": {}, "model": {"w": torch.ones(3000)}, "version": 1}
    save_checkpoint(str(tmp_path / "size-probe.pt"), newer)
    new_size = os.path.getsize(tmp_path / "size-probe.pt")
    assert new_size > 4096 + len(before) // 2
    limit = 0 if short_by is None else new_size - short_by
    real_fdopen, real_open, cut = os.fdopen, builtins.open, []

    def cut_off(f, mode):
        if any(c in mode for c in "wax+"):
            cut.append(mode)
            return WriteCutOff(f, limit)
        return f

    monkeypatch.setattr(checkpoint_module.os, "fdopen", lambda fd, mode="r", *a, **kw: cut_off(real_fdopen(fd, mode, *a, **kw), mode))
    monkeypatch.setattr(checkpoint_module, "open", lambda file, mode="r", *a, **kw: cut_off(real_open(file, mode, *a, **kw), mode),
                        raising=False)
    with pytest.raises(UserError, match="could not write checkpoint .*ckpt-00000007.pt: No space left") as err:
        if short_by == 0:   # every byte written, then the disk fills: the fsync fails
            monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk)
        save_checkpoint(path, newer)
    monkeypatch.undo()
    assert cut and "\n" not in str(err.value)
    assert (folder / "ckpt-00000007.pt").read_bytes() == before
    assert torch.load(path, weights_only=True)["version"] == 0
    assert os.listdir(folder) == ["ckpt-00000007.pt"]                  # no temporary file left
    # and without the cut the same call replaces it whole
    save_checkpoint(path, newer)
    assert torch.load(path, weights_only=True)["version"] == 1 and os.listdir(folder) == ["ckpt-00000007.pt"]


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=4, ckpt_every=2)
    make_trainer(cfg, prepared, tokenizer).fit()
    newest = os.path.join(tmp_path, "ckpt-00000004.pt")
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:       # a crash or a full disk cut it short
        f.truncate(size // 2)
    notes = []
    path, state = newest_loadable(str(tmp_path), log=notes.append)
    assert path.endswith("ckpt-00000002.pt") and state["step"] == 2
    assert len(notes) == 1 and "ckpt-00000004.pt" in notes[0]


def test_resume_cli_uses_the_previous_checkpoint(tmp_path, corpus_dir):
    out = tmp_path / "run"
    first = run_in_process("train.py", "--data", corpus_dir, "--out_dir", out, "--max_steps", 4, "--ckpt_every", 2,
                           "--eval_every", 100, *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    with open(out / "ckpt-00000004.pt", "r+b") as f:
        f.truncate(1000)
    resumed = run_in_process("train.py", "--out_dir", out, "--resume", "--max_steps", 5, "--eval_every", 100)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stdout and "ckpt-00000002.pt at step 2" in resumed.stdout
    assert "step      5/5" in resumed.stdout


def test_only_the_newest_checkpoints_are_kept(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=5, ckpt_every=1, keep_checkpoints=2)
    make_trainer(cfg, prepared, tokenizer).fit()
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["ckpt-00000004.pt", "ckpt-00000005.pt"]
    assert prune_checkpoints(str(tmp_path), 1) == [os.path.join(str(tmp_path), "ckpt-00000004.pt")]


# ----------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_before_exiting(signum, tmp_path, corpus_dir):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), "--data", corpus_dir, "--out_dir",
                             str(out), "--max_steps", "100000", "--eval_every", "100000", *map(str, TINY)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    for line in proc.stdout:              # wait until training really runs
        if line.startswith("step") and "tok/s" in line:
            break
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "stopped by signal" in rest
    saved = list_checkpoints(str(out))
    assert len(saved) == 1
    step = load_checkpoint(saved[0])["step"]
    assert step >= 1 and f"saved {saved[0]}" in rest


# ----------------------------------------------------------------------------- non-finite loss
class PoisonedCLM(CausalLM):
    """Returns a NaN loss on the training forwards numbered in `poison_at` (counting from 1, over
    the whole run, rollbacks included): the weights then turn NaN too."""

    def __init__(self, *args, poison_at=(7,), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.poison_at = 0, poison_at

    def forward(self, batch, totals=None):
        loss, sums = super().forward(batch, totals)
        if self.training:
            self.calls += 1
            if self.calls in self.poison_at:
                loss = loss * float("nan")
        return loss, sums


def poisoned_trainer(tmp_path, prepared, tokenizer, on_nan, poison_at=(7,)):
    from minilm.data import BlockSource
    from minilm.trainer import Trainer
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=10, ckpt_every=5, log_every=5, on_nan=on_nan)
    torch.manual_seed(0)
    objective = PoisonedCLM(cfg.model, tokenizer, poison_at=poison_at)
    source = BlockSource(prepared[0], "train", cfg.model.seq_len, cfg.train.batch_size, seed=cfg.train.seed)
    return Trainer(cfg, objective, source, None, tokenizer, log=lambda *_: None)


def test_nan_stops_with_the_step_named(tmp_path, prepared, tokenizer):
    trainer = poisoned_trainer(tmp_path, prepared, tokenizer, "stop")
    with pytest.raises(UserError, match="at step 7"):
        trainer.fit()
    # the diverged model was never written: the newest checkpoint is the healthy step 5
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt-00000005.pt"]


def test_nan_rollback_reloads_halves_the_lr_and_finishes(tmp_path, prepared, tokenizer):
    trainer = poisoned_trainer(tmp_path, prepared, tokenizer, "rollback")
    history = trainer.fit()
    assert trainer.step == 10 and len(history) == 10
    assert all(math.isfinite(x) for x in history)
    assert trainer.lr_scale == 0.5
    assert all(torch.isfinite(p).all() for p in trainer.objective.parameters())
    # the steps after the rollback used half the scheduled learning rate
    records = [__import__("json").loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    from minilm.trainer import lr_at
    last = [r for r in records if r.get("step") == 10 and "lr" in r][-1]
    assert last["lr"] == pytest.approx(0.5 * lr_at(9, trainer.tcfg))
    assert load_checkpoint(os.path.join(tmp_path, "ckpt-00000010.pt"))["lr_scale"] == 0.5


def test_a_second_nan_before_the_next_checkpoint_halves_again(tmp_path, prepared, tokenizer):
    # forward 7 = step 7 diverges, seen at the step-10 flush: back to step 5 at x0.5; forwards 11
    # and 12 are steps 6 and 7 again, and 12 diverges too: back to step 5 once more. The checkpoint
    # still says x1; the run must now say x0.25.
    trainer = poisoned_trainer(tmp_path, prepared, tokenizer, "rollback", poison_at=(7, 12))
    history = trainer.fit()
    assert trainer.step == 10 and all(math.isfinite(x) for x in history)
    assert trainer.lr_scale == 0.25


def test_a_loss_that_stays_nan_gives_up_after_a_few_rollbacks(tmp_path, prepared, tokenizer):
    trainer = poisoned_trainer(tmp_path, prepared, tokenizer, "rollback", poison_at=range(7, 1000))
    with pytest.raises(UserError, match="again after rolling back 6 times"):
        trainer.fit()


def test_a_nan_before_the_first_checkpoint_says_so(tmp_path, prepared, tokenizer):
    trainer = poisoned_trainer(tmp_path, prepared, tokenizer, "rollback", poison_at=(2,))
    with pytest.raises(UserError, match="at step 2, before any checkpoint"):
        trainer.fit()


# ----------------------------------------------------------------------------- before training starts
def test_full_disk_is_reported_before_training(tmp_path, prepared, tokenizer, monkeypatch):
    import minilm.faults as faults_module
    usage = faults_module.shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(faults_module.shutil, "disk_usage",
                        lambda path: usage._replace(free=1 << 20))
    trainer = make_trainer(make_config(tmp_path, tokenizer.vocab_size, max_steps=3), prepared, tokenizer)
    with pytest.raises(UserError, match="MiB free"):
        trainer.fit()
    assert trainer.step == 0


def test_a_disk_that_fills_up_during_the_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, prepared, tokenizer,
                                                                                      monkeypatch):
    import errno
    import minilm.checkpoint as checkpoint_module
    trainer = make_trainer(make_config(tmp_path, tokenizer.vocab_size, max_steps=4, ckpt_every=2), prepared, tokenizer)
    trainer.fit(until=2)                                   # ckpt-2 written while there was room
    real_fdopen = checkpoint_module.os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fdopen", FullDisk)
    with pytest.raises(UserError, match="No space left on device.*ckpt-00000002.pt is intact"):
        trainer.fit()
    monkeypatch.undo()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["ckpt-00000002.pt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]     # no half-written file left
    assert load_checkpoint(os.path.join(tmp_path, "ckpt-00000002.pt"))["step"] == 2


def test_unwritable_out_dir_is_one_line(tmp_path, corpus_dir):
    (tmp_path / "a_file").write_text("not a folder")
    assert_user_error(run("train.py", "--data", corpus_dir, "--out_dir", tmp_path / "a_file" / "out"),
                      "cannot write to --out_dir")


# ----------------------------------------------------------------------------- bad input, one line each
def test_bad_inputs_are_one_line_errors(tmp_path, corpus_dir):
    out = tmp_path / "out"
    bad_json = tmp_path / "rows.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json at all\n')
    assert_user_error(run_in_process("train.py", "--data", bad_json, "--out_dir", out), "rows.jsonl:3",
                      "not valid JSON")
    no_field = tmp_path / "fields.jsonl"
    no_field.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n')
    assert_user_error(run_in_process("train.py", "--data", no_field, "--out_dir", out), "fields.jsonl:2",
                      "--text_field")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Les élèves étudièrent à l'école française. ".encode("latin-1") * 50)
    assert_user_error(run_in_process("train.py", "--data", latin1, "--out_dir", out), "not UTF-8", "iconv")
    assert_user_error(run_in_process("train.py", "--objective", "clmm", "--out_dir", out), "did you mean clm")
    assert_user_error(run_in_process("train.py", "--fsdp", "--optimizer", "adamw", "--out_dir", out, "--data",
                                     corpus_dir), "torchrun")
    # clm trains with Muon by default, which --fsdp cannot shard: the line says so and what to add
    assert_user_error(run_in_process("train.py", "--fsdp", "--out_dir", out, "--data", corpus_dir),
                      "--fsdp shards them", "use --optimizer adamw", "(clm defaults", "--optimizer muon")
    assert_user_error(run_in_process("train.py", "--fsdp", "--compile", "--optimizer", "adamw", "--out_dir", out), "--fsdp and --compile")
    assert_user_error(run_in_process("train.py", "--on_nan", "retry", "--out_dir", out, "--data", corpus_dir, *TINY),
                      "--on_nan")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert_user_error(run_in_process("sample.py", "--ckpt", foreign), "not a minilm checkpoint")
    assert_user_error(run_in_process("train.py", "--resume", foreign, "--out_dir", out), "not a minilm checkpoint")
    # config and model, but nothing a resume needs (weights exported by hand, say)
    weights_only = tmp_path / "weights.pt"
    torch.save({"config": {"model": {}}, "model": {"w": torch.zeros(2)}}, weights_only)
    assert_user_error(run_in_process("train.py", "--resume", weights_only, "--out_dir", out), "cannot be resumed from",
                      "optimizer")
    # a --resume that finds only such a file in out_dir skips it and says none loads
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "ckpt-00000004.pt").write_bytes(weights_only.read_bytes())
    assert_user_error(run_in_process("train.py", "--resume", "--out_dir", tmp_path / "only"),
                      "none of the 1 checkpoints")
    assert_user_error(run_in_process("train.py", "--resume", "--out_dir", tmp_path / "empty"),
                      "no checkpoint to resume")


def test_a_corrupt_tokenizer_file_is_made_again_with_its_data(tmp_path, corpus_dir):
    """A damaged out_dir/tokenizer.model is a damaged prepared folder: prepared again, saying why
    (train.py's tokenizer_and_data, in-process to keep this fast)."""
    from minilm.config import parse_overrides
    from minilm.tokenizer import Tokenizer
    train_script = load_script("train.py")
    out = tmp_path / "run"
    cfg = parse_overrides(["--data", corpus_dir, "--out_dir", str(out), "--num_workers", "1", *map(str, TINY)])
    train_script.tokenizer_and_data(cfg, log=lambda *_: None)
    (out / "tokenizer.model").write_bytes(b"\x00garbage, not a sentencepiece model")
    lines = []
    train_script.tokenizer_and_data(cfg, log=lines.append)
    assert lines[0].startswith("preparing again: ") and "tokenizer.model is damaged" in lines[0], lines
    assert "not a sentencepiece model" in lines[0]
    Tokenizer.load(str(out / "tokenizer.model"))   # a sound one again


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_same_run_bit_for_bit(tmp_path, prepared, tokenizer):
    def train(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=6)
        cfg.model.dropout = 0.1
        trainer = make_trainer(cfg, prepared, tokenizer)
        torch.manual_seed(99)  # what train.py does per rank after building the model
        return trainer.fit(), trainer.objective.state_dict()

    h1, s1 = train(tmp_path / "a")
    h2, s2 = train(tmp_path / "b")
    assert h1 == h2
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    state = load_checkpoint(os.path.join(tmp_path / "a", "ckpt-00000006.pt"))
    assert state["info"]["world_size"] == 1 and state["info"]["torch"] == str(torch.__version__)
    assert "git_commit" in state["info"] and state["config"]["train"]["seed"] == 1337
