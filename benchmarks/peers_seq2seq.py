"""Encoder–decoder rows for the shared peer benchmark: T5 span corruption and beam search.

    /tmp/peers/bin/python ../shared/bench/peers.py --plugin benchmarks/peers_seq2seq.py \
        --bench matmul,t5-minilm,t5-hf-same,bf16-t5-minilm,bf16-t5-hf-same,beam-minilm,beam-hf --repeats 5

Every row goes through the harness's h.run_train / h.time_generate (warm-up, repeats, threads,
AdamW, load check), as in peers_plugin.py. The config is issue 9's: 3 encoder + 3 decoder blocks,
n_embd 384, 6 heads, MLP 1536, vocab 8192, batch 8, encoder input 256 tokens.

Rows:
  t5-minilm        minilm's SpanCorruption objective (EncoderDecoder, minilm's defaults: RoPE, RMSNorm,
                   no biases, GELU), make_batch (noise_span_corruption on tensors) inside the step:
                   284 raw tokens -> 256 input + 58 target tokens, no padding. fp32
  t5-hf-same       transformers T5ForConditionalGeneration (3+3, relu, d_ff 1536, tied), fed the SAME
                   corruption (minilm's noise_span_corruption, 58-token targets, no padding), inside the
                   step too. The harness's own t5-span row pads targets to 64 and corrupts in numpy.
  bf16-*           the two rows above under torch.autocast('cpu', bfloat16)
  beam-minilm      minilm.generate beam search, beam 4, one 256-token input, --new-tokens new tokens
                   (eos never ends a beam: the same count of tokens every time), model in eval mode
  beam-hf          T5ForConditionalGeneration.generate(num_beams=4) on the same input, eos disabled
tokens/s of the training rows = (encoder input + decoder target tokens) per second, both sides.
"""
from __future__ import annotations

import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import ModelConfig, ObjectiveConfig  # noqa: E402
from minilm.masking import noise_span_corruption, noise_span_window  # noqa: E402
from minilm.objectives import build_objective  # noqa: E402
from minilm.tokenizer import NUM_SPECIAL  # noqa: E402

N_ENCODER, N_DECODER = 3, 3
BEAM_SIZE = 4


def t5_model_config(h) -> ModelConfig:
    c = h.CFG
    return ModelConfig(vocab_size=c["vocab"], seq_len=c["seq_len"], n_layer=N_ENCODER, n_decoder_layer=N_DECODER,
                       n_head=c["n_head"], n_embd=c["d_model"], intermediate_size=4 * c["d_model"],
                       dropout=c["dropout"], tie_embeddings=True)


def raw_windows(h, seed=0):
    """A stream of (B, raw) windows of random non-special ids: the raw tokens both rows corrupt."""
    raw_length, _ = noise_span_window(h.CFG["seq_len"])
    g = torch.Generator().manual_seed(seed)

    def next_windows():
        return torch.randint(NUM_SPECIAL, h.CFG["vocab"], (h.CFG["batch"], raw_length), generator=g)
    return next_windows


