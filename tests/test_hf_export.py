"""Export to Hugging Face transformers' folders (minilm/hf_export.py, minilm/hf_format.py).

Without any foreign package: for each architecture and head, export then read_folder gives the
very tensors and logits; the folder holds transformers' names and config.json's fields; what has
no counterpart is one line that says what would work; a folder is never written over a run.
With transformers installed (the `hf` extra): AutoModelFor*.from_pretrained(folder) computes
minilm's logits to 1e-5 in fp32, padded rows included."""
from __future__ import annotations

import json
import os

import pytest
import torch

import minilm
from minilm.checkpoint import bytes_to_tensor
from minilm.config import Config, ModelConfig
from minilm.errors import UserError
from minilm.hf_export import export_folder, hf_weights
from minilm.hf_format import (ARCHES, arch_of, foreign_rows, from_hf_state, minilm_rows, renames_for)
from minilm.hf_import import load_hf_module, read_folder
from minilm.objectives import build_objective, model_config_for, objective_class
from minilm.safetensors_io import load_safetensors, main
from minilm.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from tests.conftest import run_main

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the classifier options that compute what each architecture's *ForSequenceClassification does
CLASSIFY = {"bert": dict(pooling="first", classifier_attention="bidirectional", classifier_head="pooler"),
            "roberta": dict(pooling="first", classifier_attention="bidirectional", classifier_head="pooler"),
            "llama": dict(pooling="last", classifier_attention="causal", classifier_head="score"),
            "qwen3": dict(pooling="last", classifier_attention="causal", classifier_head="score"),
            "gpt2": dict(pooling="last", classifier_attention="causal", classifier_head="score")}
LABELS = '["neg", "pos", "mixed"]'
# (arch, objective, transformers' Auto class): every head with a counterpart
CASES = [("llama", "clm", "AutoModelForCausalLM"), ("qwen3", "clm", "AutoModelForCausalLM"),
         ("gpt2", "clm", "AutoModelForCausalLM"),
         ("bert", "mlm", "AutoModelForMaskedLM"), ("roberta", "mlm", "AutoModelForMaskedLM")] + \
        [(arch, "classify", "AutoModelForSequenceClassification") for arch in CLASSIFY]


def make_checkpoint(path, tokenizer, objective: str, arch: str, step: int = 3, **model):
    """A checkpoint file of a tiny `arch` model (2 layers x 64) whose every weight is random, not
    its initial value (biases and norms included): (path, the objective in eval mode)."""
    cfg = Config()
    cfg.model = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=2, n_head=4, n_embd=64,
                            **{**ARCHES[arch], **model})
    cfg.train.objective = objective
    if objective == "classify":
        cfg.obj.labels = LABELS
        for name, value in CLASSIFY[arch].items():
            setattr(cfg.obj, name, value)
    cfg.model = model_config_for(objective, cfg.model, cfg.obj)
    torch.manual_seed(0)
    built = build_objective(objective, cfg.model, tokenizer, cfg.obj)
    with torch.no_grad():
        for p in built.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"config": cfg.to_dict(), "objective": objective, "model": built.state_dict(),
                "tokenizer": bytes_to_tensor(tokenizer.model_bytes), "step": step}, str(path))
    return str(path), built.eval()


def padded_rows(vocab_size: int, lengths=(20, 13, 7)):
    """[CLS] text [SEP] [PAD]... rows: (ids (B, T), lengths (B,), attention_mask (B, T))."""
    lengths = torch.tensor(lengths)
    T = int(lengths.max())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(NUM_SPECIAL, vocab_size, (len(lengths), T), generator=generator)
    ids[:, 0] = CLS_ID
    ids[torch.arange(len(lengths)), lengths - 1] = SEP_ID
    real = torch.arange(T)[None, :] < lengths[:, None]
    return ids.masked_fill(~real, PAD_ID), lengths, real.long()


@torch.no_grad()
def minilm_logits(objective, name: str, ids, lengths):
    if name == "clm":
        return objective.backbone.logits(objective.backbone(ids))
    if name == "mlm":
        return objective.predict(ids)
    return objective.logits(ids, lengths)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """{(arch, objective): (folder, the objective that was exported)} for every case."""
    out = {}
    for arch, name, _ in CASES:
        run = tmp_path_factory.mktemp(f"{arch}-{name}")
        path, built = make_checkpoint(run / "ckpt-00000003.pt", tokenizer, name, arch)
        folder = str(tmp_path_factory.mktemp("exports") / f"{arch}-{name}")
        assert minilm.export(path, folder, format="hf") == folder
        out[arch, name] = folder, built
    return out


