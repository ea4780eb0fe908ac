"""The architecture switches (model.py, config.py's ARCHES): post-norm blocks, GPT-2's tanh GELU,
the --arch presets, and activation checkpointing. Tiny models on CPU, fp32 throughout."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from minilm.config import (ARCHES, PRESETS, Config, ModelConfig, config_from_saved, explicit_flags, help_text,
                           parse_overrides)
from minilm.errors import UserError
from minilm.model import (CAUSAL, MLP, Block, EncoderDecoder, KVCache, Transformer, decoding_mask, padding_mask,
                          set_activation_checkpointing)

from tests.test_model import V, make_model, random_ids, randomize_, tiny_cfg   # the tiny test models

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


POST = dict(norm_placement="post", norm="layernorm", bias=True, position="learned")   # BERT's block


# ----------------------------------------------------------------------------- post-norm
def layer_norm(x, norm):
    """(x - mean) / sqrt(var + eps) * weight + bias, written out."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention_closed_form(attn, x, source, allowed):
    """softmax(q k^T / sqrt(D), where allowed) v through attn's weights, head by head."""
    C, H = x.shape[-1], attn.n_head
    w_q, w_k, w_v = attn.qkv.weight.split(C)
    b_q, b_k, b_v = attn.qkv.bias.split(C)
    heads = []
    for h in range(H):
        cols = slice(h * C // H, (h + 1) * C // H)
        q = x @ w_q[cols].T + b_q[cols]
        k = source @ w_k[cols].T + b_k[cols]
        v = source @ w_v[cols].T + b_v[cols]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        heads.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v)
    return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias


@torch.no_grad()
def test_post_norm_block_is_the_closed_form_norm_after_each_residual_sum():
    """x1 = LN1(x + attn(x)), out = LN2(x1 + mlp(x1)): BERT's block, from its weights by hand;
    with a source (queries at some positions) the source is read as it is, un-normed."""
    torch.manual_seed(0)
    block = randomize_(Block(tiny_cfg(**POST))).eval()
    x = torch.randn(2, 6, 32)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    x1 = layer_norm(x + attention_closed_form(block.attn, x, x, allowed), block.norm1)
    mlp = F.gelu(x1 @ block.mlp.up.weight.T + block.mlp.up.bias) @ block.mlp.down.weight.T + block.mlp.down.bias
    want = layer_norm(x1 + mlp, block.norm2)
    torch.testing.assert_close(block(x, mask=CAUSAL), want, atol=1e-5, rtol=1e-5)
    # queries at positions 1 and 4 reading the whole row as their source: those rows of the full output
    rows = torch.tensor([1, 4])
    got = block(x[:, rows], x, mask=allowed[rows], positions=rows)
    torch.testing.assert_close(got, want[:, rows], atol=1e-5, rtol=1e-5)
    # the same block pre-norm is another function (the test can tell them apart)
    block.post_norm = False
    assert (block(x, mask=CAUSAL) - want).abs().max() > 1e-2


