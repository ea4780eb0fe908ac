"""The speedrun recipe's model switches (model.py): QK-norm, the squared-ReLU MLP and logit
soft-capping. Each pinned by a closed form or an invariance; with all three on, the KV cache and
causality still hold; off, today's models and checkpoints are exactly what they were; on, a model
trains through train.py and is refused for export with the field named. Tiny models on CPU, fp32."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from minilm import model as model_module
from minilm.config import ARCHES, Config, ModelConfig, config_from_saved, parse_overrides
from minilm.errors import UserError
from minilm.model import (CAUSAL, MLP, Attention, EncoderDecoder, KVCache, Transformer, decoding_mask, padding_mask,
                          softcap)
from tests import test_model
from tests.test_model import S, V, random_ids, tiny_cfg   # the tiny test models' vocab, window, config, ids

RECIPE = dict(qk_norm=True, mlp="relu2", logit_softcap=15.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# test_model's tiny models, their norms (q_norm and k_norm too) well away from 1, so that a missing
# or misplaced normalization changes the output by far more than the tolerance
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return test_model.randomize_(module, seed, norm_spread=0.3)


def make_model(seed: int = 0, **overrides) -> Transformer:
    return test_model.make_model(seed, norm_spread=0.3, **overrides)


# ----------------------------------------------------------------------------- QK-norm
def scores_and_output(model, ids, monkeypatch):
    """Every attention call's scores q k^T / sqrt(D) (as attention() is handed q and k, after
    QK-norm and RoPE) and the model's output, (list of (B, H, T, S), (B, T, C))."""
    seen = []
    real = model_module.attention

    def spy(q, k, v, **kw):
        seen.append(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(model_module, "attention", spy)
    with torch.no_grad():
        out = model(ids)
    monkeypatch.setattr(model_module, "attention", real)
    return seen, out


def scale_projection_(model, which: str, factor: float) -> None:
    """Multiply W_q (which="q") or W_k ("k") of every block by `factor`, in place."""
    C = model.cfg.n_embd
    rows = slice(0, C) if which == "q" else slice(C, 2 * C)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[rows] *= factor


@pytest.mark.parametrize("which,factor", [("q", 7.0), ("k", 0.25), ("q", 0.5)])
def test_qk_norm_makes_scores_and_output_invariant_to_scaling_wq_or_wk(which, factor, monkeypatch):
    ids = random_ids(2, 12, seed=1)
    # the norm's eps is the one thing that breaks the invariance (rms = sqrt(mean(q^2) + eps)): at
    # the default 1e-5 a score moves by about eps / mean(q^2) of itself, so a tiny eps here
    model = make_model(qk_norm=True, norm_eps=1e-10)
    scores, out = scores_and_output(model, ids, monkeypatch)
    scale_projection_(model, which, factor)
    scaled_scores, scaled_out = scores_and_output(model, ids, monkeypatch)
    assert len(scores) == 2 and scores[0].abs().max() > 1    # two blocks, scores far from 0
    for before, after in zip(scores, scaled_scores):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled_out, out, atol=1e-5, rtol=0)

    # without QK-norm the same rescaling multiplies the first block's scores by the factor
    plain = make_model(qk_norm=False)
    scores, out = scores_and_output(plain, ids, monkeypatch)
    scale_projection_(plain, which, factor)
    scaled_scores, scaled_out = scores_and_output(plain, ids, monkeypatch)
    torch.testing.assert_close(scaled_scores[0], factor * scores[0], atol=1e-4, rtol=1e-4)
    assert (scaled_out - out).abs().max() > 0.1


