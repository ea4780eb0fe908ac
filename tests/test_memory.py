"""The memory estimate printed before a run (minilm/memory.py) against the peak a training step
really reaches on CPU.

How the peak is measured: torch's CPU tensors are allocated by its own allocator, outside Python's
(tracemalloc never sees them), and the process's max RSS also counts the interpreter, the
libraries and pages the C allocator keeps after a free, hundreds of MB against the tens a small
model needs. PyTorch's profiler, with profile_memory=True, records every allocation and free of
its CPU allocator as a "[memory]" event with its size; their running sum, in time order, is the
bytes torch holds, and its maximum the peak. The profile covers the whole run from building the
model: parameters, the optimizer's state (made at the first step), two full steps."""
from __future__ import annotations

import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import minilm.memory
from minilm.config import Config, ModelConfig
from minilm.memory import activation_bytes, device_memory, estimate
from minilm.objectives import build_objective
from minilm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class RandomWindows:
    def __init__(self, batch_size: int, window: int, vocab_size: int):
        self.batch_size, self.window, self.vocab_size = batch_size, window, vocab_size

    def batch(self, step, micro=0):
        g = torch.Generator().manual_seed(1000 * step + micro)
        return torch.randint(7, self.vocab_size, (self.batch_size, self.window), generator=g)


def config(batch_size: int, **model) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**{**dict(vocab_size=512, seq_len=128, n_layer=2, n_head=4, n_embd=64), **model})
    cfg.train.device, cfg.train.batch_size = "cpu", batch_size
    return cfg


def measured_peak(cfg: Config, tmp_path) -> tuple[int, object]:
    """The most bytes torch's CPU allocator held from building a clm model through two training
    steps, and the objective."""
    cfg.train.out_dir = str(tmp_path)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        objective = build_objective("clm", cfg.model, None, cfg.obj)
        source = RandomWindows(cfg.train.batch_size, cfg.model.seq_len + 1, cfg.model.vocab_size)
        trainer = Trainer(cfg, objective, source, None, None, log=lambda *_: None)
        trainer.train_step(0)
        trainer.train_step(1)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak, objective


@pytest.mark.parametrize("batch_size,model", [
    (16, {}),                                                               # rmsnorm, RoPE, GELU
    (16, dict(norm="layernorm", position="learned", mlp="swiglu")),
    (8, dict(seq_len=256, n_embd=128)),
    (16, dict(dropout=0.1)),                                                # masks, attention's plain path
    (4, dict(seq_len=64, n_embd=256, n_layer=4, vocab_size=4096)),          # weights and AdamW state dominate
])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(tmp_path, batch_size, model):
    peak, objective = measured_peak(config(batch_size, **model), tmp_path)
    mem = estimate(objective, batch_size, torch.device("cpu"), torch.float32)
    assert 0.8 * peak <= mem.total <= 1.2 * peak, (mem, peak)


def test_the_parts(tmp_path):
    cfg = config(16)
    objective = build_objective("clm", cfg.model, None, cfg.obj)
    n = sum(p.numel() for p in objective.parameters())
    mem = estimate(objective, 16, torch.device("cpu"), torch.float32)
    assert (mem.parameters, mem.gradients, mem.optimizer, mem.n_params) == (4 * n, 4 * n, 8 * n, n)
    # the activations grow with the batch: twice the rows, twice the bytes
    assert activation_bytes(cfg.model, 32, torch.float32) == 2 * activation_bytes(cfg.model, 16, torch.float32)
    # bf16 autocast saves 2-byte activations
    assert activation_bytes(cfg.model, 16, torch.bfloat16) == activation_bytes(cfg.model, 16, torch.float32) // 2
    # a frozen backbone has no gradients or AdamW state for its weights
    for p in objective.backbone.parameters():
        p.requires_grad_(False)
    assert estimate(objective, 16, torch.device("cpu"), torch.float32).gradients == 0


def test_the_cpus_memory_is_the_machines_ram():
    ram, what = device_memory(torch.device("cpu"))
    assert ram == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") and what == "RAM"


def test_the_run_logs_the_estimate_and_warns_when_it_will_not_fit(tmp_path, monkeypatch, prepared, tokenizer):
    from tests.test_trainer import make_config, make_trainer
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=1)
    trainer = make_trainer(cfg, prepared, tokenizer)
    trainer.peak_flops = 1e9
    lines = []
    trainer.log = lines.append
    trainer.fit()
    said = [line for line in lines if line.startswith("memory estimate: ")]
    assert len(said) == 1 and " RAM = parameters " in said[0] and "micro-batch 8 x 32 tokens" in said[0]
    assert not any(line.startswith("warning: the memory estimate") for line in lines)

    monkeypatch.setattr(minilm.memory, "device_memory", lambda device: (1 << 20, "RAM"))   # 1 MiB
    lines.clear()
    trainer.log_memory_estimate()
    assert lines[0].startswith("memory estimate: ") and "of 1.0 MiB RAM" in lines[0]
    assert lines[1].startswith("warning: the memory estimate") and "lower --batch_size" in lines[1]