def hf_t5(h):
    from transformers import T5Config, T5ForConditionalGeneration
    c = h.CFG
    config = T5Config(vocab_size=c["vocab"], d_model=c["d_model"], d_kv=c["d_model"] // c["n_head"],
                      d_ff=4 * c["d_model"], num_layers=N_ENCODER, num_decoder_layers=N_DECODER,
                      num_heads=c["n_head"], dropout_rate=0.0, feed_forward_proj="relu", tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def _t5_minilm(h, args, name, autocast_dtype=None):
    torch.manual_seed(0)
    objective = build_objective("t5", t5_model_config(h), None, ObjectiveConfig())
    next_windows = raw_windows(h)
    generator = torch.Generator().manual_seed(0)

    def batch_fn():
        return objective.make_batch(next_windows(), generator)

    def loss_fn(model, batch):
        loss, _sums = model(batch)
        return loss

    return _run_t5_row(h, args, name, objective, loss_fn, batch_fn, autocast_dtype,
                       "minilm SpanCorruption: EncoderDecoder 3+3 (RoPE, RMSNorm, GELU, tied), "
                       "make_batch = noise_span_corruption on tensors inside the step")


def _t5_hf_same(h, args, name, autocast_dtype=None):
    torch.manual_seed(0)
    model = hf_t5(h)
    next_windows = raw_windows(h)
    generator = torch.Generator().manual_seed(0)

    def batch_fn():
        inputs, targets, _noise = noise_span_corruption(next_windows(), generator)
        return inputs, targets

    def loss_fn(model, batch):
        return model(input_ids=batch[0], labels=batch[1]).loss   # no padding: no attention mask needed

    return _run_t5_row(h, args, name, model, loss_fn, batch_fn, autocast_dtype,
                       "transformers T5ForConditionalGeneration 3+3 relu d_ff 1536 tied, fed minilm's "
                       "noise_span_corruption (same corruption, no padding) inside the step")


def _run_t5_row(h, args, name, model, loss_fn, batch_fn, autocast_dtype, impl: str):
    """One training row through the harness: tokens/s counts encoder input + decoder target tokens."""
    target_length = noise_span_window(h.CFG["seq_len"])[1]
    n_total = sum(p.numel() for p in model.parameters())
    tokens = h.CFG["batch"] * (h.CFG["seq_len"] + target_length)
    return h.run_train(name, args, model, loss_fn, batch_fn, tokens, n_nonemb=n_total, n_total=n_total,
                       autocast_dtype=autocast_dtype,
                       extra=dict(impl=impl, enc_len=h.CFG["seq_len"], dec_len=target_length,
                                  note="tokens/s = encoder input + decoder target tokens"))


def _beam_input(h):
    g = torch.Generator().manual_seed(1)
    return torch.randint(NUM_SPECIAL, h.CFG["vocab"], (1, h.CFG["seq_len"]), generator=g)


def _beam_minilm(h, args):
    from minilm.generate import beam_search
    torch.manual_seed(0)
    objective = build_objective("t5", t5_model_config(h), None, ObjectiveConfig()).eval()
    model = objective.backbone
    source = _beam_input(h)

    def run(warm):
        n = 20 if warm else args.new_tokens
        # eos_id -1: no token ends a beam, so every run makes exactly n tokens (as HF's eos None)
        tokens, _scores = beam_search(model, source, n, beam_size=BEAM_SIZE, start_id=0, eos_id=-1, pad_id=0)
        return tokens.shape[2]
    return h.time_generate("beam-minilm", args, run, args.new_tokens,
                           extra=dict(impl=f"minilm.generate.beam_search beam {BEAM_SIZE}, KV cache, cross-attention "
                                           "keys/values once per decode, eos disabled", input_len=h.CFG["seq_len"]))


def _beam_hf(h, args):
    from transformers import GenerationConfig
    torch.manual_seed(0)
    model = hf_t5(h).eval()
    source = _beam_input(h)

    def run(warm):
        n = 20 if warm else args.new_tokens
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, num_beams=BEAM_SIZE, do_sample=False,
                                  early_stopping=False, eos_token_id=None, pad_token_id=0,
                                  decoder_start_token_id=0, use_cache=True)
        with torch.no_grad():
            out = model.generate(source, generation_config=config)
        return out.shape[1] - 1
    return h.time_generate("beam-hf", args, run, args.new_tokens,
                           extra=dict(impl=f"transformers T5ForConditionalGeneration.generate(num_beams={BEAM_SIZE}), "
                                           "eos disabled", input_len=h.CFG["seq_len"]))


def register(registry, h):
    registry["t5-minilm"] = lambda args: _t5_minilm(h, args, "t5-minilm")
    registry["bf16-t5-minilm"] = lambda args: _t5_minilm(h, args, "bf16-t5-minilm", torch.bfloat16)
    registry["t5-hf-same"] = lambda args: _t5_hf_same(h, args, "t5-hf-same")
    registry["bf16-t5-hf-same"] = lambda args: _t5_hf_same(h, args, "bf16-t5-hf-same", torch.bfloat16)
    registry["beam-minilm"] = lambda args: _beam_minilm(h, args)
    registry["beam-hf"] = lambda args: _beam_hf(h, args)
    h.GROUPS["minilm-seq2seq"] = ["t5-minilm", "t5-hf-same", "bf16-t5-minilm", "bf16-t5-hf-same",
                                  "beam-minilm", "beam-hf"]