def test_post_norm_model_has_no_final_norm_and_default_keys_are_unchanged():
    post = Transformer(tiny_cfg(**POST, n_layer=1))
    assert not any(key.startswith("norm.") for key in post.state_dict())
    assert sorted(post.state_dict()) == sorted([
        "tok_emb.weight", "pos_emb.weight", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.up.weight", "blocks.0.mlp.up.bias",
        "blocks.0.mlp.down.weight", "blocks.0.mlp.down.bias"])
    # the default model (a pre-norm decoder) keeps exactly the keys old checkpoints hold
    default = Transformer(ModelConfig(vocab_size=V, n_layer=1))
    assert list(default.state_dict()) == [
        "tok_emb.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.norm2.weight", "blocks.0.mlp.up.weight", "blocks.0.mlp.down.weight", "norm.weight"]
    # and an old checkpoint's config, which has no norm_placement, is that pre-norm model
    saved = Config().to_dict()
    del saved["model"]["norm_placement"]
    assert config_from_saved(saved).model.norm_placement == "pre"


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_post_norm_decoder_is_causal_and_its_kv_cache_equals_the_full_pass(position):
    model = make_model(**{**POST, "position": position})
    T = 24
    ids = random_ids(2, T, seed=1)
    full = model.logits(model(ids))
    for t in (0, 7, T - 2):
        later = ids.clone()
        later[:, t + 1:] = (ids[:, t + 1:] + 1) % V
        changed = model.logits(model(later))
        torch.testing.assert_close(changed[:, :t + 1], full[:, :t + 1], atol=1e-5, rtol=0)
        assert (changed[:, t + 1:] - full[:, t + 1:]).abs().amax() > 1e-3
    cache = KVCache(model.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    bounds = [0, 7, 13, 14, T]           # a prefill, a chunk, one token, the rest
    for start, end in zip(bounds, bounds[1:]):
        mask = CAUSAL if not start else decoding_mask(end - start, start)
        hidden = model(ids[:, start:end], cache=cache, mask=mask)
        torch.testing.assert_close(model.logits(hidden), full[:, start:end], atol=1e-5, rtol=0)


def test_post_norm_outputs_at_is_the_full_output_there():
    model = make_model(**POST, n_segment=2)
    B, T = 3, 16
    ids = random_ids(B, T, seed=2)
    mask = padding_mask(torch.tensor([T, 11, 5]), T)
    keep = torch.nonzero((torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.3).flatten()).squeeze(1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask=mask, outputs_at=keep), model(ids, mask=mask).flatten(0, 1)[keep],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_post_norm_encoder_decoder_decodes_the_same_with_and_without_a_cache():
    torch.manual_seed(0)
    model = randomize_(EncoderDecoder(tiny_cfg(**POST, n_decoder_layer=2))).eval()
    assert not any(".norm." in key or key.startswith(("encoder.norm.", "decoder.norm.")) for key in model.state_dict())
    src, tgt = random_ids(2, 10, seed=4), random_ids(2, 8, seed=5)
    src_mask = padding_mask(torch.tensor([10, 6]), 10)
    enc = model.encode(src, src_mask)
    full = model.logits(model.decode(tgt, enc, src_mask))
    cache = KVCache(model.decoder.cfg, batch_size=2, device="cpu", dtype=torch.float32)
    steps = [model.logits(model.decode(tgt[:, :3], enc, src_mask, cache=cache))]
    for t in range(3, 8):
        steps.append(model.logits(model.decode(tgt[:, t:t + 1], enc, src_mask, mask=None, cache=cache)))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- GELU, tanh form
@torch.no_grad()
def test_gelu_tanh_is_gpt2s_formula():
    torch.manual_seed(0)
    cfg = tiny_cfg(mlp="gelu_tanh", bias=True)
    mlp = randomize_(MLP(cfg))
    x = 3 * torch.randn(4, 32)
    h = x @ mlp.up.weight.T + mlp.up.bias
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    want = gelu_tanh @ mlp.down.weight.T + mlp.down.bias
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)
    # the exact GELU is another function (the formula above tells them apart)
    mlp.kind = "gelu"
    assert (mlp(x) - want).abs().max() > 1e-4
    assert cfg.mlp_hidden == 4 * 32   # a GELU MLP's width


# ----------------------------------------------------------------------------- --arch
LLAMA = dict(norm_placement="pre", norm="rmsnorm", norm_eps=1e-6, bias=False, position="rope", mlp="swiglu",
             tie_embeddings=False, n_segment=0, embed_norm=False, qk_norm=False)
GPT2 = dict(norm_placement="pre", norm="layernorm", norm_eps=1e-5, bias=True, position="learned", mlp="gelu_tanh",
            tie_embeddings=True, n_segment=0, embed_norm=False, qk_norm=False)
BERT = dict(norm_placement="post", norm="layernorm", norm_eps=1e-12, bias=True, position="learned", mlp="gelu",
            tie_embeddings=True, n_segment=2, embed_norm=True, qk_norm=False)
EXPECTED = {"llama": LLAMA, "qwen3": {**LLAMA, "qk_norm": True}, "gpt2": GPT2, "bert": BERT, "roberta": {**BERT, "n_segment": 1}}


