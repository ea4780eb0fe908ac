"""What keeps a run's files whole and its processes in step when something goes wrong: the fault
handling around the training loop of minilm/trainer.py, kept here so that the loop reads plainly.

    class Trainer(FaultHandling)   # the loop calls these at a few points:
        self.preflight()                 # before the first step: the folder takes a checkpoint
        with self.catching_signals():    # SIGTERM / Ctrl-C: finish the step, save, stop
            self.stop_requested()        # the same answer on every rank
            check_finite(losses, step)   # raises NonFiniteLoss before any checkpoint is written
            self.roll_back(bad)          # --on_nan: stop, or reload the newest checkpoint at half the lr
            self.write_metrics(row)      # metrics.jsonl (a full disk leaves no torn row) and TensorBoard

Why each rule exists:
  * A run that cannot write its checkpoints should fail before training, not after an hour: the
    folder is written to, and its free space compared with what keep_checkpoints files need.
  * A signal must not leave a half-written checkpoint or ranks waiting on each other: it is acted
    on after the current step, and under torchrun the ranks agree on it (one all-reduce, asked
    only on logging and checkpoint steps) so that all stop at the same step and save together.
  * A diverged model must never be saved: the step losses are checked before every checkpoint.
    With --on_nan rollback the run reloads the newest checkpoint and halves its learning rate,
    giving up after ROLLBACKS_ALLOWED halvings.
  * A full disk must not leave a torn metrics row for a plot to choke on, and a resumed run's
    TensorBoard curves must not hold the redone steps twice.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading

import torch

from minilm.checkpoint import list_checkpoints, newest_loadable
from minilm.config import TENSORBOARD_HINT
from minilm.distributed import all_reduce_sum, barrier
from minilm.errors import UserError

ROLLBACKS_ALLOWED = 6                      # --on_nan rollback gives up below lr x 1/64
MIN_LR_SCALE = 0.5 ** ROLLBACKS_ALLOWED
TENSORBOARD_NAME = "tensorboard"           # --tensorboard's event files


def check_writable(folder: str) -> None:
    """Fail before training, not after an hour, when checkpoints could not be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write-test")
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write to --out_dir {folder}: {err.strerror}; choose another folder") from None


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, imported only for --tensorboard: it needs the
    tensorboard package, which minilm does not depend on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(TENSORBOARD_HINT) from None
    return SummaryWriter


class NonFiniteLoss(Exception):
    """Raised inside fit() when a step's loss is NaN or infinite; carries the step number."""

    def __init__(self, step: int, value: float):
        super().__init__(f"loss {value} at step {step}")
        self.step, self.value = step, value


def check_finite(losses: list[float], first_step: int) -> None:
    """NonFiniteLoss for the first of the steps' losses (step first_step, first_step + 1, ...)
    that is NaN or infinite."""
    for offset, value in enumerate(losses):
        if not math.isfinite(value):
            raise NonFiniteLoss(first_step + offset, value)


