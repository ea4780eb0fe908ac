"""Import from Hugging Face transformers' folders (minilm/hf_import.py) and `train.py --init_from FOLDER`.

With transformers (skipped without it): a model built from a random config and saved by
save_pretrained imports with equal logits, from model.safetensors or pytorch_model.bin. Without
it: config.json's settings minilm does not compute are one-line errors naming what is supported;
--init_from FOLDER trains the folder's own objective unless --objective says otherwise (issue 18's
trap stays fixed), a classifier's folder must name its objective, a shorter --seq_len keeps the
first rows of the position table, and the run's checkpoint exports back."""
from __future__ import annotations

import dataclasses

import json
import os
import shutil

import pytest
import torch

import minilm
from minilm.checkpoint import load_checkpoint
from minilm.errors import UserError
from minilm.hf_format import from_hf_config
from minilm.hf_import import load_hf_module, parent_checkpoint, read_folder
from tests.conftest import run_in_process
from tests.test_cli import assert_user_error
from tests.test_foreign_tokenizer import llama_folder, merges, roberta_folder  # noqa: F401  (fixtures)
from tests.test_hf_export import make_checkpoint, minilm_logits, padded_rows

pytestmark = pytest.mark.usefixtures("one_thread", "peak_flops_once")  # conftest.py

V = 300
RUN = ["--max_steps", "2", "--batch_size", "2", "--eval_every", "100", "--eval_batches", "1", "--log_every", "1",
       "--warmup_steps", "1", "--device", "cpu", "--threads", "1"]


def random_transformers_model(arch: str, head: str):
    """A transformers model of `arch` with `head` from a random config (2 layers x 64), every weight
    moved off its initial value (biases and norms too)."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    config = {"llama": lambda: transformers.LlamaConfig(max_position_embeddings=64, rope_theta=500.0, pad_token_id=0,
                                                        **sizes),
              "qwen3": lambda: transformers.Qwen3Config(max_position_embeddings=64, rope_theta=500.0, pad_token_id=0,
                                                        head_dim=16, num_key_value_heads=4, **sizes),
              "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                      n_inner=96, bos_token_id=2, eos_token_id=3, pad_token_id=0),
              "bert": lambda: transformers.BertConfig(max_position_embeddings=64, **sizes),
              "roberta": lambda: transformers.RobertaConfig(max_position_embeddings=66, **sizes)}[arch]()
    config.num_labels = 3
    name = {"llama": "Llama", "qwen3": "Qwen3", "gpt2": "GPT2", "bert": "Bert", "roberta": "Roberta"}[arch]
    cls = getattr(transformers, name + {"clm": ("LMHeadModel" if arch == "gpt2" else "ForCausalLM"),
                                        "mlm": "ForMaskedLM", "classify": "ForSequenceClassification"}[head])
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


IMPORTS = [("llama", "clm"), ("qwen3", "clm"), ("qwen3", "classify"), ("gpt2", "clm"), ("bert", "mlm"), ("roberta", "mlm"), ("bert", "classify"),
           ("roberta", "classify"), ("llama", "classify"), ("gpt2", "classify")]


@pytest.mark.parametrize("arch,head", IMPORTS)
def test_a_transformers_model_imports_with_equal_logits(arch, head, tmp_path):
    model = random_transformers_model(arch, head)
    model.save_pretrained(str(tmp_path))
    objective, imported = load_hf_module(str(tmp_path))   # loaded strictly: every tensor has its place
    assert (imported.arch, imported.objective, imported.tokenizer) == (arch, head, None)
    ids, lengths, attention_mask = padded_rows(V, (16, 11, 6))
    with torch.no_grad():
        if head == "classify":
            theirs = model(input_ids=ids, attention_mask=attention_mask).logits
        else:
            ids = ids.masked_fill(ids == 0, 200)   # no padding (RoBERTa's pad id 1 never appears either)
            theirs = model(input_ids=ids).logits
    torch.testing.assert_close(minilm_logits(objective, head, ids, lengths), theirs, atol=1e-5, rtol=0)


def test_pytorch_model_bin_imports_too(tmp_path):
    """An older folder: pytorch_model.bin (read with weights_only=True), BERT's gamma/beta names."""
    model = random_transformers_model("bert", "mlm")
    model.save_pretrained(str(tmp_path))
    state = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
             for name, t in model.state_dict().items()}
    torch.save(state, str(tmp_path / "pytorch_model.bin"))
    os.remove(tmp_path / "model.safetensors")
    objective, _ = load_hf_module(str(tmp_path))
    ids = torch.randint(10, V, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(objective.predict(ids), model(input_ids=ids).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- what minilm does not compute
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
         "rms_norm_eps": 1e-6, "rope_theta": 500.0}


def test_config_json_both_ways_and_what_it_refuses():
    arch, architecture, cfg = from_hf_config(LLAMA, "config.json")
    assert (arch, architecture) == ("llama", "LlamaForCausalLM")
    assert (cfg.n_embd, cfg.intermediate_size, cfg.rope_base, cfg.norm_eps, cfg.seq_len) == (64, 96, 500.0, 1e-6, 64)
    assert (cfg.mlp, cfg.norm, cfg.position, cfg.bias, cfg.tie_embeddings) == ("swiglu", "rmsnorm", "rope", False, False)
    # null is transformers' "the default": as many key/value heads as heads, head_dim = hidden / heads
    assert from_hf_config({**LLAMA, "num_key_value_heads": None, "head_dim": None}, "config.json")[2] == cfg
    qwen3 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    assert from_hf_config(qwen3, "config.json")[2] == dataclasses.replace(cfg, qk_norm=True)   # llama + QK-norm
    with pytest.raises(UserError, match="use_sliding_window is True; minilm's qwen3 has False .attention over the "
                                        "whole window."):
        from_hf_config({**qwen3, "use_sliding_window": True}, "config.json")
    refusals = [({"model_type": "mistral"}, "model_type 'mistral' has no counterpart in minilm; it imports llama, "
                                            "qwen3, gpt2, bert, roberta"),
                ({"num_key_value_heads": 2}, "grouped-query attention"),
                ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
                ({"hidden_act": "gelu"}, "hidden_act is 'gelu'; minilm's llama has 'silu'"),
                ({"architectures": ["LlamaForCausalLM", "X"]}, "architectures must name one class"),
                ({"hidden_size": "64"}, "hidden_size must be int"),
                ({"num_hidden_layers": None}, "config.json lacks 'num_hidden_layers', which a llama config must have")]
    for change, message in refusals:
        with pytest.raises(UserError, match=message.replace("(", ".").replace(")", ".")):
            from_hf_config({**LLAMA, **change}, "config.json")
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V, "n_embd": 64, "n_layer": 2,
            "n_head": 4, "n_positions": 64, "activation_function": "relu"}
    with pytest.raises(UserError, match="activation_function is 'relu'; minilm's gpt2 has 'gelu_new' or"):
        from_hf_config(gpt2, "config.json")


