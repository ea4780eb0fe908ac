"""The training loop, in plain PyTorch.

One optimizer step:
    1. set the learning rate for this step (linear warmup, then cosine, linear or wsd decay),
       times each parameter group's lr_scale (minilm/optim.py)
    2. draw grad_accum raw batches (a pure function of seed and step) and let the objective
       turn them into model inputs on the device (masking etc.), with a generator seeded by step
    3. add up the micro-batches' target counts, so each micro-batch's summed loss is divided by
       the step's total (see objectives/base.py): the gradient is that of one big batch
    4. forward under autocast, backward (through a GradScaler for fp16)
    5. clip the gradient norm, optimizer step (AdamW, or Muon + AdamW), zero the gradients
Every log_every steps a line with loss, lr, tokens/s, MFU and ETA; every eval_every steps the
validation loss, perplexity, accuracy and bits per byte; every ckpt_every steps and at the end a
checkpoint. metrics.jsonl gets every logged number, one JSON object per line, with the step and
the tokens seen (step x tokens per step), for `python -m minilm.plot`; with --tensorboard each row
also goes to out_dir/tensorboard.

Under torchrun the same loop runs in every process (DDP or FSDP2, minilm/distributed.py): the
counts of step 3 are summed over all processes, only rank 0 logs and writes checkpoints.
Faults (minilm/faults.py, which the Trainer inherits): a signal ends the current step and saves;
a non-finite loss stops (or rolls back, with --on_nan rollback) before any checkpoint of a
diverged model is written; a full disk is found before the first step, not after an hour.

The trainer knows nothing about masks or heads: everything objective-specific is in the
objective's make_batch and forward.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import subprocess
import time

import numpy as np
import torch

from minilm.checkpoint import (bytes_to_tensor, checkpoint_loads, checkpoint_path, load_checkpoint,
                               prune_checkpoints, save_checkpoint)
from minilm.config import Config, auto_warmup
from minilm.data import mix_seed
from minilm.distributed import (DistInfo, all_reduce_dict, all_reduce_sum, barrier, full_state_dicts,
                                gather_objects, load_full_state_dicts, no_sync, shard_fsdp, wrap_ddp)
from minilm.errors import UserError
from minilm.faults import FaultHandling, NonFiniteLoss, check_finite
from minilm.flops import measure_peak_flops
from minilm.memory import MemoryEstimate, advice as memory_advice, estimate as estimate_memory
from minilm.model import set_activation_checkpointing
from minilm.objectives import finalize, objective_class
from minilm.optim import build_optimizer, describe_groups, lr_at  # noqa: F401 (lr_at: its old home)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BEST_NAME = "best.pt"                      # the best checkpoint by the objective's best_metric


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
# build_optimizer (AdamW, or Muon + AdamW), its parameter groups and lr_at (the schedule): minilm/optim.py


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


# ----------------------------------------------------------------------------- learned nothing?
def at_baseline(objective_name: str, metrics: dict) -> list[str]:
    """A phrase for each part of objective `objective_name` ("mlm", "mlm+sop") whose evaluation
    `metrics` are still within its declared margin of its trivial baseline (objectives/base.py,
    Baseline)."""
    parts = objective_name.split("+")
    phrases = []
    for part in parts:
        baseline = objective_class(part).baseline
        phrase = baseline and baseline.stuck(metrics, part, f"{part}/" if len(parts) > 1 else "")
        phrases += [phrase] if phrase else []
    return phrases


def warn_if_parent_learned_nothing(parent: dict, parent_path: str, log) -> None:
    """--init_from: one line when the parent's last evaluation was still at its trivial baseline,
    since its backbone then brings nothing that random weights would not."""
    objective = parent.get("objective") or Config.from_dict(parent["config"]).train.objective
    stuck = at_baseline(objective, parent.get("last_eval") or {})
    if stuck:
        log(f"warning: --init_from {parent_path}: at its last evaluation (step {int(parent.get('step') or 0)}) "
            + "; ".join(stuck) + ", so its weights may be no better than random ones")


# ----------------------------------------------------------------------------- the trainer
class Trainer(FaultHandling):
    def __init__(self, cfg: Config, objective, train_source, val_source=None, tokenizer=None, log=print,
                 dist_info: DistInfo | None = None, provenance: dict | None = None):
        """provenance: what the run was made from, stored in every checkpoint as is (train.py
        records the prepared data's fingerprint, so --resume can tell when the data changed, and
        an --init_from run's parent checkpoint)."""
        self.cfg, self.tcfg = cfg, cfg.train
        self.provenance = dict(provenance or {})
        self._loads_cache: dict = {}          # (path, size, mtime) -> whether it loads, for pruning
        self.dist = dist_info or DistInfo()
        self.log = log if self.dist.is_main else (lambda *_: None)  # only rank 0 talks
        self.device = resolve_device(self.tcfg.device)
        self.dtype = resolve_dtype(self.tcfg.dtype, self.device)
        self.init_fault_handling()   # --on_nan checked, stop_signal, the --tensorboard package (faults.py)
        if self.tcfg.fsdp and not self.dist.enabled:
            raise UserError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N")
        if self.tcfg.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; must be set before its first use
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.objective = objective.to(self.device)   # the plain module: saved, evaluated, inspected
        set_activation_checkpointing(self.objective, self.tcfg.activation_checkpointing)
        if self.tcfg.fsdp:
            shard_fsdp(self.objective)
        self.model = torch.compile(self.objective) if self.tcfg.compile else self.objective
        if self.dist.enabled and not self.tcfg.fsdp:
            self.model = wrap_ddp(self.model, self.dist, self.device)
        self.train_source, self.val_source = train_source, val_source
        self.tokenizer = tokenizer
        if self.tcfg.warmup_steps < 0:        # auto, in a config built without validate()
            self.tcfg.warmup_steps = auto_warmup(self.tcfg.max_steps)
        self.optimizer = build_optimizer(self.objective, self.tcfg, self.device)
        if self.tcfg.optimizer != "adamw" or self.tcfg.embedding_lr or self.tcfg.lm_head_lr:
            self.log(f"optimizer {self.tcfg.optimizer}, parameter groups:")
            for line in describe_groups(self.objective, self.optimizer, self.tcfg.lr):
                self.log(line)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.step = 0
        self.lr_scale = 1.0                   # halved by each --on_nan rollback
        self.history: list[float] = []        # training loss of every step (for tests and plots)
        self.last_eval: dict = {}
        self.last_eval_sums: dict = {}        # the raw sums behind last_eval (a confusion matrix)
        self.best_value: float | None = None  # the best value of the watched metric so far (watched_metric)
        self.evals_without_improvement = 0    # --early_stopping_patience counts these (saved in checkpoints)
        self.stopped_early: str | None = None  # why the run stopped before max_steps, when it did
        self.warned_at_baseline = False       # the "learned nothing" line is said once per run
        self.info = run_info(self.dist.world_size)
        backbone = objective.backbone
        mc = backbone.cfg
        # tokens counted as the model's input tokens, seq_len per row (t5: the encoder's input;
        # its flops_per_token spreads the decoder's work over them, so MFU stays exact)
        self.tokens_per_step = self.tcfg.batch_size * self.tcfg.grad_accum * self.dist.world_size * mc.seq_len
        self.flops_per_token = objective.flops_per_token()   # what one token's step computes
        # this rank's input tokens and training FLOPs since the last log line (count_work)
        self.tokens_counted, self.flops_counted = 0, 0.0
        self.peak_flops = None
        self.peak_measured_again = False
        if self.tcfg.early_stopping_patience and val_source is None:
            raise UserError("--early_stopping_patience watches validation metrics, and this run has no validation "
                            "data; drop --early_stopping_patience")

    # --------------------------------------------------------------- one step
    def _generator(self, step: int, micro: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(mix_seed(self.tcfg.seed, 7, step, micro))

    def accumulate_gradients(self, step: int) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; returns its share of the step's
        loss (detached; summed over ranks it is the step's loss).

        Each micro-batch's loss is its summed token loss over the step's total count (all
        micro-batches, all ranks), so the accumulated gradient equals that of a single batch
        grad_accum x world_size times larger. DDP averages gradients over ranks, hence the
        factor world_size.
        """
        accum, world = self.tcfg.grad_accum, self.dist.world_size
        batches = []
        for micro in range(accum):
            index = self.dist.rank * accum + micro       # global micro-batch index within the step
            raw = to_device(self.train_source.batch(step, index), self.device)
            batches.append(self.objective.make_batch(raw, self._generator(step, index)))
        self.count_work(batches)
        totals = {k: sum(b["counts"][k] for b in batches) for k in batches[0]["counts"]}
        totals = all_reduce_dict(totals, self.dist, self.device)
        step_loss = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            # all-reduce gradients only once, after the last micro-batch (forward included)
            with no_sync(self.model, skip=micro < accum - 1):
                with autocast(self.device, self.dtype):
                    loss, _ = self.model(batch, totals)
                    loss = loss * world
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_loss += loss.detach() / world
        return step_loss

    def count_work(self, batches: list[dict]) -> None:
        """Add the micro-batches' input tokens and FLOPs to this rank's counts for tokens/s and MFU:
        the objective's own tokens_and_flops(batch) where its batches vary in length (rows cut to
        a batch's longest), else seq_len per row at flops_per_token each."""
        for batch in batches:
            work = self.objective.tokens_and_flops(batch)
            if work is None:
                tokens = self.tokens_per_step // (self.tcfg.grad_accum * self.dist.world_size)
                work = (tokens, tokens * self.flops_per_token)
            self.tokens_counted += work[0]
            self.flops_counted += work[1]

    def train_step(self, step: int):
        lr = lr_at(step, self.tcfg) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step_loss = self.accumulate_gradients(step)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)   # clip the true gradient, not the scaled one
        grad_norm = None
        if self.tcfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.tcfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)       # skipped when the fp16 gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, lr, grad_norm

    # --------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation metrics, summed over batches and ranks, then finalized.

        A source that can enumerate its rows (eval_batch_count / eval_batch: labelled rows for
        classify) is visited whole, every row exactly once: batch i goes to rank i % world_size,
        and the rows past the end are padding rows the objective counts nowhere. Otherwise
        eval_batches fixed batches (random windows, the same at every evaluation), split across
        ranks. Every rank runs the same number of forwards (FSDP's forward is collective), through
        the unwrapped module (DDP's forward would wait for a backward that never comes).
        The raw sums are kept in self.last_eval_sums (a classifier's confusion matrix)."""
        if self.val_source is None:
            return {}
        self.objective.eval()
        sums: dict = {}
        whole = hasattr(self.val_source, "eval_batch")
        n_batches = self.val_source.eval_batch_count() if whole else self.tcfg.eval_batches
        per_rank = -(-n_batches // self.dist.world_size)
        for j in range(per_rank):
            i = j * self.dist.world_size + self.dist.rank
            counted = i < n_batches
            if whole:   # past the end: a batch of padding rows, which adds zeros
                raw = to_device(self.val_source.eval_batch(i), self.device)
            else:
                raw = to_device(self.val_source.batch(i if counted else 0, 0), self.device)
            # a fixed generator per eval batch: every evaluation sees the same inputs and masks
            batch = self.objective.make_batch(raw, torch.Generator(device=self.device).manual_seed(i))
            with autocast(self.device, self.dtype):
                _, batch_sums = self.objective(batch)
            batch_sums.update(self.objective.baseline_sums(batch, batch_sums))   # what learning nothing scores
            # a padding batch (past eval_batches) adds zeros: every rank then holds the same keys,
            # which the all-reduce below needs, even a rank with no counted batch at all
            for k, v in batch_sums.items():
                sums[k] = sums.get(k, 0) + v.detach().to("cpu", torch.float64) * float(counted)
        self.objective.train()
        sums = self._all_reduce_sums(sums)
        self.last_eval_sums = sums
        return finalize({k: float(v) if v.numel() == 1 else v for k, v in sums.items()}, self.objective)

    def _all_reduce_sums(self, sums: dict) -> dict:
        """Metric sums added up over ranks in one collective: scalars and tensors (a confusion
        matrix) alike, flattened into one float64 vector and cut back to their shapes."""
        if not self.dist.enabled:
            return sums
        keys = sorted(sums)
        shapes = [torch.as_tensor(sums[k]).shape for k in keys]
        flat = torch.cat([torch.as_tensor(sums[k], dtype=torch.float64).reshape(-1) for k in keys])
        flat = all_reduce_sum(flat.to(self.device), self.dist).cpu()   # NCCL reduces device tensors
        sizes = [int(math.prod(shape)) for shape in shapes]
        return {k: part.reshape(shape) for k, part, shape in zip(keys, flat.split(sizes), shapes)}

    def watched_metric(self) -> tuple[str, bool] | None:
        """(validation metric, higher is better) that best.pt and early stopping follow: the
        objective's best_metric (classify: macro_f1, higher is better), or, when early stopping
        is on and the objective names none, the validation loss (lower is better). None: no
        best.pt is kept."""
        metric = getattr(self.objective, "best_metric", None)
        if metric:
            return metric, True
        return ("loss", False) if self.tcfg.early_stopping_patience else None

    def keep_best(self) -> bool | None:
        """When there is a watched metric (watched_metric), write out_dir/best.pt whenever the
        last evaluation beats every earlier one, and count the evaluations since one last did
        (early stopping). Returns whether it improved (None: nothing is watched, or the metric is
        missing). Collective, like save(): every rank has the same (all-reduced) metrics, so all
        take the same branch."""
        watched = self.watched_metric()
        metric, higher = watched if watched else (None, True)
        value = self.last_eval.get(metric) if metric else None
        if value is None:
            return None
        if self.best_value is not None and (value <= self.best_value if higher else value >= self.best_value):
            self.evals_without_improvement += 1
            return False
        self.best_value, self.evals_without_improvement = value, 0
        state = self.state()
        if self.dist.is_main:
            save_checkpoint(os.path.join(self.tcfg.out_dir, BEST_NAME), state)
            self.log(f"step {self.step:>6} | best val {metric} so far ({value:.4f}): saved "
                     f"{os.path.join(self.tcfg.out_dir, BEST_NAME)}")
        barrier(self.dist)
        return True

    def out_of_patience(self) -> bool:
        """--early_stopping_patience N: the watched metric has not improved for N evaluations."""
        patience = self.tcfg.early_stopping_patience
        return bool(patience) and self.evals_without_improvement >= patience

    def why_stopped_early(self) -> str:
        metric, _ = self.watched_metric()
        return (f"val {metric} has not improved on its best ({self.best_value:.4f}, in "
                f"{os.path.join(self.tcfg.out_dir, BEST_NAME)}) for {self.evals_without_improvement} evaluations "
                f"(--early_stopping_patience {self.tcfg.early_stopping_patience})")

    def warn_if_learned_nothing(self) -> None:
        """Once past a quarter of the run (and the warmup, whose small steps are no test), one line,
        once, when the last evaluation is still at the objective's trivial baseline, or a part's of
        a+b (at_baseline): what is stuck and what to try."""
        past_a_quarter = 4 * self.step > self.tcfg.max_steps and self.step >= self.tcfg.warmup_steps
        if self.warned_at_baseline or not past_a_quarter:
            return
        stuck = at_baseline(self.objective.name, self.last_eval)
        if stuck:
            weights = ", or its weight in --objective_weights" if "+" in self.objective.name else ""
            self.log(f"warning: step {self.step} of {self.tcfg.max_steps}: " + "; ".join(stuck)
                     + f"; try another --lr (now {self.tcfg.lr:g}) or --warmup_steps{weights}")
            self.warned_at_baseline = True

    # --------------------------------------------------------------- checkpoints
    def state(self) -> dict | None:
        """The checkpoint's content on rank 0 (None elsewhere). Collective: every rank calls it."""
        model_state, optim_state = full_state_dicts(self.objective, self.optimizer, self.tcfg.fsdp)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            rng["mps"] = torch.mps.get_rng_state()
        rng_per_rank = gather_objects(rng, self.dist)
        if not self.dist.is_main:
            return None
        return {"config": self.cfg.to_dict(), "objective": self.tcfg.objective,
                "model": model_state, "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "lr_scale": self.lr_scale, "rng": rng_per_rank,
                "last_eval": self.last_eval, "best_value": self.best_value,
                "evals_without_improvement": self.evals_without_improvement,
                "info": self.info, **self.provenance,
                "tokenizer": bytes_to_tensor(self.tokenizer.model_bytes) if self.tokenizer else None}

    def save(self) -> str:
        """Write out_dir/ckpt-STEP.pt atomically (rank 0) and keep the newest keep_checkpoints."""
        path = checkpoint_path(self.tcfg.out_dir, self.step)
        state = self.state()
        if self.dist.is_main:
            save_checkpoint(path, state)
            prune_checkpoints(self.tcfg.out_dir, self.tcfg.keep_checkpoints, loads=self._checkpoint_loads)
        barrier(self.dist)
        return path

    def _checkpoint_loads(self, path: str) -> bool:
        """checkpoint_loads, asked once per file version: pruning runs at every save."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        if key not in self._loads_cache:
            self._loads_cache[key] = checkpoint_loads(path)
        return self._loads_cache[key]

    def load(self, path: str, state: dict | None = None) -> None:
        """Restore everything a checkpoint holds; `state` skips reading the file again."""
        state = state if state is not None else load_checkpoint(path, map_location="cpu")
        try:
            load_full_state_dicts(self.objective, self.optimizer, state["model"], state["optimizer"],
                                  self.tcfg.fsdp)
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"{path} does not fit this model: {str(err).splitlines()[0][:200]}; "
                            "resume with the same --preset and model flags") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.dist.world_size:
            rng = rngs[self.dist.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            if "mps" in rng and self.device.type == "mps":
                torch.mps.set_rng_state(rng["mps"])
        else:  # another world size: data and masks still follow (seed, step); dropout noise cannot
            self.log(f"note: checkpoint was written by {len(rngs)} processes, this run has "
                     f"{self.dist.world_size}; dropout randomness restarts from the seed")
            torch.manual_seed(mix_seed(self.tcfg.seed, self.dist.rank, self.step))
        self.last_eval = state.get("last_eval", {})
        self.best_value = state.get("best_value")
        # a checkpoint from before early stopping counted nothing
        self.evals_without_improvement = int(state.get("evals_without_improvement") or 0)

    def utilization(self, flops_per_s: float) -> float:
        """MFU: the model's FLOP/s over the matmul peak measured at start-up (0.3 s of matmuls). On
        a machine that was busy at that moment the peak comes out low and MFU above 100%, which no
        run reaches: then the peak is measured again, once, and never taken below what this run
        itself reached, so the column stays a fraction of what the machine can do."""
        if flops_per_s > self.peak_flops:
            before = self.peak_flops
            if not self.peak_measured_again:
                self.peak_measured_again = True
                self.peak_flops = max(self.peak_flops, measure_peak_flops(self.device, self.dtype))
                self.log(f"note: the matmul peak measured at start-up ({before / 1e9:.1f} GFLOP/s) is below what "
                         f"this run reaches ({flops_per_s / 1e9:.1f}); the machine was busy then. Measured again: "
                         f"{max(self.peak_flops, flops_per_s) / 1e9:.1f} GFLOP/s")
            self.peak_flops = max(self.peak_flops, flops_per_s)
        return flops_per_s / self.peak_flops

    def fit(self, until: int | None = None) -> list[float]:
        """Train to max_steps (or to `until`, to stop early and resume later: the schedule still
        follows max_steps). Returns the loss of every step trained so far.

        A SIGTERM or Ctrl-C ends the current step, writes a checkpoint and returns (then
        `self.stop_signal` is set). A non-finite loss stops with a UserError naming the step, or,
        with --on_nan rollback, reloads the newest checkpoint, halves the learning rate and goes on.
        """
        tc = self.tcfg
        until = tc.max_steps if until is None else min(until, tc.max_steps)
        self.preflight()
        if self.peak_flops is None:
            self.peak_flops = measure_peak_flops(self.device, self.dtype)
        self.log(f"device {self.device}, dtype {str(self.dtype).replace('torch.', '')}, world size "
                 f"{self.dist.world_size}, {self.objective.backbone.num_params() / 1e6:.2f}M parameters, "
                 f"{self.tokens_per_step:,} tokens per step (global batch {tc.batch_size} x accumulation "
                 f"{tc.grad_accum} x {self.dist.world_size} processes = "
                 f"{tc.batch_size * tc.grad_accum * self.dist.world_size} sequences of "
                 f"{self.objective.backbone.cfg.seq_len}), measured matmul peak {self.peak_flops / 1e9:.1f} GFLOP/s")
        self.log_memory_estimate()
        with self.catching_signals():
            while True:
                try:
                    self._loop(until)
                    break
                except NonFiniteLoss as bad:   # --on_nan: stop, or roll back and go on (faults.py)
                    self.roll_back(bad)
        return self.history

    def log_memory_estimate(self) -> MemoryEstimate:
        """One line before the first step: parameters, gradients, AdamW state and activations at
        this micro-batch against the device's memory (minilm/memory.py); a second, a warning,
        when they will not fit."""
        mem = estimate_memory(self.objective, self.tcfg.batch_size, self.device, self.dtype,
                              world_size=self.dist.world_size, fsdp=self.tcfg.fsdp,
                              checkpointing=getattr(self.tcfg, "activation_checkpointing", False))
        self.log(mem.describe(self.tcfg.batch_size, self.objective.backbone.cfg.seq_len))
        if not mem.fits():
            self.log(memory_advice(mem))
        return mem

    def _loop(self, until: int) -> None:
        tc = self.tcfg
        if self.out_of_patience():   # a resumed run that had stopped early: there is nothing left to do
            self.stopped_early = self.why_stopped_early()
            self.log(f"step {self.step:>6} | this run stopped early: {self.stopped_early}; raise "
                     f"--early_stopping_patience to go on")
            return
        self.objective.train()
        t_last = time.perf_counter()
        t_start, start_step = t_last, self.step
        pending: list[torch.Tensor] = []

        def flush_losses() -> list[float]:
            """Bring the pending step losses to the host (one sync) and check they are finite."""
            if not pending:
                return []
            losses = all_reduce_sum(torch.stack(pending), self.dist).tolist()
            first_step = self.step - len(pending) + 1
            pending.clear()
            check_finite(losses, first_step)
            self.history += losses
            return losses

        while self.step < until:
            step_loss, lr, _ = self.train_step(self.step)
            pending.append(step_loss)
            self.step += 1
            last = self.step == until
            stopping = self.stop_requested()
            saving = self.step % tc.ckpt_every == 0 or last or stopping
            if self.step % tc.log_every == 0 or last or saving:
                losses = flush_losses()   # before any checkpoint: never save a diverged model
                if self.step % tc.log_every == 0 or last:
                    now = time.perf_counter()
                    # every rank's tokens taken as this rank's: their rows are alike
                    tok_s = self.tokens_counted * self.dist.world_size / (now - t_last)
                    mfu = self.utilization(self.flops_counted / (now - t_last))
                    eta = (now - t_start) / max(1, self.step - start_step) * (tc.max_steps - self.step)
                    self.log(f"step {self.step:>6}/{tc.max_steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | "
                             f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | ETA {_fmt_time(eta)}")
                    self.write_metrics({"step": self.step, "loss": losses[-1], "lr": lr,
                                        "tokens_per_s": tok_s, "mfu": mfu})
                    t_last = time.perf_counter()
                    self.tokens_counted, self.flops_counted = 0, 0.0
            t_pause = time.perf_counter()  # evaluation and saving are not training throughput
            if self.val_source is not None and (self.step % tc.eval_every == 0 or last):
                self.last_eval = self.evaluate()
                ev = self.last_eval
                self.log(f"step {self.step:>6} | val " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                self.write_metrics({"step": self.step, **{f"val_{k}": v for k, v in ev.items()}})
                self.keep_best()
                self.warn_if_learned_nothing()
                if self.out_of_patience():
                    self.stopped_early = self.why_stopped_early()
                    flush_losses()    # checked finite before the checkpoint, as at any save
                    saving = True     # the last checkpoint, beside best.pt
            if saving:
                path = self.save()
                self.log(f"step {self.step:>6} | saved {path}")
            t_last += time.perf_counter() - t_pause
            t_start += time.perf_counter() - t_pause
            if self.stopped_early:
                self.log(f"step {self.step:>6} | stopping early: {self.stopped_early}")
                return
            if stopping:
                self.log(f"step {self.step:>6} | stopped by signal {self.stop_signal or 'on another rank'}; "
                         f"resume with --resume")
                self.stop_signal = self.stop_signal or signal.SIGTERM
                return


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