def model_fields(cfg: ModelConfig, names) -> dict:
    return {name: getattr(cfg, name) for name in names}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_arch_resolves_to_its_fields_and_a_flag_overrides_it(arch):
    assert ARCHES[arch] == EXPECTED[arch]
    model = parse_overrides(["--arch", arch]).model
    assert model_fields(model, EXPECTED[arch]) == EXPECTED[arch]
    # a flag wins, before or after --arch; the arch still sets the rest
    for argv in (["--arch", arch, "--norm_eps", "1e-7"], ["--norm_eps=1e-7", f"--arch={arch}"]):
        model = parse_overrides(argv).model
        assert model.norm_eps == 1e-7
        assert model_fields(model, EXPECTED[arch]) == {**EXPECTED[arch], "norm_eps": 1e-7}
    # a size preset and an arch combine; the printed and saved config is the resolved fields
    cfg = parse_overrides(["--preset", "small", "--arch", arch])
    assert model_fields(cfg.model, PRESETS["small"]) == PRESETS["small"]
    assert model_fields(cfg.model, EXPECTED[arch]) == EXPECTED[arch]
    assert "arch" not in cfg.to_dict()["model"] and "arch=" not in cfg.describe()
    assert f"norm_placement={EXPECTED[arch]['norm_placement']}" in cfg.describe()
    Transformer(dataclasses.replace(cfg.model, vocab_size=V, n_layer=1, n_embd=32, n_head=2))  # builds
    # its fields count as given: an objective's defaults do not undo them
    assert set(EXPECTED[arch]) <= explicit_flags(["--max_steps", "3", "--arch", arch])
    assert f"  --arch {arch} " in help_text()


def test_an_unknown_arch_is_one_line_naming_the_choices():
    with pytest.raises(UserError, match=r"unknown --arch 'bart'; choose one of llama, qwen3, gpt2, bert, roberta") as err:
        parse_overrides(["--arch", "bart"])
    assert "\n" not in str(err.value)


def test_an_arch_on_a_base_sets_every_field_that_tells_the_families_apart():
    """Applied on another arch's config (a checkpoint's, --init_from's), an arch gives the same model."""
    for arch in EXPECTED:
        for other in EXPECTED:
            base = parse_overrides(["--arch", other])
            assert parse_overrides(["--arch", arch], base=base).model == parse_overrides(["--arch", arch]).model


# ----------------------------------------------------------------------------- each arch trains
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    tokenizer.save(path)
    return path


@pytest.fixture(scope="module")
def labelled_file(tmp_path_factory):
    from tests.test_classify import write_labelled
    folder = tmp_path_factory.mktemp("labelled")
    return write_labelled(folder / "train.tsv", 60, 0), write_labelled(folder / "val.tsv", 12, 1)


@pytest.mark.usefixtures("peak_flops_once")
@pytest.mark.parametrize("objective", ["clm", "mlm", "classify"])
@pytest.mark.parametrize("arch", list(EXPECTED))
def test_each_arch_trains_each_kind_of_objective_through_train_py(arch, objective, tmp_path, corpus_dir,
                                                                  tokenizer_file, labelled_file):
    """One step of train.py with --arch: the checkpoint's model is the arch's fields as the
    objective resolves them (a masked LM always norms its embeddings), built as that arch is."""
    from minilm.checkpoint import load_checkpoint
    from minilm.objectives import model_config_for
    from tests.conftest import run_in_process
    data = ["--data", labelled_file[0], "--val_data", labelled_file[1]] if objective == "classify" else \
        ["--data", corpus_dir]
    flags = ["--objective", objective, "--arch", arch, *data, "--tokenizer", tokenizer_file, "--max_steps", 1,
             "--n_layer", 1, "--n_head", 2, "--n_embd", 32, "--seq_len", 32, "--batch_size", 4, "--eval_batches", 1,
             "--warmup_steps", 1, "--device", "cpu", "--threads", 1, "--out_dir", tmp_path]
    result = run_in_process("train.py", *flags)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    state = load_checkpoint(str(tmp_path / "ckpt-00000001.pt"))
    saved = Config.from_dict(state["config"])
    expected = dict(EXPECTED[arch], embed_norm=True) if objective == "mlm" else EXPECTED[arch]
    assert model_fields(saved.model, expected) == expected
    assert saved.model == model_config_for(objective, saved.model, saved.obj)
    keys = set(state["model"])
    assert ("backbone.norm.weight" in keys) == (arch in ("llama", "qwen3", "gpt2"))
    assert ("backbone.lm_head.weight" in keys) == (arch in ("llama", "qwen3") and objective != "classify")
    assert ("backbone.blocks.0.attn.q_norm.weight" in keys) == (arch == "qwen3")
    assert f"norm_placement={EXPECTED[arch]['norm_placement']}" in result.stdout


