"""minilm rows for the shared peer benchmark (../shared/bench/peers.py --plugin benchmarks/peers_plugin.py).

Every row goes through the harness's own h.run_train / h.time_generate, so minilm gets exactly the
peers' warm-up, timing, thread count, seeds, AdamW (h.make_adamw: lr 3e-4, betas 0.9/0.95, decay 0.1
on matrices), FLOP count, MFU and load check. Nothing here times anything itself.

Rows (see benchmarks/README.md):
  gpt-minilm            CausalLM, GPT-2's architecture (learned positions, LayerNorm, biases, GELU), fp32
  gpt-minilm-rope       CausalLM, minilm's defaults (RoPE, RMSNorm, no biases, GELU), fp32
  bf16-minilm           gpt-minilm under torch.autocast('cpu', bfloat16)       (peer: bf16-hf-sdpa)
  bf16-minilm-rope      gpt-minilm-rope under torch.autocast('cpu', bfloat16)
  gpt-minilm-compile    gpt-minilm stepped through torch.compile(objective), as train.py --compile true
  gpt-minilm-rope-compile  the same with minilm's defaults (neither is in the group: compiling takes minutes)
  gen-minilm            minilm.generate.generate, KV cache, 1 sequence          (peer: gen-hf-cache)
  gen-minilm-rope       the same with minilm's defaults
  gen-minilm-nocache    use_cache=False                                         (peer: gen-hf-nocache)
  mlm-minilm            MaskedLM (sparse head), RoBERTa's layer shapes, masking in the step (peer: roberta-mlm)
  bf16-mlm-minilm       mlm-minilm under torch.autocast('cpu', bfloat16)       (peer: bf16-roberta-mlm)
  bf16-roberta-mlm      the harness's roberta-mlm under the same autocast (built here: the harness has none)
  mask-minilm           MaskedLM.make_batch alone, per batch; wwm and span in its extra fields (peer: collator-mlm)
Group `minilm` = all of them.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

# Import minilm from this checkout even when it is not pip-installed in the peers venv.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from minilm.config import ModelConfig  # noqa: E402
from minilm.generate import generate  # noqa: E402
from minilm.objectives import model_config_for  # noqa: E402
from minilm.objectives.clm import CausalLM  # noqa: E402
from minilm.objectives.mlm import MaskedLM  # noqa: E402
from minilm.objectives.span import SpanMaskedLM  # noqa: E402
from minilm.objectives.wwm import WholeWordMaskedLM  # noqa: E402
from minilm.tokenizer import CLS_ID, NUM_SPECIAL, SEP_ID  # noqa: E402

# GPT-2's block (what gpt-hf-sdpa runs): learned absolute positions, LayerNorm with bias, biases in
# every linear, GELU (minilm: exact erf GELU; HF: gelu_new, the tanh approximation; same FLOPs),
# tied LM head, eps 1e-5.
GPT2_ARCH = dict(position="learned", norm="layernorm", bias=True, mlp="gelu")
# minilm's defaults: RoPE, RMSNorm, no biases, GELU, tied LM head.
MINILM_ARCH = dict(position="rope", norm="rmsnorm", bias=False, mlp="gelu")
# RoBERTa's layers as far as minilm has them: learned positions, LayerNorm with bias, biases, exact
# GELU, 4x MLP (intermediate 1536), tied head; MaskedLM adds the embedding norm RoBERTa also has.
# Not the same: pre-norm (RoBERTa: post-norm), no token-type table.
ROBERTA_ARCH = dict(position="learned", norm="layernorm", bias=True, mlp="gelu")


def model_config(h, arch: dict) -> ModelConfig:
    c = h.CFG
    cfg = ModelConfig(vocab_size=c["vocab"], seq_len=c["seq_len"], n_layer=c["n_layer"], n_head=c["n_head"],
                      n_embd=c["d_model"], dropout=c["dropout"], tie_embeddings=True, **arch)
    cfg.validate()
    return cfg


def build(h, arch: dict):
    """The CausalLM objective (backbone + tied head) and its parameter counts, counted as the
    harness counts GPT2: all unique params, minus the position table for n_nonemb."""
    cfg = model_config(h, arch)
    obj = CausalLM(cfg)
    pos = [obj.backbone.pos_emb.weight] if obj.backbone.pos_emb is not None else []
    n_total, n_nonemb = h.nparams(obj, pos)
    assert n_nonemb == obj.backbone.num_params(non_embedding=True), (n_nonemb, obj.backbone.num_params(True))
    return obj, cfg, n_total, n_nonemb


def _train(h, args, name: str, arch: dict, autocast_dtype=None, compile: bool = False):
    torch.manual_seed(0)  # as every peer does before building its model
    obj, cfg, n_total, n_nonemb = build(h, arch)
    # train.py --compile true: the trainer steps torch.compile(objective) (minilm/trainer.py)
    step_model = torch.compile(obj) if compile else obj
    xy = h.lm_batch_fn()  # the peers' token stream: x = raw[:, :-1], y = raw[:, 1:] of a (B, T+1) window

    def batch_fn():
        x, y = xy()
        raw = torch.cat([x, y[:, -1:]], dim=1)  # back to the (B, T+1) window minilm's data yields
        return obj.make_batch(raw)              # input_ids = x, labels = y (what the trainer does)

    def loss_fn(model, batch):
        loss, _sums = step_model(batch)         # the objective's forward, metric sums included
        return loss

    tokens = h.CFG["batch"] * h.CFG["seq_len"]
    return h.run_train(
        name, args, obj, loss_fn, batch_fn, tokens,
        n_nonemb=n_nonemb, n_total=n_total, attn_LHQT=h.LHQT(), autocast_dtype=autocast_dtype,
        extra=dict(
            impl=f"minilm CausalLM (Transformer + tied head){', torch.compile(objective) as train.py --compile true' if compile else ''}, SDPA is_causal; "
                 f"{cfg.position} positions, {cfg.norm}, bias={cfg.bias}, {cfg.mlp} (exact erf)",
            minilm_config=dataclasses.asdict(cfg),
            loss_targets_per_seq=h.CFG["seq_len"],
            note="loss over all T targets (labels = raw[:, 1:]); gpt-hf-* use labels=input_ids, i.e. T-1 "
                 "targets. make_batch is in the 'data' phase; forward also computes the objective's "
                 "metric sums (argmax accuracy, byte counts) as in training."))


def _gen(h, args, name: str, arch: dict, use_cache: bool = True):
    torch.manual_seed(0)
    obj, cfg, _, _ = build(h, arch)
    model = obj.backbone.eval()
    prompt_len = h.PROMPT_LEN
    idx = torch.randint(0, cfg.vocab_size, (1, prompt_len))  # drawn like gen-hf-cache's prompt
    overflow = []

    def g(warm):
        n = 20 if warm else args.new_tokens
        out = generate(model, idx, n, temperature=1.0, top_k=0, top_p=1.0, use_cache=use_cache,
                       warn=overflow.append)
        return out.shape[1] - prompt_len

    r = h.time_generate(
        name, args, g, args.new_tokens,
        extra=dict(impl=f"minilm.generate.generate use_cache={use_cache}, multinomial sampling "
                        f"(temperature 1, top_k 0, top_p 1 = gen-hf-*'s do_sample top_k=0); "
                        f"{cfg.position} positions, {cfg.norm}, bias={cfg.bias}",
                   prompt_len=prompt_len, minilm_config=dataclasses.asdict(cfg)))
    # prompt + new tokens past seq_len makes minilm drop the cache (sliding window): not comparable
    r["context_overflow"] = bool(overflow)
    return r


# ----------------------------------------------------------------------------- masked LM
def roberta_windows(h) -> torch.Tensor:
    """The peer's MLM examples as minilm token windows, (64, 256).

    roberta-mlm's collator cycles through h.example_pool(): rows <s> w..w </s> with ids 0 and 2
    at the ends and regular ids 5..V-1 between. Here <s> and </s> become minilm's <cls> and <sep>
    (special, never masked, as the collator's special_tokens_mask leaves them), and the 110
    regular ids that are special ids in minilm (5..114) move up by NUM_SPECIAL into the regular
    range. Same rows, same order, same number of maskable tokens (254 per row).
    """
    ids = torch.tensor([ex["input_ids"] for ex in h.example_pool()])
    return torch.where(ids == 0, CLS_ID, torch.where(ids == 2, SEP_ID,
                                                     torch.where(ids < NUM_SPECIAL, ids + NUM_SPECIAL, ids)))


def mlm_batch_fn(h, objective):
    """objective.make_batch over the peer's rows, B at a time in the collator's order, with one
    generator for the whole run: a new mask every step (dynamic masking), as the collator does."""
    windows, B = roberta_windows(h), h.CFG["batch"]
    generator = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def fn():
        i = state["i"]
        state["i"] = (i + B) % len(windows)
        rows = windows[[(i + k) % len(windows) for k in range(B)]]
        raw = torch.cat([rows, rows[:, -1:]], dim=1)  # (B, T+1), the window shape minilm's data yields
        return objective.make_batch(raw, generator)
    return fn


def _mlm(h, args, name: str, autocast_dtype=None):
    torch.manual_seed(0)
    cfg = model_config_for("mlm", model_config(h, ROBERTA_ARCH))   # with the encoder's embed_norm
    obj = MaskedLM(cfg)  # no tokenizer: ids < NUM_SPECIAL are special, random replacements uniform above
    pos = [obj.backbone.pos_emb.weight]
    n_total, n_nonemb = h.nparams(obj, pos)
    batch_fn = mlm_batch_fn(h, obj)
    predicted = []

    def loss_fn(model, batch):
        predicted.append(len(batch["targets"]))
        loss, _sums = model(batch)
        return loss

    r = h.run_train(
        name, args, obj, loss_fn, batch_fn, h.CFG["batch"] * h.CFG["seq_len"],
        n_nonemb=n_nonemb, n_total=n_total, attn_LHQT=h.LHQT(), autocast_dtype=autocast_dtype,
        extra=dict(
            impl="minilm MaskedLM: Transformer(mask=None, no mask: no padding) + BERT head "
                 "(dense, GELU, LayerNorm, tied matrix + bias) on the masked positions only; "
                 "make_batch (15%, 80/10/10, on tensors) inside the step ('data' phase)",
            minilm_config=dataclasses.asdict(obj.backbone.cfg),
            data="the peer's example_pool rows (<s>/</s> -> <cls>/<sep>, ids 5..114 -> +115), same order",
            note="mfu_formula counts 6N with N including the tied token matrix, i.e. a dense LM head, as "
                 "for roberta-mlm; minilm computes the head on ~15% of the positions, so util_counted "
                 "(FLOPs actually run) is the honest utilization. Pre-norm vs RoBERTa's post-norm."))
    r["predicted_tokens_per_step"] = sum(predicted) / max(1, len(predicted))
    return r


def _roberta_mlm_bf16(h, args):
    """The harness's roberta-mlm (b_roberta_mlm), line for line, under bf16 autocast."""
    from transformers import DataCollatorForLanguageModeling
    torch.manual_seed(0)
    tok = h.make_tokenizer()
    coll = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15, seed=0)
    m = h.roberta_model(args.roberta_attn)
    e = m.roberta.embeddings
    tot, nonemb = h.nparams(m, [e.position_embeddings.weight, e.token_type_embeddings.weight])

    def loss_fn(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"]).loss
    return h.run_train("bf16-roberta-mlm", args, m, loss_fn, h.collator_batch_fn(coll),
                       h.CFG["batch"] * h.CFG["seq_len"], n_nonemb=nonemb, n_total=tot, attn_LHQT=h.LHQT(), autocast_dtype=torch.bfloat16,
                       extra=dict(impl=f"transformers RobertaForMaskedLM attn={args.roberta_attn} + "
                                       "DataCollatorForLanguageModeling(0.15) in loop, under bf16 autocast "
                                       "(roberta-mlm of peers.py with autocast_dtype; built by the minilm plugin)"))


def _time_batches(h, args, fn, n=50):
    """Median ms per call, timed exactly as the harness's collator-mlm row times its collator."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(args.repeats):
        t0 = h.PC()
        for _ in range(n):
            fn()
        times.append((h.PC() - t0) / n)
    return times


def _mask_only(h, args):
    """make_batch alone (masking, labels, the chosen positions), per batch of the peer's rows.
    collator-mlm is the peer (DataCollatorForLanguageModeling on lists of ids)."""
    cfg = model_config_for("mlm", model_config(h, ROBERTA_ARCH))
    V = cfg.vocab_size
    times = _time_batches(h, args, mlm_batch_fn(h, MaskedLM(cfg)))
    batch = mlm_batch_fn(h, MaskedLM(cfg))()
    r = dict(bench="mask-minilm", kind="collator", batch_ms=h.summarize([1e3 * t for t in times]),
             tokens_per_s=h.summarize([h.CFG["batch"] * h.CFG["seq_len"] / t for t in times]),
             masked_frac=float((batch["labels"] != -100).float().mean()),
             impl="minilm MaskedLM.make_batch: masking.choose_bernoulli + replace on a (B, T+1) tensor")
    # whole-word and span masking need word starts; the peer's ids have none, so pretend 7 of every
    # 10 ids start a word (about English BPE's share): words of 1.4 pieces on average
    for objective_class, key in ((WholeWordMaskedLM, "wwm"), (SpanMaskedLM, "span")):
        obj = objective_class(cfg)
        obj.starts_word_table.copy_(torch.arange(V) % 10 < 7)
        times = _time_batches(h, args, mlm_batch_fn(h, obj))
        r[f"{key}_batch_ms"] = h.summarize([1e3 * t for t in times])
    return r


def register(registry, h):
    registry["gpt-minilm"] = lambda args: _train(h, args, "gpt-minilm", GPT2_ARCH)
    registry["gpt-minilm-rope"] = lambda args: _train(h, args, "gpt-minilm-rope", MINILM_ARCH)
    registry["bf16-minilm"] = lambda args: _train(h, args, "bf16-minilm", GPT2_ARCH, torch.bfloat16)
    registry["bf16-minilm-rope"] = lambda args: _train(h, args, "bf16-minilm-rope", MINILM_ARCH, torch.bfloat16)
    registry["gpt-minilm-compile"] = lambda args: _train(h, args, "gpt-minilm-compile", GPT2_ARCH, compile=True)
    registry["gpt-minilm-rope-compile"] = lambda args: _train(h, args, "gpt-minilm-rope-compile", MINILM_ARCH,
                                                              compile=True)
    registry["gen-minilm"] = lambda args: _gen(h, args, "gen-minilm", GPT2_ARCH)
    registry["gen-minilm-rope"] = lambda args: _gen(h, args, "gen-minilm-rope", MINILM_ARCH)
    registry["gen-minilm-nocache"] = lambda args: _gen(h, args, "gen-minilm-nocache", GPT2_ARCH, use_cache=False)
    registry["mlm-minilm"] = lambda args: _mlm(h, args, "mlm-minilm")
    registry["bf16-mlm-minilm"] = lambda args: _mlm(h, args, "bf16-mlm-minilm", torch.bfloat16)
    registry["bf16-roberta-mlm"] = lambda args: _roberta_mlm_bf16(h, args)
    registry["mask-minilm"] = lambda args: _mask_only(h, args)
    h.GROUPS["minilm"] = ["gpt-minilm", "gpt-minilm-rope", "bf16-minilm", "bf16-minilm-rope",
                          "gen-minilm", "gen-minilm-rope", "gen-minilm-nocache",
                          "mlm-minilm", "bf16-mlm-minilm", "bf16-roberta-mlm", "mask-minilm"]
    h.GROUPS["minilm-mlm"] = ["roberta-mlm", "mlm-minilm", "bf16-roberta-mlm", "bf16-mlm-minilm",
                              "collator-mlm", "mask-minilm"]