def test_a_class_without_a_minilm_head_or_weights_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "architectures": ["LlamaForQuestionAnswering"]}))
    with pytest.raises(UserError, match="LlamaForQuestionAnswering has no counterpart among minilm's heads; it "
                                        "imports LlamaForCausalLM, LlamaForSequenceClassification"):
        read_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(UserError, match="has config.json but no weights"):
        read_folder(str(tmp_path))


# ----------------------------------------------------------------------------- train.py --init_from FOLDER
@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Exported folders of tiny checkpoints: bert mlm, gpt2 clm, llama classify."""
    out = {}
    for arch, name in (("bert", "mlm"), ("gpt2", "clm"), ("llama", "classify")):
        run = tmp_path_factory.mktemp(f"run-{arch}")
        path, _ = make_checkpoint(run / "ckpt-00000003.pt", tokenizer, name, arch)
        out[name] = minilm.export(path, str(tmp_path_factory.mktemp("hf") / arch), format="hf")
    return out


def test_init_from_a_folder_trains_its_objective_and_exports_back(folders, corpus_dir, tmp_path):
    """No --objective: the folder's BertForMaskedLM trains mlm, as an mlm checkpoint would (issue
    18: never a causal LM on a masked LM's backbone), from exactly the folder's weights; the
    run's checkpoint exports back to a folder transformers' class reads."""
    out = tmp_path / "child"
    result = run_in_process("train.py", "--init_from", folders["mlm"], "--data", corpus_dir, "--out_dir", out,
                            "--lr", "1e-9", "--min_lr", "0", *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--init_from: training mlm, the objective of {folders['mlm']}" in result.stdout
    assert f"--init_from {folders['mlm']}: BertForMaskedLM (bert, 2 layers, 64 wide" in result.stdout
    child = load_checkpoint(str(out / "ckpt-00000002.pt"))
    assert child["objective"] == "mlm" and child["config"]["model"]["norm_placement"] == "post"
    assert child["parent"]["path"] == os.path.abspath(folders["mlm"])
    imported = read_folder(folders["mlm"])
    for key, value in imported.state_dict.items():   # lr 1e-9: two steps move them by ~1e-9
        assert torch.allclose(child["model"][key], value, atol=1e-6), key
    again = minilm.export(str(out), str(tmp_path / "again"), format="hf")
    back = read_folder(again)
    assert back.architecture == "BertForMaskedLM" and back.state_dict.keys() == imported.state_dict.keys()


def test_init_from_a_folder_with_another_objective_keeps_the_backbone(folders, corpus_dir, tmp_path):
    """--objective wwm from a masked LM's folder; a shorter --seq_len than a learned table's keeps
    its first rows (here GPT-2's, trained on by clm again)."""
    out = tmp_path / "gpt2"
    result = run_in_process("train.py", "--init_from", folders["clm"], "--data", corpus_dir, "--out_dir", out,
                            "--seq_len", "16", "--lr", "1e-9", "--min_lr", "0", *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    child = load_checkpoint(str(out / "ckpt-00000002.pt"))
    table = read_folder(folders["clm"]).state_dict["backbone.pos_emb.weight"]
    assert child["objective"] == "clm" and child["config"]["model"]["seq_len"] == 16
    assert torch.allclose(child["model"]["backbone.pos_emb.weight"], table[:16], atol=1e-6)
    result = run_in_process("train.py", "--init_from", folders["mlm"], "--objective", "wwm", "--data", corpus_dir,
                            "--out_dir", tmp_path / "wwm", *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "wwm" / "ckpt-00000002.pt"))["objective"] == "wwm"


def test_init_from_a_classifier_folder_must_name_its_objective(folders, corpus_dir, tmp_path):
    result = run_in_process("train.py", "--init_from", folders["classify"], "--data", corpus_dir, "--out_dir",
                            tmp_path / "c", *RUN)
    assert_user_error(result, f"--init_from {folders['classify']} is a classifier: pass --objective classify")


def test_init_from_a_folder_without_a_tokenizer_is_one_line(folders, corpus_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(folders["clm"], folder)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(folder / name)
    result = run_in_process("train.py", "--init_from", folder, "--data", corpus_dir, "--out_dir", tmp_path / "x", *RUN)
    assert_user_error(result, "has no tokenizer files")


# ----------------------------------------------------------------------------- a public model's tokenizer
@pytest.fixture(scope="module")
def roberta_download(tmp_path_factory, merges):
    """What a user downloads of a RoBERTa: a RobertaForMaskedLM (random config, tiny) saved by
    save_pretrained beside its byte-level BPE files, whose <mask> is its last id, not 4."""
    from tests.test_foreign_tokenizer import ROBERTA_CONFIG, ROBERTA_SPECIALS, bytelevel_folder
    transformers = pytest.importorskip("transformers")
    folder = bytelevel_folder(tmp_path_factory.mktemp("roberta-download"), merges, ROBERTA_SPECIALS, ["<mask>"],
                              ROBERTA_CONFIG)
    vocab_size = len(json.load(open(os.path.join(folder, "vocab.json"))))
    config = transformers.RobertaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=34,
                                        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.RobertaForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    return folder, model


def test_a_public_tokenizer_reorders_the_token_rows_both_ways(roberta_download, tmp_path):
    """minilm's id i is the folder's id foreign_ids[i]: its logits over minilm ids are transformers'
    over the foreign ids, and the export puts every row back where the folder had it."""
    folder, model = roberta_download
    objective, imported = load_hf_module(folder)
    tokenizer = imported.tokenizer
    foreign_ids = tokenizer.foreign_ids
    assert int(foreign_ids[4]) == len(json.load(open(os.path.join(folder, "vocab.json")))) - 1   # <mask>
    ids = torch.tensor([tokenizer.encode("The river runs by the garden, 42 times.")[:30]])
    mapped = foreign_ids >= 0
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([tokenizer.to_foreign(ids[0].tolist())])).logits
        ours = objective.predict(ids)
    torch.testing.assert_close(ours[..., mapped], theirs[..., foreign_ids[mapped]], atol=1e-5, rtol=0)
    # back out: the checkpoint of the imported model exports the folder's own tensors (the position
    # table's first pad_token_id + 1 rows, which no position reads, come back as zeros)
    path = str(tmp_path / "ckpt-00000000.pt")
    torch.save(parent_checkpoint(imported, folder), path)
    out = minilm.export(path, str(tmp_path / "again"), format="hf")
    from minilm.safetensors_io import load_safetensors
    again, original = load_safetensors(os.path.join(out, "model.safetensors"))[0], model.state_dict()
    assert set(again) == {k for k in original if not k.startswith("lm_head.decoder")}
    for name, tensor in again.items():
        expected = original[name][2:] if "position_embeddings" in name else original[name]
        assert torch.equal(tensor[2:] if "position_embeddings" in name else tensor, expected), name
    assert json.load(open(os.path.join(out, "config.json")))["pad_token_id"] == 1
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "merges.txt", "model.safetensors",
                                       "tokenizer_config.json", "vocab.json"]