# ----------------------------------------------------------------------------- without transformers
@pytest.mark.parametrize("arch,name", [(arch, name) for arch, name, _ in CASES])
def test_round_trip_gives_the_same_tensors_and_logits(exported, arch, name, tokenizer):
    folder, built = exported[arch, name]
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"] or \
        {"README.md", "config.json", "model.safetensors"} <= set(os.listdir(folder))
    torch.manual_seed(123)   # another initialisation: every value must come from the folder
    rebuilt, imported = load_hf_module(folder)
    assert imported.arch == arch and imported.objective == name and imported.unused == []
    assert rebuilt.state_dict().keys() == built.state_dict().keys()
    for key, value in built.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    ids, lengths, _ = padded_rows(tokenizer.vocab_size)
    assert torch.equal(minilm_logits(rebuilt, name, ids, lengths), minilm_logits(built, name, ids, lengths))


def test_the_folder_holds_transformers_names_and_config(exported, tokenizer):
    folder, built = exported["llama", "clm"]
    tensors, metadata = load_safetensors(os.path.join(folder, "model.safetensors"))
    assert metadata == {"format": "pt"}
    C, hidden = 64, built.backbone.cfg.mlp_hidden
    qkv = built.state_dict()["backbone.blocks.0.attn.qkv.weight"]
    up = built.state_dict()["backbone.blocks.1.mlp.up.weight"]
    # minilm's fused q|k|v and gate|up rows, cut apart in that order
    assert torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], qkv[C:2 * C])
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.weight"], up[:hidden])
    assert torch.equal(tensors["model.layers.1.mlp.up_proj.weight"], up[hidden:])
    assert torch.equal(tensors["lm_head.weight"], built.state_dict()["backbone.lm_head.weight"])
    assert all(t.dtype == torch.float32 for t in tensors.values())
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, hidden, 2)
    assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"] is False
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 2, 3)
    assert config["vocab_size"] == tokenizer.vocab_size and config["max_position_embeddings"] == 32
    assert "LlamaForCausalLM" in open(os.path.join(folder, "README.md")).read()

    folder, built = exported["qwen3", "clm"]
    tensors, _ = load_safetensors(os.path.join(folder, "model.safetensors"))
    config = json.load(open(os.path.join(folder, "config.json")))
    # llama's names, plus QK-norm's two (D,) weights per layer; every layer attends to the whole window
    assert torch.equal(tensors["model.layers.1.self_attn.k_norm.weight"],
                       built.state_dict()["backbone.blocks.1.attn.k_norm.weight"]) and tensors[
        "model.layers.0.self_attn.q_norm.weight"].shape == (16,)
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["head_dim"] == 16 and config["use_sliding_window"] is False and "mlp_bias" not in config

    folder, built = exported["gpt2", "clm"]
    tensors, _ = load_safetensors(os.path.join(folder, "model.safetensors"))
    # GPT-2's Conv1D stores (in, out); the tied head is not stored (tie_word_embeddings)
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.weight"],
                       built.state_dict()["backbone.blocks.0.attn.qkv.weight"].t())
    assert "lm_head.weight" not in tensors and json.load(open(os.path.join(folder, "config.json")))["n_inner"] == 256

    folder, built = exported["roberta", "mlm"]
    tensors, _ = load_safetensors(os.path.join(folder, "model.safetensors"))
    config = json.load(open(os.path.join(folder, "config.json")))
    # RoBERTa numbers positions from pad_token_id + 1: zero rows before minilm's position 0
    offset = config["pad_token_id"] + 1
    table = tensors["roberta.embeddings.position_embeddings.weight"]
    assert config["max_position_embeddings"] == 32 + offset and table.shape[0] == 32 + offset
    assert torch.equal(table[offset:], built.state_dict()["backbone.pos_emb.weight"]) and not table[:offset].any()
    assert torch.equal(tensors["lm_head.bias"], built.state_dict()["head.bias"])

    folder, _ = exported["bert", "classify"]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"} and config["label2id"]["mixed"] == 2
    assert config["architectures"] == ["BertForSequenceClassification"] and config["type_vocab_size"] == 2


