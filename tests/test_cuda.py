"""The same laws on a CUDA GPU: every objective trains under bf16 autocast, a CUDA step equals
a CPU step, the KV cache equals recomputation, torch.compile equals eager, fp16 with loss scaling
learns, and resume continues exactly. Skipped without a GPU (CI has none); run on one with
`python -m pytest tests/test_cuda.py` (benchmarks/gpu_check.sh does, with the throughput runs)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from minilm.config import ModelConfig
from minilm.data import make_source, source_class
from minilm.model import CAUSAL, KVCache, Transformer, decoding_mask
from minilm.objectives import OBJECTIVES, build_objective, data_kind_for, model_config_for, window_length_for
from minilm.trainer import Trainer
from tests.test_trainer import make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make the fp32 comparisons below 1e-3-close instead of 1e-5-close."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cuda_trainer(cfg, prepared, tokenizer, val=False):
    folder, _ = prepared
    torch.manual_seed(0)
    objective = build_objective(cfg.train.objective, cfg.model, tokenizer, cfg.obj)
    window = window_length_for(cfg.train.objective, model_config_for(cfg.train.objective, cfg.model), cfg.obj)
    train = make_source(objective.data, folder, "train", cfg.model.seq_len, cfg.train.batch_size,
                        seed=cfg.train.seed, log=None, window_length=window)
    val_source = (make_source(objective.data, folder, "val", cfg.model.seq_len, cfg.train.batch_size, log=None,
                              window_length=window) if val else None)
    return Trainer(cfg, objective, train, val_source, tokenizer, log=lambda *_: None)


def reads_running_text(name: str) -> bool:
    """Objectives whose data is the prepared corpus (not rows of a labelled or paired table)."""
    return source_class(data_kind_for(name)).prepares == "documents"


@pytest.mark.parametrize("name", [n for n in sorted(OBJECTIVES) if reads_running_text(n)] + ["mlm+sop"])
def test_every_objective_trains_on_cuda_in_bf16(tmp_path, prepared, tokenizer, name):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=6, objective=name, device="cuda", dtype="bf16",
                      lr=3e-3)
    trainer = cuda_trainer(cfg, prepared, tokenizer)
    assert trainer.device.type == "cuda" and trainer.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in trainer.objective.named_parameters()}
    losses = trainer.fit()
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    moved = [n for n, p in trainer.objective.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2, f"only {len(moved)} of {len(before)} parameters changed"
    assert all(torch.isfinite(p).all() for p in trainer.objective.parameters())


def test_a_cuda_step_equals_a_cpu_step_in_fp32(tmp_path, prepared, tokenizer):
    """Same weights, same batch: the loss and every gradient agree to float32 rounding (compared
    to each tensor's scale: AdamW's first update, m / sqrt(v), would magnify the rounding of
    near-zero gradients into full-size steps, so the weights after a step are no fair test)."""
    results = []
    for device in ("cpu", "cuda"):
        cfg = make_config(tmp_path / device, tokenizer.vocab_size, max_steps=1, device=device, dtype="fp32")
        trainer = cuda_trainer(cfg, prepared, tokenizer)
        loss = trainer.accumulate_gradients(0)
        results.append((float(loss), {n: p.grad.detach().cpu() for n, p in trainer.objective.named_parameters()}))
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = results
    assert gpu_loss == pytest.approx(cpu_loss, abs=1e-5)
    for n, grad in cpu_grads.items():
        scale = grad.abs().amax().item()
        assert (gpu_grads[n] - grad).abs().amax().item() <= 1e-4 * scale + 1e-8, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_kv_cache_equals_recompute_on_cuda(dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=48, n_layer=3, n_head=4, n_embd=128)
    model = Transformer(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 40), device="cuda")
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        full = model.logits(model(ids)).float()
        cache = KVCache(cfg, 3, "cuda", dtype, max_len=40)
        out = [model.logits(model(ids[:, :10], cache=cache, mask=CAUSAL)).float()]
        for t in range(10, 40, 6):
            chunk = ids[:, t:t + 6]
            out.append(model.logits(model(chunk, cache=cache, mask=decoding_mask(chunk.shape[1], t, device="cuda"))).float())
    got = torch.cat(out, dim=1)
    assert (got - full).abs().amax() < tolerance * full.abs().amax()
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.97


@torch.no_grad()
def test_compiled_model_equals_eager_on_cuda():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, n_embd=128)
    model = Transformer(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda")
    eager = model.logits(model(ids))
    compiled = torch.compile(model)
    torch.testing.assert_close(model.logits(compiled(ids)), eager, atol=1e-4, rtol=1e-4)


def test_compiled_training_matches_eager_losses(tmp_path, prepared, tokenizer):
    runs = []
    for compile_model in (False, True):
        cfg = make_config(tmp_path / str(compile_model), tokenizer.vocab_size, max_steps=8, device="cuda",
                          dtype="fp32", compile=compile_model)
        runs.append(cuda_trainer(cfg, prepared, tokenizer).fit())
    assert runs[1] == pytest.approx(runs[0], rel=1e-3, abs=1e-3)


def test_fp16_with_loss_scaling_learns(tmp_path, prepared, tokenizer):
    cfg = make_config(tmp_path, tokenizer.vocab_size, max_steps=60, device="cuda", dtype="fp16", lr=3e-3)
    trainer = cuda_trainer(cfg, prepared, tokenizer)
    assert trainer.scaler is not None
    losses = trainer.fit()
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.5, losses


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_exactly_on_cuda(tmp_path, prepared, tokenizer, dtype):
    """Stop at step 6, resume in a fresh Trainer: the next losses equal an uninterrupted run's
    (dropout on: the CUDA RNG state must come back too)."""
    def config(out):
        cfg = make_config(out, tokenizer.vocab_size, max_steps=12, device="cuda", dtype=dtype)
        cfg.model.dropout = 0.1
        return cfg

    straight = cuda_trainer(config(tmp_path / "a"), prepared, tokenizer).fit()
    first = cuda_trainer(config(tmp_path / "b"), prepared, tokenizer)
    first.fit(until=6)
    torch.manual_seed(999)
    torch.cuda.manual_seed(999)   # scramble both RNGs: resume must restore them
    second = cuda_trainer(config(tmp_path / "b"), prepared, tokenizer)
    second.load(os.path.join(tmp_path / "b", "ckpt-00000006.pt"))
    resumed = second.fit()
    assert first.history == straight[:6]
    assert resumed == straight[6:], (resumed, straight[6:])


def test_mlm_masking_rate_on_cuda(tokenizer):
    """The masking runs on the training device with a device generator; its rate is the stated one."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=128, n_layer=1, n_head=2, n_embd=64)
    objective = build_objective("mlm", cfg, tokenizer).cuda()
    raw = torch.randint(200, tokenizer.vocab_size, (256, 129), device="cuda")
    batch = objective.make_batch(raw, torch.Generator(device="cuda").manual_seed(0))
    targets = (batch["labels"] != -100)
    assert batch["input_ids"].device.type == "cuda"
    rate = targets.float().mean().item()
    n = targets.numel()
    assert abs(rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n), rate


@torch.no_grad()
def test_greedy_generation_with_cache_equals_without_on_cuda():
    from minilm.generate import beam_search, generate
    from minilm.model import EncoderDecoder
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, n_embd=128)
    model = Transformer(cfg).cuda().eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), device="cuda")
    cached = generate(model, prompt, 20, temperature=0.0, use_cache=True)
    recomputed = generate(model, prompt, 20, temperature=0.0, use_cache=False)
    assert cached.device.type == "cuda" and torch.equal(cached, recomputed)
    seq2seq = EncoderDecoder(ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, n_embd=128,
                                         n_decoder_layer=2)).cuda().eval()
    inputs = torch.randint(5, cfg.vocab_size, (2, 12), device="cuda")
    kwargs = dict(start_id=0, eos_id=-1, beam_size=3)
    (tokens_a, scores_a), (tokens_b, scores_b) = (beam_search(seq2seq, inputs, 10, use_cache=c, **kwargs)
                                                  for c in (True, False))
    assert torch.equal(tokens_a, tokens_b)
    torch.testing.assert_close(scores_a, scores_b, atol=1e-4, rtol=1e-4)