def test_init_from_a_public_model_trains_with_its_tokenizer(roberta_download, corpus_dir, tmp_path):
    folder, _ = roberta_download
    out = tmp_path / "domain"
    result = run_in_process("train.py", "--init_from", folder, "--data", corpus_dir, "--out_dir", out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training mlm" in result.stdout
    child = load_checkpoint(str(out / "ckpt-00000002.pt"))
    assert child["config"]["model"]["vocab_size"] == len(read_folder(folder).tokenizer.foreign_ids)
    back = read_folder(minilm.export(str(out), str(tmp_path / "export"), format="hf"))
    assert back.architecture == "RobertaForMaskedLM" and torch.equal(back.tokenizer.foreign_ids,
                                                                     read_folder(folder).tokenizer.foreign_ids)


def test_a_foreign_tokenizers_model_round_trips_without_transformers(roberta_folder, tmp_path):
    """A minilm model trained with a public tokenizer (RoBERTa's byte-level BPE, ids reordered):
    the export writes the tokenizer's own files and the rows in its ids, the import reorders them
    back, so the tensors and logits are minilm's exactly."""
    from minilm.foreign_tokenizer import load_foreign_tokenizer
    tokenizer = load_foreign_tokenizer(roberta_folder)
    path, built = make_checkpoint(tmp_path / "ckpt-00000001.pt", tokenizer, "mlm", "roberta")
    folder = minilm.export(path, str(tmp_path / "export"), format="hf")
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(folder))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["vocab_size"] == tokenizer.foreign_vocab_size and config["pad_token_id"] == 1   # RoBERTa's <pad>
    from minilm.safetensors_io import load_safetensors
    table = load_safetensors(os.path.join(folder, "model.safetensors"))[0]["roberta.embeddings.word_embeddings.weight"]
    mask = int(tokenizer.foreign_ids[4])
    assert torch.equal(table[mask], built.state_dict()["backbone.tok_emb.weight"][4])   # <mask>'s row at its own id
    rebuilt, imported = load_hf_module(folder)
    foreign_ids = tokenizer.foreign_ids
    assert torch.equal(imported.tokenizer.foreign_ids, foreign_ids)
    # minilm id i comes back with the row of the slot that trains among those sharing its foreign id
    # (RoBERTa's <s> is bos 2 and cls 5: cls's row; </s> is eos 3 and sep 6: eos's row); ids the
    # foreign vocabulary lacks (-1) start afresh
    kept = foreign_ids >= 0
    source = tokenizer.export_ids[foreign_ids.clamp(min=0)]
    assert source[2] == 5 and source[5] == 5 and source[3] == 3 and source[6] == 3
    assert bool((source[kept] == torch.arange(len(source))[kept]).sum() > 100)
    for key, value in built.state_dict().items():
        got = rebuilt.state_dict()[key]
        if key in ("backbone.tok_emb.weight", "head.bias"):
            value, got = value[source][kept], got[kept]
        assert torch.equal(got, value), key
    ids = torch.tensor([tokenizer.encode("The river runs by the garden.")])
    assert not bool(ids.lt(7).any())         # ordinary pieces: their rows are their own
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.predict(ids)[..., kept], built.predict(ids)[..., source[kept]],
                                   atol=1e-6, rtol=0)