def test_token_rows_follow_a_foreign_tokenizer_both_ways():
    """A foreign tokenizer's id order: import takes rows[foreign_ids] (new rows where -1), export
    gives each foreign id the row of the minilm id its export_ids names, and the two undo each other."""
    foreign = torch.arange(10, 20).float()[:, None].repeat(1, 3)               # foreign id f's row: f + 10
    foreign_ids = torch.tensor([1, 0, 2, 5, 2, -1, 3, 4, 6, 7, 8, 9])            # 2 twice (bos and cls), one new
    generator = torch.Generator().manual_seed(0)
    ours = foreign_rows(foreign, foreign_ids, generator)
    assert torch.equal(ours[0], foreign[1]) and torch.equal(ours[4], foreign[2]) and torch.equal(ours[3], foreign[5])
    assert ours[5].abs().max() < 0.2 and ours[5].abs().max() > 0            # a new row, initialised as minilm does
    bias = foreign_rows(torch.arange(10).float(), foreign_ids, generator)
    assert bias[5] == 0 and bias[6] == 3
    export_ids = torch.tensor([1, 0, 2, 6, 7, 3, 8, 9, 10, 11])                  # <s> (foreign 2) from slot 2
    ours[4] += 100                                                               # the second <s> row differs...
    back = minilm_rows(ours, export_ids)
    assert torch.equal(back, foreign)                                            # ...and the named slot wins
    assert torch.equal(minilm_rows(ours, torch.cat([export_ids[:2], torch.tensor([4]), export_ids[3:]]))[2],
                       foreign[2] + 100)                                         # naming the other slot takes it
    with pytest.raises(UserError, match="maps no minilm id to its id 10"):
        minilm_rows(ours, torch.cat([export_ids, torch.tensor([-1])]))


def test_export_permutes_token_rows_back_to_foreign_ids(tokenizer, tmp_path):
    """hf_weights with foreign_ids: every tensor with a row per token (the table, a masked LM's
    output bias) comes out in foreign order, the others untouched, and reading it back restores them."""
    _, built = make_checkpoint(tmp_path / "ckpt-00000001.pt", tokenizer, "mlm", "roberta")
    V = tokenizer.vocab_size
    foreign_ids = torch.cat([torch.arange(V - 1, 0, -1), torch.tensor([0])])   # reversed: a bijection
    head = objective_class("mlm").hf_head("roberta")
    weights = built.state_dict()
    export_ids = torch.argsort(foreign_ids)                                   # the bijection's inverse
    tensors = hf_weights(weights, built.backbone.cfg, "roberta", head, export_ids, pad_id=1)
    assert torch.equal(tensors["roberta.embeddings.word_embeddings.weight"][foreign_ids],
                       weights["backbone.tok_emb.weight"])
    assert torch.equal(tensors["lm_head.bias"][foreign_ids], weights["head.bias"])
    renames = renames_for("roberta", 2, head)
    back = from_hf_state(tensors, renames, offset=2)
    assert torch.equal(back["backbone.pos_emb.weight"], weights["backbone.pos_emb.weight"])
    assert torch.equal(foreign_rows(back["head.bias"], foreign_ids, None), weights["head.bias"])


# ----------------------------------------------------------------------------- what has no counterpart
def test_arch_of_names_the_architecture_or_the_field_that_differs():
    for arch, values in ARCHES.items():
        assert arch_of(ModelConfig(**values)) == arch
    assert arch_of(ModelConfig(**{**ARCHES["llama"], "tie_embeddings": True, "norm_eps": 1e-5})) == "llama"
    with pytest.raises(UserError, match="its mlp is gelu where llama .the nearest. has swiglu; train with --arch llama"):
        arch_of(ModelConfig())                                  # minilm's default decoder
    assert arch_of(ModelConfig(**{**ARCHES["llama"], "qk_norm": True})) == "qwen3"   # QK-norm is all that differs
    with pytest.raises(UserError, match="its mlp is gelu where qwen3 .the nearest. has swiglu; train with --arch qwen3"):
        arch_of(ModelConfig(**{**ARCHES["llama"], "qk_norm": True, "mlp": "gelu"}))
    with pytest.raises(UserError, match="logit_softcap is 30.0, .*train with --logit_softcap 0 to export"):
        arch_of(ModelConfig(**{**ARCHES["qwen3"], "logit_softcap": 30.0}))
    with pytest.raises(UserError, match="its norm_placement is pre where bert .* has post"):
        arch_of(ModelConfig(**{**ARCHES["bert"], "norm_placement": "pre"}))
    with pytest.raises(UserError, match="factorized embeddings"):
        arch_of(ModelConfig(**{**ARCHES["bert"], "embedding_size": 16}))