# ----------------------------------------------------------------------------- activation checkpointing
def loss_and_gradients(model, run, checkpointing: bool, seed: int = 3):
    """run(model) -> loss, with activation checkpointing on or off, from the same RNG state
    (dropout's noise): (loss, {name: gradient})."""
    set_activation_checkpointing(model, checkpointing)
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = run(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


KINDS = {
    # a decoder: causal, next-token loss
    "decoder": (lambda: Transformer(tiny_cfg(dropout=0.1)),
                lambda m, ids: F.cross_entropy(m.logits(m(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())),
    # a post-norm encoder over padded rows, with segments; the loss on a few positions (outputs_at)
    "encoder": (lambda: Transformer(tiny_cfg(**POST, n_segment=2, embed_norm=True, dropout=0.1, n_layer=3)),
                lambda m, ids: m.logits(m(ids, mask=padding_mask(torch.tensor([20, 13]), 20),
                                          segment_ids=(torch.arange(20) >= 8).long().expand(2, 20),
                                          outputs_at=torch.tensor([1, 5, 17, 22, 30]))).logsumexp(-1).mean()),
    # an encoder-decoder: the decoder's blocks cross-attend, the gradient flows back into the encoder
    "encoder-decoder": (lambda: EncoderDecoder(tiny_cfg(dropout=0.1, n_decoder_layer=2)),
                        lambda m, ids: F.cross_entropy(
                            m.logits(m(ids[:, :12], ids[:, 12:19], padding_mask(torch.tensor([12, 9]), 12)))
                            .flatten(0, 1), ids[:, 13:].flatten())),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout(kind, monkeypatch):
    build, run = KINDS[kind]
    torch.manual_seed(0)
    model = build()
    ids = random_ids(2, 20, seed=1)
    plain_loss, plain = loss_and_gradients(model, lambda m: run(m, ids), checkpointing=False)
    loss, grads = loss_and_gradients(model, lambda m: run(m, ids), checkpointing=True)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)
    assert grads.keys() == plain.keys() and len(grads) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(grads[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # dropout is on: another seed gives other gradients (the equality above is not dropout being off)
    _, other = loss_and_gradients(model, lambda m: run(m, ids), checkpointing=True, seed=4)
    assert max((other[n] - plain[n]).abs().max() for n in plain) > 1e-4
    # and the blocks were recomputed: backward ran each block's MLP a second time
    calls = []
    feed_forward = Block.feed_forward
    monkeypatch.setattr(Block, "feed_forward", lambda self, x: calls.append(1) or feed_forward(self, x))
    loss_and_gradients(model, lambda m: run(m, ids), checkpointing=True)
    recomputed = len(calls)
    calls.clear()
    loss_and_gradients(model, lambda m: run(m, ids), checkpointing=False)
    last_at = 1 if kind == "encoder" else 0     # outputs_at's last block is not checkpointed
    assert recomputed == 2 * len(calls) - last_at


def saved_activation_bytes(model, run) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(model).backward()
    return total


def test_activation_checkpointing_keeps_fewer_activations_and_not_in_eval(monkeypatch):
    build, run = KINDS["decoder"]
    torch.manual_seed(0)
    model = build().train()
    ids = random_ids(4, 32, seed=2)
    model.activation_checkpointing = False
    kept = saved_activation_bytes(model, lambda m: run(m, ids))
    model.activation_checkpointing = True
    assert saved_activation_bytes(model, lambda m: run(m, ids)) < kept / 2
    # never at inference: a model in eval() runs its blocks once
    model.eval()
    calls = []
    feed_forward = Block.feed_forward
    monkeypatch.setattr(Block, "feed_forward", lambda self, x: calls.append(1) or feed_forward(self, x))
    run(model, ids).backward()
    assert len(calls) == len(model.blocks)


@pytest.mark.usefixtures("peak_flops_once")
def test_train_py_activation_checkpointing_trains_the_same_steps(tmp_path, corpus_dir, tokenizer_file, monkeypatch):
    """--activation_checkpointing reaches the model through the trainer, and three steps of an
    encoder with dropout give the same losses and weights as without it."""
    import json

    import minilm.model
    from minilm.checkpoint import load_checkpoint
    from tests.conftest import run_in_process
    checkpointed = []
    plain_checkpoint = minilm.model.checkpoint
    monkeypatch.setattr(minilm.model, "checkpoint", lambda *a, **k: checkpointed.append(1) or plain_checkpoint(*a, **k))
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on)
        result = run_in_process("train.py", "--objective", "mlm", "--arch", "bert", "--dropout", 0.1, "--data",
                                corpus_dir, "--tokenizer", tokenizer_file, "--max_steps", 3, "--n_layer", 2,
                                "--n_head", 2, "--n_embd", 32, "--seq_len", 32, "--batch_size", 4, "--eval_batches", 1,
                                "--warmup_steps", 1, "--log_every", 1, "--device", "cpu", "--threads", 1,
                                "--activation_checkpointing", str(on).lower(), "--out_dir", out)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        losses = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
        runs[on] = losses, load_checkpoint(str(out / "ckpt-00000003.pt"))["model"]
        assert len(checkpointed) == (3 * 1 if on else 0), len(checkpointed)   # the first block of 2, each step
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- the families themselves
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@torch.no_grad()
def test_an_arch_computes_its_familys_model_exactly_with_the_weights_renamed(arch):
    """transformers' BertModel / GPT2Model / LlamaModel from a random config, its weights only
    renamed (and GPT-2's Conv1D transposed): the same hidden states, to fp32 rounding."""
    transformers = pytest.importorskip("transformers")
    C, H, L, T = 64, 4, 2, 24
    torch.manual_seed(0)
    if arch == "bert":
        hf = transformers.BertModel(transformers.BertConfig(
            vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * C,
            max_position_embeddings=T, type_vocab_size=2), add_pooling_layer=False)
        names = {"tok_emb": "embeddings.word_embeddings", "pos_emb": "embeddings.position_embeddings",
                 "seg_emb": "embeddings.token_type_embeddings", "embed_norm": "embeddings.LayerNorm"}
        for i in range(L):
            names.update({f"blocks.{i}.{ours}": f"encoder.layer.{i}.{theirs}" for ours, theirs in [
                ("attn.proj", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
                ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"), ("norm2", "output.LayerNorm")]})
            names[f"blocks.{i}.attn.qkv"] = tuple(f"encoder.layer.{i}.attention.self.{n}"
                                                  for n in ("query", "key", "value"))
    elif arch == "gpt2":
        hf = transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=C, n_layer=L, n_head=H, n_positions=T,
                                                            bos_token_id=0, eos_token_id=0))
        names = {"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"}
        for i in range(L):
            names.update({f"blocks.{i}.{ours}": f"h.{i}.{theirs}" for ours, theirs in [
                ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("norm1", "ln_1"), ("norm2", "ln_2"),
                ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")]})
    else:
        hf = transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
            intermediate_size=96, max_position_embeddings=T, rms_norm_eps=1e-6))
        names = {"tok_emb": "embed_tokens", "norm": "norm"}
        for i in range(L):
            p = f"layers.{i}."
            names.update({f"blocks.{i}.attn.qkv": tuple(p + f"self_attn.{n}_proj" for n in "qkv"),
                          f"blocks.{i}.attn.proj": p + "self_attn.o_proj", f"blocks.{i}.norm1": p + "input_layernorm",
                          f"blocks.{i}.norm2": p + "post_attention_layernorm",
                          f"blocks.{i}.mlp.up": (p + "mlp.gate_proj", p + "mlp.up_proj"),
                          f"blocks.{i}.mlp.down": p + "mlp.down_proj"})
    theirs = hf.eval().state_dict()
    ours = {}
    for mine, source in names.items():
        source = (source,) if isinstance(source, str) else source     # several: concatenated (q, k, v)
        for suffix in ("weight", "bias"):
            if f"{source[0]}.{suffix}" in theirs:
                parts = [theirs[f"{name}.{suffix}"] for name in source]
                if arch == "gpt2" and suffix == "weight" and ("attn." in mine or "mlp." in mine):
                    parts = [part.T for part in parts]                # GPT-2's Conv1D stores (in, out)
                ours[f"{mine}.{suffix}"] = torch.cat(parts)
    model = Transformer(tiny_cfg(seq_len=T, n_layer=L, n_head=H, n_embd=C, **ARCHES[arch],
                                 intermediate_size=96 if arch == "llama" else 0)).eval()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if arch == "llama" else [])   # LlamaModel has no head
    ids = random_ids(2, T, seed=9)
    if arch == "bert":
        lengths = torch.tensor([T, 15])
        valid = torch.arange(T)[None] < lengths[:, None]
        segments = (torch.arange(T) >= 10).long().expand(2, T)
        want = hf(ids, attention_mask=valid.long(), token_type_ids=segments).last_hidden_state[valid]
        got = model(ids, mask=padding_mask(lengths, T), segment_ids=segments)[valid]
    else:
        want, got = hf(ids).last_hidden_state, model(ids)
    assert want.abs().max() > 0.5       # not all-zero states
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
