"""The training loop, in plain PyTorch.

One optimizer step:
    1. set the learning rate for this step (linear warmup, then cosine or linear decay)
    2. draw grad_accum raw batches (a pure function of seed and step) and let the objective
       turn them into model inputs on the device (masking etc.), with a generator seeded by step
    3. add up the micro-batches' target counts, so each micro-batch's summed loss is divided by
       the step's total (see objectives/base.py): the gradient is that of one big batch
    4. forward under autocast, backward (through a GradScaler for fp16)
    5. clip the gradient norm, AdamW step, zero the gradients
Every log_every steps a line with loss, lr, tokens/s, MFU and ETA; every eval_every steps the
validation loss, perplexity, accuracy and bits per byte; every ckpt_every steps and at the end a
checkpoint. metrics.jsonl gets every logged number, one JSON object per line, for plotting.

The trainer knows nothing about masks or heads: everything objective-specific is in the
objective's make_batch and forward.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import time

import numpy as np
import torch

from minilm.checkpoint import bytes_to_tensor, load_checkpoint, save_checkpoint
from minilm.config import Config
from minilm.data import mix_seed
from minilm.errors import UserError
from minilm.flops import flops_per_token, measure_peak_flops
from minilm.objectives import finalize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- device and precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # on CPU bf16 autocast is opt-in: --dtype bf16
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA GPU (its loss scaling is CUDA-only here); use bf16 or fp32")
    return DTYPES[name]


def to_device(raw, device: torch.device):
    """A raw batch (a tensor, or a dict of tensors for sources with several fields) to the device;
    through pinned memory on CUDA so the copy overlaps with compute."""
    if isinstance(raw, dict):
        return {k: to_device(v, device) for k, v in raw.items()}
    if device.type == "cuda":
        raw = raw.pin_memory()
    return raw.to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- optimizer and schedule
def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2: linear weights, embeddings) and none on
    vectors (norm gains, biases). A tied parameter appears once: named_parameters() deduplicates."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    ids = [id(p) for p in decay + no_decay]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters() if p.requires_grad}), \
        "every trainable parameter must be in exactly one optimizer group"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda" or None)


def lr_at(step: int, cfg) -> float:
    """Linear warmup from 0 over warmup_steps, then decay to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    raise UserError(f"unknown --schedule {cfg.schedule!r}; use cosine, linear or constant")