def test_what_has_no_counterpart_is_one_line_saying_what_would_work(tokenizer, tmp_path):
    path, _ = make_checkpoint(tmp_path / "ckpt-00000001.pt", tokenizer, "clm", "bert")
    with pytest.raises(UserError, match="clm has no Hugging Face counterpart on a bert model .it has one on gpt2, "
                                        "llama, qwen3.; on bert, export a checkpoint of mlm, .*classify"):
        export_folder(path, str(tmp_path / "out"))
    # prefix_lm reads its prefix both ways, which no causal LM class does: clm's heads are not its
    with pytest.raises(UserError, match="prefix_lm has no Hugging Face counterpart on a llama model .it has one on no "
                                        "architecture.; on llama, export a checkpoint of clm, classify"):
        objective_class("prefix_lm").hf_head("llama")
    assert objective_class("wwm").hf_head("bert") == objective_class("mlm").hf_head("bert")
    run = tmp_path / "mean"
    run.mkdir()
    path, _ = make_checkpoint(run / "ckpt-00000001.pt", tokenizer, "classify", "bert")
    state = torch.load(path, weights_only=True)
    state["config"]["obj"]["pooling"] = "mean"
    torch.save(state, path)
    with pytest.raises(UserError, match="--pooling mean; transformers' BertForSequenceClassification reads with "
                                        "--pooling first --classifier_attention bidirectional --classifier_head pooler"):
        export_folder(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")          # refused before anything was written


def test_export_never_writes_over_a_run_or_a_users_files(exported, tokenizer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    path, _ = make_checkpoint(run / "ckpt-00000001.pt", tokenizer, "clm", "llama")
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="holds the checkpoint being exported"):
        export_folder(path, str(run))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds notes.txt, which is not an earlier export's file"):
        export_folder(path, str(other))
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        export_folder(path, str(tmp_path / "file"))
    assert (other / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    again = tmp_path / "again"
    export_folder(path, str(again))
    first = (again / "model.safetensors").read_bytes()
    export_folder(path, str(again))                      # an earlier export is replaced
    assert (again / "model.safetensors").read_bytes() == first


def test_command_line_format_hf(tokenizer, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_checkpoint(run / "ckpt-00000002.pt", tokenizer, "clm", "gpt2")
    code, out, err = run_main(main, ["safetensors_io", str(run), str(tmp_path / "folder"), "--format", "hf"])
    assert code == 0, err
    assert "wrote" in out and read_folder(str(tmp_path / "folder")).architecture == "GPT2LMHeadModel"
    code, out, err = run_main(main, ["safetensors_io", str(run), str(tmp_path / "x"), "--format=onnx"])
    assert code == 2 and "--format must be one of minilm, hf" in err


# ----------------------------------------------------------------------------- with transformers
@pytest.mark.parametrize("arch,name,auto", CASES)
def test_transformers_computes_minilms_logits(exported, arch, name, auto, tokenizer):
    transformers = pytest.importorskip("transformers")
    folder, built = exported[arch, name]
    theirs_model = getattr(transformers, auto).from_pretrained(folder).eval()
    ids, lengths, attention_mask = padded_rows(tokenizer.vocab_size)
    with torch.no_grad():
        if name == "classify":     # padded rows: the last-token heads find the last non-pad token
            theirs = theirs_model(input_ids=ids, attention_mask=attention_mask).logits
        else:                      # full rows (a masked LM's and a causal LM's logits at every position)
            ids = ids.masked_fill(ids == PAD_ID, NUM_SPECIAL)
            theirs = theirs_model(input_ids=ids).logits
    ours = minilm_logits(built, name, ids, lengths)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    if name == "classify":
        assert theirs_model.config.id2label == {0: "neg", 1: "pos", 2: "mixed"}


def test_the_exported_tokenizer_gives_minilms_ids(exported, tokenizer):
    transformers = pytest.importorskip("transformers")
    folder, _ = exported["gpt2", "clm"]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ["Hello, world!", "  two  spaces\tand a tab\n", "naïve café 東京 123456", "ends with <mask> typed"]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text


def test_classifier_heads_compute_what_their_hf_classes_do(exported, tokenizer):
    """Pinned by hand, for CI without transformers: pooler = BERT's tanh(dense(h[CLS])) then the
    linear layer; score = a bias-free linear layer on the last real token."""
    ids, lengths, _ = padded_rows(tokenizer.vocab_size)
    _, bert = exported["bert", "classify"]
    with torch.no_grad():
        hidden = bert.backbone(ids, mask=(torch.arange(ids.shape[1])[None] < lengths[:, None])[:, None, None, :])
        by_hand = bert.label_head(torch.tanh(bert.pooler(hidden[:, 0])))
        torch.testing.assert_close(bert.logits(ids, lengths), by_hand, atol=1e-6, rtol=0)
    _, llama = exported["llama", "classify"]
    assert llama.label_head.bias is None and llama.pooler is None
    with torch.no_grad():
        hidden = llama.backbone(ids)                                             # causal
        by_hand = hidden[torch.arange(3), lengths - 1] @ llama.label_head.weight.t()
        torch.testing.assert_close(llama.logits(ids, lengths), by_hand, atol=1e-6, rtol=0)
