"""Files minilm writes and reads (minilm/checkpoint.py): only regular files are opened or
replaced, never a FIFO, device, socket or folder; new files get the umask's permissions and a
replaced one keeps its own."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading
import time

import pytest
import torch

from minilm.checkpoint import (atomic_write_bytes, checkpoint_loads, list_checkpoints, load_checkpoint,
                               load_checkpoint_or_newest, newest_loadable, prune_checkpoints, replaceable_target,
                               save_checkpoint)
from minilm.config import Config
from minilm.errors import UserError
from minilm.safetensors_io import check_output, export, load_safetensors, save_safetensors
from tests.conftest import run_in_process
from tests.test_cli import assert_user_error

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def watched_fifo(path):
    """A FIFO at `path`, and a list that gets an entry whenever something opens it to read.

    Opening a FIFO to read waits for a writer, forever if none comes: so a thread plays the
    writer (an O_NONBLOCK open for writing succeeds only while a reader waits) and lets any
    reader through at once. A regression then fails the test's `not opened` instead of hanging."""
    os.mkfifo(path)
    opened, done = [], threading.Event()

    def writer():
        while not done.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:   # ENXIO: nobody is reading
                time.sleep(0.002)
                continue
            opened.append(path)
            os.close(fd)      # the reader sees an empty file and goes on

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        done.set()
        thread.join()


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def small_state(step: int = 1) -> dict:
    """What load_checkpoint accepts (resumable too): a tiny causal LM whose weights fit its config
    (checkpoint_checks.py compares them), seeded by `step` so that two steps' states differ."""
    from minilm.config import ModelConfig
    from minilm.objectives import build_objective, model_config_for
    cfg = Config()
    cfg.model = model_config_for("clm", ModelConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2, n_embd=16))
    torch.manual_seed(step)
    model = build_objective("clm", cfg.model, None, cfg.obj).state_dict()
    return {"config": cfg.to_dict(), "objective": "clm", "model": model, "optimizer": {}, "step": step,
            "rng": {"cpu": torch.random.get_rng_state()}}


# ----------------------------------------------------------------------------- never opened
def test_a_fifo_given_as_a_checkpoint_is_an_error_and_never_opened(tmp_path):
    fifo = str(tmp_path / "model.pt")
    with watched_fifo(fifo) as opened:
        for flag in ("--ckpt", "--resume"):
            with pytest.raises(UserError) as err:
                load_checkpoint(fifo, resumable=flag == "--resume", flag=flag)
            assert one_line(err) == f"{fifo} is a FIFO, not a checkpoint file; pass a checkpoint file to {flag}"
        with pytest.raises(UserError, match="is a FIFO, not a checkpoint file"):
            load_checkpoint_or_newest(fifo)             # sample.py --ckpt, train.py --init_from
        with pytest.raises(UserError, match="is a FIFO, not a checkpoint file; pass a checkpoint file to the export"):
            export(fifo, str(tmp_path / "model.safetensors"))
        assert not checkpoint_loads(fifo)
        with pytest.raises(UserError, match="is a FIFO, not a safetensors file"):
            load_safetensors(fifo)
        assert_user_error(run_in_process("sample.py", "--ckpt", fifo),
                          "is a FIFO, not a checkpoint file; pass a checkpoint file to --ckpt")
        assert_user_error(run_in_process("train.py", "--init_from", fifo, "--out_dir", tmp_path / "run"),
                          "is a FIFO, not a checkpoint file; pass a checkpoint file to --init_from")
        assert not opened
    assert not (tmp_path / "model.safetensors").exists()