def test_a_llama_download_with_its_sentencepiece_model(llama_folder, tmp_path):
    """A Llama's own sentencepiece tokenizer (<unk> <s> </s> at 0-2, no <pad>): minilm's logits over
    the reordered ids are transformers' over the model's ids, and the export gives back its tensors."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "llama"
    shutil.copytree(llama_folder, folder)
    import sentencepiece as spm
    size = spm.SentencePieceProcessor(model_proto=(folder / "tokenizer.model").read_bytes()).get_piece_size()
    config = transformers.LlamaConfig(vocab_size=size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=32, bos_token_id=1,
                                      eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder))
    objective, imported = load_hf_module(str(folder))
    foreign_ids = imported.tokenizer.foreign_ids
    assert int(foreign_ids[0]) == -1 and int(foreign_ids[2]) == 1 and int(foreign_ids[3]) == 2   # no <pad>; <s>, </s>
    ids = torch.tensor([imported.tokenizer.encode("The river runs by the garden, 42 times.")[:30]])
    kept = foreign_ids >= 0
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([imported.tokenizer.to_foreign(ids[0].tolist())])).logits
        ours = objective.backbone.logits(objective.backbone(ids))
    torch.testing.assert_close(ours[..., kept], theirs[..., foreign_ids[kept]], atol=1e-5, rtol=0)
    path = str(tmp_path / "ckpt-00000000.pt")
    torch.save(parent_checkpoint(imported, str(folder)), path)
    out = minilm.export(path, str(tmp_path / "again"), format="hf")
    from minilm.safetensors_io import load_safetensors
    again, original = load_safetensors(os.path.join(out, "model.safetensors"))[0], model.state_dict()
    assert again.keys() == original.keys()
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (None, 1, 2)
    assert transformers.AutoModelForCausalLM.from_pretrained(out) is not None