class FaultHandling:
    """The Trainer's fault handling. Uses the Trainer's tcfg, dist, device, log, step, lr_scale,
    history, objective, tokens_per_step and load(); sets stop_signal (the signal that stopped the
    run, or None) and the TensorBoard writer."""

    def init_fault_handling(self) -> None:
        if self.tcfg.on_nan not in ("stop", "rollback"):
            raise UserError(f"--on_nan must be stop or rollback, got {self.tcfg.on_nan!r}")
        self.stop_signal: int | None = None
        # --tensorboard: the package is checked now, not at the first log line; the writer is made then
        self.summary_writer_class = summary_writer_class() if self.tcfg.tensorboard and self.dist.is_main else None
        self.summary_writer = None

    # --------------------------------------------------------------- disk
    def preflight(self) -> None:
        """Refuse to start when checkpoints could not be written, rather than after an hour."""
        if self.dist.is_main:
            check_writable(self.tcfg.out_dir)
            n_values = sum(p.numel() for p in self.objective.parameters()) * 3  # weights + 2 Adam moments
            # at the peak, keep_checkpoints files plus the one being written (0 keeps every file:
            # count two), less the ones already there, plus slack
            files = (self.tcfg.keep_checkpoints if self.tcfg.keep_checkpoints > 0 else 1) + 1
            files = max(1, files - len(list_checkpoints(self.tcfg.out_dir)))
            need = 4 * n_values * files + (64 << 20)
            free = shutil.disk_usage(self.tcfg.out_dir).free
            if free < need:
                raise UserError(f"--out_dir {self.tcfg.out_dir} has {free / 2**20:.0f} MiB free but a checkpoint "
                                f"needs about {need / 2**20:.0f} MiB; free some space or choose another folder")
        barrier(self.dist)

    # --------------------------------------------------------------- signals
    @contextlib.contextmanager
    def catching_signals(self):
        """SIGTERM and SIGINT only set stop_signal while the loop runs (in the main thread); the
        handlers before are put back after."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame):
        self.stop_signal = signum  # acted on after the current step: save, then exit

    def stop_requested(self) -> bool:
        """True on every rank when any rank got a signal, so all stop at the same step.

        Under torchrun the ranks agree through an all-reduce, which waits for the device: asked
        only on logging and checkpoint steps, so the steps in between stay asynchronous.
        torchrun kills its workers 30 s after passing on a SIGTERM: keep log_every steps shorter."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        if self.step % self.tcfg.log_every and self.step % self.tcfg.ckpt_every:
            return False
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        return all_reduce_sum(flag, self.dist).item() > 0

    # --------------------------------------------------------------- a loss that is not finite
    def roll_back(self, bad: NonFiniteLoss) -> None:
        """--on_nan stop: a UserError naming the step. --on_nan rollback: reload the newest
        checkpoint and halve the learning rate, or give up after ROLLBACKS_ALLOWED halvings."""
        tc = self.tcfg
        if tc.on_nan != "rollback":
            raise UserError(f"the loss became {bad.value} at step {bad.step}; lower --lr or raise "
                            "--warmup_steps and --resume, or pass --on_nan rollback") from None
        if not list_checkpoints(tc.out_dir):
            raise UserError(f"the loss became {bad.value} at step {bad.step}, before any checkpoint "
                            "to roll back to; lower --lr or raise --warmup_steps") from None
        scale = self.lr_scale
        path, state = newest_loadable(tc.out_dir, log=self.log)
        self.load(path, state)
        # halve from the lowest scale reached so far: the checkpoint may predate the last
        # rollback, and its data, masks and random state would bring the same NaN back at the
        # same learning rate forever
        self.lr_scale = min(scale, self.lr_scale) * 0.5
        if self.lr_scale < MIN_LR_SCALE:
            raise UserError(f"the loss became {bad.value} at step {bad.step} again after rolling "
                            f"back {ROLLBACKS_ALLOWED} times; lower --lr, raise --warmup_steps or "
                            "check the data") from None
        self.log(f"step {bad.step:>6} | loss {bad.value}: rolled back to {path} (step {self.step}), "
                 f"learning rate now x{self.lr_scale:g}")
        self.history = self.history[:self.step]

    # --------------------------------------------------------------- metrics files
    def write_metrics(self, record: dict) -> None:
        """Append one JSON line with a single write; if it fails (a full disk), cut the file back
        to its last whole line, so no torn row is left for a plot to choke on. Every row gets the
        tokens seen after its step; with --tensorboard it is also logged there."""
        if not self.dist.is_main:
            return
        record = {"step": record["step"], "tokens": record["step"] * self.tokens_per_step, **record}
        path = os.path.join(self.tcfg.out_dir, "metrics.jsonl")
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(28, "short write (disk full?)")
            except OSError as err:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass
                older = list_checkpoints(self.tcfg.out_dir)
                kept = (f"; {older[-1]} is the last good checkpoint, resume from it with --resume once there "
                        "is space" if older else "; no checkpoint was written yet")
                raise UserError(f"could not append to {path}: {err.strerror or err}{kept}") from None
        finally:
            os.close(fd)
        self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict) -> None:
        """Each number of a metrics row as a TensorBoard scalar at its step. The writer is made at
        the first row: purge_step drops the events a crashed run logged past the step this (resumed)
        run starts logging from, so no curve holds the redone steps twice."""
        if self.summary_writer_class is None:
            return
        if self.summary_writer is None:
            self.summary_writer = self.summary_writer_class(os.path.join(self.tcfg.out_dir, TENSORBOARD_NAME),
                                                            purge_step=record["step"])
        for key, value in record.items():
            if key not in ("step", "tokens"):
                self.summary_writer.add_scalar(key, value, record["step"])
        self.summary_writer.flush()   # rows are rare (every log_every steps): a kill loses none