# ----------------------------------------------------------------------------- run metadata
def run_info(world_size: int = 1) -> dict:
    info = {"torch": str(torch.__version__), "numpy": str(np.__version__), "python": platform.python_version(),
            "world_size": world_size}
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


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


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, cfg: Config, objective, train_source, val_source=None, tokenizer=None, log=print):
        self.cfg, self.tcfg = cfg, cfg.train
        self.log = log
        self.device = resolve_device(self.tcfg.device)
        self.dtype = resolve_dtype(self.tcfg.dtype, self.device)
        self.objective = objective.to(self.device)
        self.model = torch.compile(self.objective) if self.tcfg.compile else self.objective
        self.train_source, self.val_source = train_source, val_source
        self.tokenizer = tokenizer
        self.optimizer = build_optimizer(self.objective, self.tcfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step = 0
        self.history: list[float] = []        # training loss of every step (for tests and plots)
        self.last_eval: dict = {}
        self.info = run_info()
        backbone = objective.backbone
        mc = backbone.cfg
        self.tokens_per_step = self.tcfg.batch_size * self.tcfg.grad_accum * mc.seq_len
        self.flops_per_token = flops_per_token(backbone.num_params(non_embedding=True), mc.n_layer,
                                               mc.n_head, mc.head_dim, mc.seq_len)
        self.peak_flops = None

    # --------------------------------------------------------------- one step
    def _generator(self, step: int, micro: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.tcfg.seed, 7, step, micro))

    def accumulate_gradients(self, step: int) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns the step's loss (detached).

        Each micro-batch's loss is its summed token loss over the *step's* total count, so the
        accumulated gradient equals that of a single batch grad_accum times larger.
        """
        batches = []
        for micro in range(self.tcfg.grad_accum):
            raw = to_device(self.train_source.batch(step, micro), self.device)
            batches.append(self.objective.make_batch(raw, self._generator(step, micro)))
        totals = {k: sum(b["counts"][k] for b in batches) for k in batches[0]["counts"]}
        step_loss = torch.zeros((), device=self.device)
        for batch in batches:
            with autocast(self.device, self.dtype):
                loss, _ = self.model(batch, totals)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            step_loss += loss.detach()
        return step_loss

    def train_step(self, step: int):
        lr = lr_at(step, self.tcfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_loss = self.accumulate_gradients(step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.tcfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.tcfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, lr, grad_norm

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.val_source is None:
            return {}
        self.objective.eval()
        sums: dict = {}
        for i in range(self.tcfg.eval_batches):
            raw = to_device(self.val_source.batch(i, 0), self.device)
            # a fixed generator per eval batch: every evaluation sees the same inputs and masks
            batch = self.objective.make_batch(raw, torch.Generator(device=self.device).manual_seed(i))
            with autocast(self.device, self.dtype):
                _, batch_sums = self.model(batch)
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0) + v
        self.objective.train()
        return finalize({k: float(v) for k, v in sums.items()})

    # --------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"config": self.cfg.to_dict(), "objective": self.tcfg.objective,
                "model": self.objective.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "rng": rng, "last_eval": self.last_eval, "info": self.info,
                "tokenizer": bytes_to_tensor(self.tokenizer.model_bytes) if self.tokenizer else None}

    def save(self, path: str | None = None) -> str:
        path = path or os.path.join(self.tcfg.out_dir, "ckpt.pt")
        save_checkpoint(path, self.state())
        return path

    def load(self, path: str, state: dict | None = None) -> None:
        """Restore everything a checkpoint holds; `state` skips reading the file again."""
        state = state if state is not None else load_checkpoint(path, map_location="cpu")
        try:
            self.objective.load_state_dict(state["model"])
        except RuntimeError as err:
            raise UserError(f"{path} does not fit this model: {str(err).splitlines()[0]}; "
                            "resume with the same --preset and model flags") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.last_eval = state.get("last_eval", {})

    # --------------------------------------------------------------- the loop
    def _write_metrics(self, record: dict) -> None:
        with open(os.path.join(self.tcfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self, until: int | None = None) -> list[float]:
        """Train from the current step to max_steps (or to `until`, to stop early and resume later:
        the schedule still follows max_steps). Returns the loss of every step trained so far."""
        tc = self.tcfg
        until = tc.max_steps if until is None else min(until, tc.max_steps)
        check_writable(tc.out_dir)
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(self.device, self.dtype)
        self.log(f"device {self.device}, dtype {str(self.dtype).replace('torch.', '')}, "
                 f"{self.objective.backbone.num_params() / 1e6:.2f}M parameters, "
                 f"{self.tokens_per_step:,} tokens per step (batch {tc.batch_size} x accumulation "
                 f"{tc.grad_accum} x seq_len {self.objective.backbone.cfg.seq_len}), "
                 f"measured matmul peak {self.peak_flops / 1e9:.1f} GFLOP/s")
        self.objective.train()
        t_last, steps_since = time.perf_counter(), 0
        t_start, start_step = t_last, self.step
        pending: list[torch.Tensor] = []
        while self.step < until:
            step_loss, lr, _ = self.train_step(self.step)
            pending.append(step_loss)
            self.step += 1
            steps_since += 1
            last = self.step == until
            if self.step % tc.log_every == 0 or last:
                losses = torch.stack(pending).tolist()  # one device sync per log line
                pending.clear()
                self.history += losses
                if not all(math.isfinite(x) for x in losses):
                    bad = self.step - len(losses) + next(i for i, x in enumerate(losses) if not math.isfinite(x)) + 1
                    raise UserError(f"the loss became {losses[-1]} at step {bad}; lower --lr or raise "
                                    "--warmup_steps, then --resume from the last checkpoint")
                now = time.perf_counter()
                tok_s = self.tokens_per_step * steps_since / (now - t_last)
                mfu = self.flops_per_token * tok_s / self.peak_flops
                eta = (now - t_start) / max(1, self.step - start_step) * (tc.max_steps - self.step)
                self.log(f"step {self.step:>6}/{tc.max_steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | "
                         f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | ETA {_fmt_time(eta)}")
                self._write_metrics({"step": self.step, "loss": losses[-1], "lr": lr,
                                     "tokens_per_s": tok_s, "mfu": mfu})
                t_last, steps_since = time.perf_counter(), 0
            t_pause = time.perf_counter()  # evaluation and saving are not training throughput
            if self.val_source is not None and (self.step % tc.eval_every == 0 or last):
                self.last_eval = self.evaluate()
                ev = self.last_eval
                self.log(f"step {self.step:>6} | val " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                self._write_metrics({"step": self.step, **{f"val_{k}": v for k, v in ev.items()}})
            if self.step % tc.ckpt_every == 0 or last:
                path = self.save()
                self.log(f"step {self.step:>6} | saved {path}")
            t_last += time.perf_counter() - t_pause
            t_start += time.perf_counter() - t_pause
        return self.history


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