def test_qk_norm_is_an_rmsnorm_of_each_heads_query_and_key_with_one_weight_of_head_size(monkeypatch):
    """Closed form, no RoPE in the way (learned positions): attention() is handed, head by head,
    q_h / sqrt(mean(q_h^2) + eps) * w_q with q_h = (x W_q^T)[h*D:(h+1)*D], and the same for keys;
    the weights are of size D, shared by the heads; the values are untouched."""
    cfg = tiny_cfg(qk_norm=True, position="learned", n_head=4)
    attn = randomize_(Attention(cfg))
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.head_dim,)
    x = torch.randn(2, 5, cfg.n_embd, generator=torch.Generator().manual_seed(2))
    handed = {}
    real = model_module.attention

    def spy(q, k, v, **kw):
        handed.update(q=q, k=k, v=v)
        return real(q, k, v, **kw)

    monkeypatch.setattr(model_module, "attention", spy)
    with torch.no_grad():
        attn(x, mask=CAUSAL)
        w_q, w_k, w_v = attn.qkv.weight.split(cfg.n_embd)
        D, eps = cfg.head_dim, cfg.norm_eps
        for h in range(cfg.n_head):
            cols = slice(h * D, (h + 1) * D)
            for name, w, norm in (("q", w_q, attn.q_norm), ("k", w_k, attn.k_norm)):
                raw = x @ w[cols].T                                                   # (B, T, D)
                expected = raw / torch.sqrt(raw.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
                torch.testing.assert_close(handed[name][:, h], expected, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(handed["v"][:, h], x @ w_v[cols].T, atol=1e-6, rtol=1e-5)


def test_qk_norm_norms_the_keys_of_a_source_too():
    """Cross-attention and a block with a source (outputs_at's last block) read keys from another
    stream: those are normed as well, so scaling W_k leaves a cross-attending decoder unchanged."""
    torch.manual_seed(0)
    model = randomize_(EncoderDecoder(tiny_cfg(qk_norm=True, n_decoder_layer=2))).eval()
    src, tgt = random_ids(2, 10, seed=3), random_ids(2, 7, seed=4)
    with torch.no_grad():
        before = model(src, tgt)
        for block in model.decoder.blocks:
            block.cross.qkv.weight[model.cfg.n_embd:2 * model.cfg.n_embd] *= 5.0
        torch.testing.assert_close(model(src, tgt), before, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- squared ReLU
def test_relu2_mlp_is_down_of_relu_of_up_squared_on_a_hand_built_case():
    """n_embd 4, hidden 3, weights written out: up(x) = (x0 - x1, x2, -x3 + 1 (bias)), then
    relu(.)^2, then down sums the three hidden units into output 0 and copies unit 1 to output 3."""
    mlp = MLP(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_embd=4, intermediate_size=3, mlp="relu2",
                          bias=True))
    with torch.no_grad():
        mlp.up.weight.copy_(torch.tensor([[1., -1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., -1.]]))
        mlp.up.bias.copy_(torch.tensor([0., 0., 1.]))
        mlp.down.weight.copy_(torch.tensor([[1., 1., 1.], [0., 0., 0.], [0., 0., 0.], [0., 1., 0.]]))
        mlp.down.bias.zero_()
        x = torch.tensor([[3., 1., -2., 0.5],      # up: ( 2, -2, 0.5) -> relu^2 (4, 0, 0.25)
                          [-1., 1., 1.5, -3.]])    # up: (-2, 1.5, 4)  -> relu^2 (0, 2.25, 16)
        expected = torch.tensor([[4.25, 0., 0., 0.], [18.25, 0., 0., 2.25]])
        assert torch.equal(mlp(x), expected)


def test_relu2_mlp_is_relu_squared_through_random_weights_and_not_gelu():
    torch.manual_seed(0)
    relu2 = randomize_(MLP(tiny_cfg(mlp="relu2")))
    gelu = MLP(tiny_cfg(mlp="gelu"))
    gelu.load_state_dict(relu2.state_dict())     # same keys and shapes: only the activation differs
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.linear(F.relu(F.linear(x, relu2.up.weight)) ** 2, relu2.down.weight)
        torch.testing.assert_close(relu2(x), expected, atol=1e-6, rtol=1e-6)
        assert (gelu(x) - relu2(x)).abs().max() > 0.1


# ----------------------------------------------------------------------------- soft-capping
def test_softcap_is_c_tanh_z_over_c_bounded_and_off_at_zero():
    z = torch.linspace(-80, 80, 1601)
    for cap in (30.0, 15.0, 2.5):
        capped = softcap(z, cap)
        assert torch.equal(capped, cap * torch.tanh(z / cap))
        assert capped.abs().max() <= cap
        moderate = z.abs() <= 3 * cap                       # tanh(3) < 1 in fp32: strictly inside
        assert capped[moderate].abs().max() < cap
        assert torch.equal(softcap(torch.zeros(3), cap), torch.zeros(3))   # 0 stays 0 ...
        small = torch.tensor([1e-3, -2e-3])
        torch.testing.assert_close(softcap(small, cap), small, rtol=1e-5, atol=0)   # ... slope 1 there
    assert softcap(z, 0.0) is z                              # cap 0: off, the logits as they are


def test_every_lm_head_soft_caps_its_logits():
    """Transformer.logits (every causal/prefix/seq2seq LM head and generation), EncoderDecoder's
    and the masked LMs' MLMHead: exactly C * tanh(uncapped / C), all within (-C, C); uncapped, the
    same weights give logits beyond C."""
    from minilm.objectives.mlm import MaskedLM
    cap = 2.0
    hidden = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    capped, plain = make_model(logit_softcap=cap), make_model()
    plain.load_state_dict(capped.state_dict())
    torch.manual_seed(1)
    seq2seq = randomize_(EncoderDecoder(tiny_cfg(logit_softcap=cap, n_decoder_layer=1)))
    torch.manual_seed(2)
    masked = randomize_(MaskedLM(tiny_cfg(logit_softcap=cap, embed_norm=True)))
    with torch.no_grad():
        cases = [(capped.logits(hidden), plain.logits(hidden)),
                 (seq2seq.logits(hidden), F.linear(hidden, seq2seq.output_weight)),
                 (masked.head(hidden, masked.backbone.output_weight),
                  F.linear(masked.head.norm(F.gelu(masked.head.dense(hidden))), masked.backbone.output_weight,
                           masked.head.bias))]
        for got, uncapped in cases:
            assert cap < uncapped.abs().max() < 8 * cap    # beyond the cap, short of fp32's tanh = 1
            assert torch.equal(got, cap * torch.tanh(uncapped / cap))
            assert got.abs().max() < cap


# ----------------------------------------------------------------------------- all three on
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_recipe_decoder_is_causal_and_its_kv_cache_equals_the_full_pass(position):
    model = make_model(**RECIPE, position=position)
    ids = random_ids(2, 14, seed=5)
    with torch.no_grad():
        full = model.logits(model(ids))
        # causal: changing the tokens after position 8 changes nothing before it
        changed = ids.clone()
        changed[:, 9:] = (changed[:, 9:] + 1) % V
        torch.testing.assert_close(model.logits(model(changed))[:, :9], full[:, :9], atol=1e-5, rtol=0)
        assert (model.logits(model(changed))[:, 9:] - full[:, 9:]).abs().max() > 1e-2
        # a prefix of 5 in one call, then token by token
        cache = KVCache(model.cfg, 2, "cpu", torch.float32)
        steps = [model.logits(model(ids[:, :5], cache=cache, mask=decoding_mask(5, 0)))]
        for t in range(5, 14):
            steps.append(model.logits(model(ids[:, t:t + 1], cache=cache, mask=None)))
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_recipe_encoder_decoder_decodes_the_same_with_and_without_a_cache():
    torch.manual_seed(0)
    model = randomize_(EncoderDecoder(tiny_cfg(**RECIPE, n_decoder_layer=2))).eval()
    src, tgt = random_ids(2, 9, seed=6), random_ids(2, 6, seed=7)
    src_mask = padding_mask(torch.tensor([9, 6]), 9)
    with torch.no_grad():
        encoded = model.encode(src, src_mask)
        full = model.logits(model.decode(tgt, encoded, src_mask))
        cache = KVCache(model.decoder.cfg, 2, "cpu", torch.float32)
        steps = [model.logits(model.decode(tgt[:, t:t + 1], encoded, src_mask, mask=None, cache=cache))
                 for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_flops_relu2_and_softcap_count_as_gelu_and_qk_norm_adds_its_two_head_size_weights():
    from minilm.flops import transformer_flops
    with torch.device("meta"):
        plain, recipe = Transformer(tiny_cfg()), Transformer(tiny_cfg(mlp="relu2", logit_softcap=30.0))
        qk = Transformer(tiny_cfg(qk_norm=True))
    assert transformer_flops(recipe, S) == transformer_flops(plain, S)
    assert transformer_flops(qk, S) == transformer_flops(plain, S) + 6 * 2 * 16 * 2   # 2 weights of D=16, 2 blocks


# ----------------------------------------------------------------------------- today's models unchanged
def test_switches_off_keep_todays_parameters_and_on_add_only_the_qk_norm_weights():
    keys = set(Transformer(tiny_cfg()).state_dict())
    assert set(Transformer(tiny_cfg(mlp="relu2", logit_softcap=30.0)).state_dict()) == keys
    with_qk = set(Transformer(tiny_cfg(qk_norm=True)).state_dict())
    assert with_qk - keys == {f"blocks.{i}.attn.{n}_norm.weight" for i in range(2) for n in "qk"}
    assert keys <= with_qk
    # the defaults are today's: the same model, the same init draws, the same output
    torch.manual_seed(0)
    today = Transformer(tiny_cfg())
    torch.manual_seed(0)
    explicit = Transformer(tiny_cfg(qk_norm=False, logit_softcap=0.0, mlp="gelu"))
    ids = random_ids(2, 8, seed=0)
    with torch.no_grad():
        assert torch.equal(today.logits(today(ids)), explicit.logits(explicit(ids)))


def test_a_config_saved_before_the_switches_loads_with_them_off():
    saved = Config().to_dict()
    for name in ("qk_norm", "logit_softcap"):
        del saved["model"][name]
    cfg = config_from_saved(saved)
    assert (cfg.model.qk_norm, cfg.model.logit_softcap, cfg.model.mlp) == (False, 0.0, "gelu")
    assert cfg.model == ModelConfig()


def test_bad_values_are_one_line_naming_the_flag():
    for argv, fragment in ((["--logit_softcap", "-1"], "--logit_softcap must be"),
                           (["--mlp", "relu3"], "relu2"),
                           (["--qk_norm", "maybe"], "--qk_norm")):
        with pytest.raises(UserError, match=fragment) as err:
            parse_overrides(argv).validate()
        assert "\n" not in str(err.value)
    cfg = parse_overrides(["--qk_norm", "--mlp", "relu2", "--logit_softcap", "30"])
    assert (cfg.model.qk_norm, cfg.model.mlp, cfg.model.logit_softcap) == (True, "relu2", 30.0)


# ----------------------------------------------------------------------------- export refuses them
@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("switch,field", [(dict(logit_softcap=30.0), "logit_softcap"), (dict(mlp="relu2"), "mlp")])
def test_export_refuses_a_model_with_a_switch_on_naming_the_field(arch, switch, field):
    from minilm.hf_format import arch_of
    assert arch_of(ModelConfig(**ARCHES[arch])) == arch
    with pytest.raises(UserError, match=f"its? {field} is|model's {field} is") as err:
        arch_of(ModelConfig(**{**ARCHES[arch], **switch}))
    assert "\n" not in str(err.value)


def test_qk_norm_turns_llama_into_qwen3_and_has_no_counterpart_elsewhere():
    from minilm.hf_format import arch_of
    assert arch_of(ModelConfig(**{**ARCHES["llama"], "qk_norm": True})) == "qwen3"
    assert arch_of(ModelConfig(**{**ARCHES["qwen3"], "qk_norm": False})) == "llama"
    for arch in ("gpt2", "bert", "roberta"):
        with pytest.raises(UserError, match=f"its qk_norm is True where {arch} .the nearest. has False") as err:
            arch_of(ModelConfig(**{**ARCHES[arch], "qk_norm": True}))
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- through train.py
@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, tokenizer):
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    tokenizer.save(path)
    return path


def train_flags(out, corpus_dir, tokenizer_file, *extra):
    return ["--data", corpus_dir, "--tokenizer", tokenizer_file, "--n_layer", 2, "--n_head", 2, "--n_embd", 32,
            "--seq_len", 32, "--batch_size", 4, "--eval_batches", 1, "--warmup_steps", 1, "--device", "cpu",
            "--threads", 1, "--out_dir", out, *extra]


@pytest.mark.usefixtures("peak_flops_once")
@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_recipe_trains_through_train_py(objective, tmp_path, corpus_dir, tokenizer_file):
    from minilm.checkpoint import load_checkpoint
    from tests.conftest import run_in_process
    result = run_in_process("train.py", *train_flags(tmp_path, corpus_dir, tokenizer_file, "--objective", objective,
                                                     "--max_steps", 2, "--qk_norm", "--mlp", "relu2",
                                                     "--logit_softcap", 15))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "qk_norm=True" in result.stdout and "logit_softcap=15.0" in result.stdout
    state = load_checkpoint(str(tmp_path / "ckpt-00000002.pt"))
    saved = Config.from_dict(state["config"]).model
    assert (saved.qk_norm, saved.mlp, saved.logit_softcap) == (True, "relu2", 15.0)
    assert "backbone.blocks.1.attn.q_norm.weight" in state["model"]
    assert "backbone.blocks.1.attn.k_norm.weight" in state["model"]
    # trained: the QK-norm weights moved from their init of ones
    assert not torch.equal(state["model"]["backbone.blocks.1.attn.q_norm.weight"], torch.ones(16))


@pytest.mark.usefixtures("peak_flops_once")
def test_a_checkpoint_without_the_new_fields_resumes_exactly(tmp_path, corpus_dir, tokenizer_file):
    """A checkpoint as an older minilm wrote it (no qk_norm, no logit_softcap in its config; its
    model without QK-norm, clm's default since) resumes to the very weights of a run that never
    stopped."""
    from minilm.checkpoint import load_checkpoint, save_checkpoint
    from tests.conftest import run_in_process
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--max_steps", 4, "--ckpt_every", 2, "--keep_checkpoints", 0, "--eval_every", 100]
    result = run_in_process("train.py", *train_flags(straight, corpus_dir, tokenizer_file, *flags, "--qk_norm", "false"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    shutil.copytree(straight, resumed)
    os.remove(resumed / "ckpt-00000004.pt")
    old = load_checkpoint(str(resumed / "ckpt-00000002.pt"))
    for name in ("qk_norm", "logit_softcap"):
        del old["config"]["model"][name]
    save_checkpoint(str(resumed / "ckpt-00000002.pt"), old)
    result = run_in_process("train.py", "--out_dir", resumed, "--resume", "--max_steps", 4, "--ckpt_every", 2,
                            "--keep_checkpoints", 0, "--eval_every", 100, "--device", "cpu", "--threads", 1)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expected = load_checkpoint(str(straight / "ckpt-00000004.pt"))["model"]
    got = load_checkpoint(str(resumed / "ckpt-00000004.pt"))["model"]
    assert set(got) == set(expected) and not any("_norm.weight" in k and ".attn." in k for k in got)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