def test_a_fifo_named_like_a_checkpoint_in_a_run_folder_is_skipped_and_kept(tmp_path):
    """--resume, sample.py --ckpt DIR and export DIR take the newest checkpoint that loads: a
    FIFO ckpt-00000009.pt is passed over with a note, never opened, and pruning leaves it."""
    run = str(tmp_path)
    save_checkpoint(os.path.join(run, "ckpt-00000001.pt"), small_state(1))
    save_checkpoint(os.path.join(run, "ckpt-00000002.pt"), small_state(2))
    fifo = os.path.join(run, "ckpt-00000009.pt")
    with watched_fifo(fifo) as opened:
        for resumable in (True, False):
            notes = []
            path, state = newest_loadable(run, log=notes.append, resumable=resumable)
            assert path.endswith("ckpt-00000002.pt") and state["step"] == 2
            assert notes == [f"note: skipping {fifo}: it is a FIFO, not a checkpoint file"]
        assert load_checkpoint_or_newest(run, log=lambda _: None)[0].endswith("ckpt-00000002.pt")
        assert not checkpoint_loads(fifo)
        assert prune_checkpoints(run, 1) == [os.path.join(run, "ckpt-00000001.pt")]
        assert not opened
    assert list_checkpoints(run)[-1] == fifo and stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ----------------------------------------------------------------------------- never replaced
def test_an_atomic_write_replaces_only_a_regular_file(tmp_path):
    """The rename would put a regular file in the place of whatever is at the path (as root,
    even of /dev/full): a FIFO, socket, folder or a symlink to one is refused and left as it was."""
    fifo, folder = str(tmp_path / "fifo"), tmp_path / "folder"
    folder.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    os.symlink(fifo, tmp_path / "link-to-fifo")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    kinds = {"fifo": "a FIFO", "sock": "a socket", "folder": "a folder", "link-to-fifo": "a FIFO",
             "dangling": "a dangling symlink"}
    before = {name: os.lstat(tmp_path / name) for name in ("folder", "sock", "link-to-fifo", "dangling")}
    try:
        with watched_fifo(fifo) as opened:
            for name, kind in kinds.items():
                path = str(tmp_path / name)
                with pytest.raises(UserError) as err:
                    atomic_write_bytes(path, b"new")
                assert one_line(err) == (f"will not write {path}: it is {kind}, not a regular file; choose "
                                         "another path, or move it away first")
                with pytest.raises(UserError, match=f"will not write .*{name}: it is {kind}"):
                    save_checkpoint(path, small_state())
            assert not opened
    finally:
        sock.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    for name, st in before.items():
        assert os.lstat(tmp_path / name).st_mode == st.st_mode, name
    assert sorted(os.listdir(tmp_path)) == sorted(kinds)   # no temporary file left behind


def test_a_device_is_never_a_file_to_replace():
    """Only the checks, which write nothing: as root, a regression in a real write would replace
    the device itself."""
    with pytest.raises(UserError, match=f"will not write {os.devnull}: it is a character device, not a regular"):
        replaceable_target(os.devnull)
    with pytest.raises(UserError, match="it is a character device, not a regular file; choose another output"):
        check_output(os.devnull)


def test_an_atomic_write_through_a_symlink_replaces_the_file_it_points_to(tmp_path):
    real = tmp_path / "elsewhere" / "real.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    os.symlink(real, tmp_path / "link.bin")
    atomic_write_bytes(str(tmp_path / "link.bin"), b"new")
    assert os.path.islink(tmp_path / "link.bin") and real.read_bytes() == b"new"
    assert os.listdir(real.parent) == ["real.bin"] and sorted(os.listdir(tmp_path)) == ["elsewhere", "link.bin"]


# ----------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_new_files_get_the_umasks_permissions_and_replaced_ones_keep_theirs(tmp_path, umask):
    ckpt, export_path, text = (str(tmp_path / n) for n in ("ckpt-00000001.pt", "model.safetensors", "a.txt"))

    def write_all():
        save_checkpoint(ckpt, small_state())
        save_safetensors({"w": torch.ones(2)}, export_path)
        atomic_write_bytes(text, b"x")

    def modes():
        return [stat.S_IMODE(os.stat(p).st_mode) for p in (ckpt, export_path, text)]

    old = os.umask(umask)
    try:
        write_all()
        assert modes() == [0o666 & ~umask] * 3     # as open() would create them (not mkstemp's 0600)
        for path, mode in zip((ckpt, export_path, text), (0o640, 0o604, 0o600)):
            os.chmod(path, mode)                   # the user's choice, which a rewrite keeps
        write_all()
        assert modes() == [0o640, 0o604, 0o600]
    finally:
        os.umask(old)
