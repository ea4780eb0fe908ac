"""The Python API (minilm/api.py): minilm.load from a run folder or a file, and each method on the
checkpoints that support it: generate equals sample.py for the same flags, score's
log-probabilities are the chain rule of the model's own predictions, fill is the softmax at each
mask, embed does not depend on the batch, and a method a checkpoint cannot serve says in one line
which method fits. Tiny untrained models, saved in-process as train.py saves them."""
from __future__ import annotations

import os

import pytest
import torch

import minilm
from minilm.checkpoint import bytes_to_tensor, checkpoint_path, save_checkpoint
from minilm.config import Config, ModelConfig
from minilm.errors import UserError
from minilm.objectives import build_objective, model_config_for
from minilm.tokenizer import EOS_ID, MASK_ID
from tests.conftest import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def save_tiny(path, name: str, tokenizer, seed: int = 0, step: int = 0) -> str:
    """A freshly initialised model of objective `name` (seeded), saved as train.py saves it."""
    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = model_config_for(name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1,
                                                   n_head=2, n_embd=32))
    cfg.train.objective = name
    if name == "classify":
        cfg.obj.labels = '["food", "space", "sport"]'
    objective = build_objective(name, cfg.model, tokenizer, cfg.obj)
    save_checkpoint(str(path), {"config": cfg.to_dict(), "objective": name, "model": objective.state_dict(),
                                "step": step, "tokenizer": bytes_to_tensor(tokenizer.model_bytes)})
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """{objective name: checkpoint file} for one model of each kind."""
    folder = tmp_path_factory.mktemp("api")
    return {name: save_tiny(folder / f"{name}.pt", name, tokenizer)
            for name in ("clm", "prefix_lm", "mlm", "rtd", "t5", "simcse", "classify", "plm", "rtd+plm", "mlm+rtd")}


def load_on_cpu(path):
    return minilm.load(path, device="cpu")


# ----------------------------------------------------------------------------- load
def test_load_takes_a_run_folders_newest_checkpoint_or_the_file_named(tokenizer, tmp_path):
    older = save_tiny(checkpoint_path(str(tmp_path), 1), "clm", tokenizer, seed=1, step=1)
    newer = save_tiny(checkpoint_path(str(tmp_path), 2), "clm", tokenizer, seed=2, step=2)
    weights = {path: torch.load(path, weights_only=True)["model"] for path in (older, newer)}
    for path, expected in ((str(tmp_path), newer), (older, older), (newer, newer)):
        model = load_on_cpu(path)
        assert (model.name, model.kind, model.path) == ("clm", "decoder", path)
        for key, tensor in model.objective.state_dict().items():
            assert torch.equal(tensor, weights[expected][key]), (path, key)
    with pytest.raises(UserError, match="no checkpoint at"):
        load_on_cpu(os.path.join(tmp_path, "missing.pt"))


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("name", ["clm", "prefix_lm"])
def test_generate_is_reproducible_by_seed_and_equals_sample_py(name, checkpoints):
    model = load_on_cpu(checkpoints[name])
    flags = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, num_samples=3)
    first, again, other = (model.generate("The cat", seed=seed, **flags) for seed in (7, 7, 8))
    assert first == again and first != other
    assert len(first) == 3 and all(text.startswith("The cat") for text in first)
    result = run_in_process("sample.py", "--ckpt", checkpoints[name], "--prompt", "The cat", "--seed", 7,
                            "--device", "cpu", *[f"--{k}={v}" for k, v in flags.items()])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"--- sample {i + 1}\n{text}\n" for i, text in enumerate(first))


# ----------------------------------------------------------------------------- score
def test_score_log_probabilities_sum_to_the_sequence_log_likelihood(checkpoints, tokenizer):
    """score's values are log p(token | tokens before), framed after <eos>: their sum equals the
    chain rule computed token by token, each from a fresh pass over the tokens before it only."""
    model = load_on_cpu(checkpoints["clm"])
    text = "The chef cooked the meal."
    scored = model.score(text)
    ids = [EOS_ID] + tokenizer.encode(text)
    assert [piece for piece, _ in scored] == [tokenizer.id_to_piece(t) for t in ids[1:]]
    backbone = model.objective.backbone
    with torch.no_grad():
        direct = sum(backbone.logits(backbone(torch.tensor([ids[:t]]))[0, -1]).log_softmax(-1)[ids[t]].item()
                     for t in range(1, len(ids)))
    assert sum(value for _, value in scored) == pytest.approx(direct, abs=1e-4)
    assert all(value < 0 for _, value in scored)


def test_score_on_rtd_is_the_replaced_probability(checkpoints, tokenizer):
    model = load_on_cpu(checkpoints["rtd"])
    text = "The chef cooked the meal."
    ids = [EOS_ID] + tokenizer.encode(text)
    expected = model.objective.replaced_probabilities(torch.tensor([ids]))[0, 1:]
    scored = model.score(text)
    assert [piece for piece, _ in scored] == [tokenizer.id_to_piece(t) for t in ids[1:]]
    torch.testing.assert_close(torch.tensor([value for _, value in scored]), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- fill
def test_fill_gives_the_softmax_top_k_at_each_mask_and_the_filled_text(checkpoints, tokenizer):
    model = load_on_cpu(checkpoints["mlm"])
    filled = model.fill("The value <mask> of a <mask>.", top_k=3)
    ids = [EOS_ID] + tokenizer.encode("The value") + [MASK_ID] + tokenizer.encode(" of a") + [MASK_ID] + \
        tokenizer.encode(".")
    with torch.no_grad():
        probs = model.objective.predict(torch.tensor([ids]))[0].softmax(-1)      # (T, V)
    where = [i for i, t in enumerate(ids) if t == MASK_ID]
    assert len(filled.candidates) == 2
    for position, candidates in zip(where, filled.candidates):
        top = probs[position].topk(3)
        assert [c.token_id for c in candidates] == top.indices.tolist()
        assert [c.text for c in candidates] == [tokenizer.decode([t], specials=True) for t in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([c.probability for c in candidates]), top.values)
    best = iter(c[0].token_id for c in filled.candidates)
    assert filled.text == tokenizer.decode([next(best) if t == MASK_ID else t for t in ids[1:]], specials=True)


# ----------------------------------------------------------------------------- embed
@pytest.mark.parametrize("name", ["mlm", "t5"])
def test_embed_is_the_mean_over_real_positions_whatever_the_batch(name, checkpoints, tokenizer):
    model = load_on_cpu(checkpoints[name])
    short, longer = "A cat.", "A much longer sentence about a dog that ran across the field."
    alone = model.embed([short])
    batched = model.embed([short, longer])
    assert alone.shape == (1, model.config.model.n_embd) and alone.dtype == torch.float32
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)
    # the pooling: a plain mean of the final hidden states of the framed text, nothing else
    ids = tokenizer.encode(short)
    backbone = model.objective.backbone
    with torch.no_grad():
        hidden = backbone.encode(torch.tensor([ids + [EOS_ID]])) if name == "t5" else \
            backbone(torch.tensor([[EOS_ID] + ids]), mask=None)
    torch.testing.assert_close(alone[0], hidden[0].mean(0), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the wrong method
@pytest.mark.parametrize("name, call, message", [
    ("clm", lambda m: m.fill("a <mask>"), r"fill\(\) needs a masked-LM checkpoint .*decoder \(clm\): use generate"),
    ("clm", lambda m: m.embed(["a"]), r"embed\(\) needs an encoder checkpoint .*decoder \(clm\): use generate"),
    ("clm", lambda m: m.infill("a <extra_id_0>"), r"infill\(\) needs an encoder-decoder .*: use generate"),
    ("prefix_lm", lambda m: m.score("a"), r"score\(\) needs a decoder .*prefix_decoder \(prefix_lm\): use generate"),
    ("mlm", lambda m: m.generate("a"), r"generate\(\) needs a decoder .*encoder \(mlm\): use fill\(\"text with"),
    ("mlm", lambda m: m.score("a"), r"score\(\) needs .*replaced-token detection .*: use fill\("),
    ("rtd", lambda m: m.fill("a <mask>"), r"fill\(\) needs a masked-LM .*encoder \(rtd\): use score\("),
    ("t5", lambda m: m.generate("a"), r"generate\(\) needs a decoder .*seq2seq \(t5\): use infill\("),
    ("t5", lambda m: m.fill("a <mask>"), r"fill\(\) needs .*seq2seq \(t5\): use infill\("),
])
def test_a_method_the_checkpoint_cannot_serve_names_the_one_that_fits(name, call, message, checkpoints):
    model = load_on_cpu(checkpoints[name])
    with pytest.raises(UserError, match=message) as err:
        call(model)
    assert "\n" not in str(err.value)


def test_the_objectives_a_method_needs_are_read_from_their_declared_capabilities(checkpoints, monkeypatch):
    """A registered objective that declares fill is named wherever fill's needs are worded, the
    Python API's and sample.py's --fill alike; the others are not."""
    from minilm.api import needs
    from minilm.objectives import OBJECTIVES, Objective, objective_class
    from tests.conftest import load_script

    class Filler(Objective):
        name, model_kind, capabilities = "toy_filler", "encoder", frozenset({"fill", "embed"})
    monkeypatch.setitem(OBJECTIVES, Filler.name, Filler)
    assert "toy_filler" in needs("fill") and "toy_filler" in needs("embed")
    assert "toy_filler" not in needs("generate") + needs("score") + needs("infill") + needs("classify")
    with pytest.raises(UserError, match=r"fill\(\) needs a masked-LM checkpoint \(--objective mlm.* toy_filler\)"):
        load_on_cpu(checkpoints["clm"]).fill("a <mask>")
    sample_script = load_script("sample.py")
    with pytest.raises(UserError, match=r"--fill needs a masked-LM checkpoint \(--objective .*toy_filler\)"):
        sample_script.check_flags_fit(dict(sample_script.DEFAULTS, fill="a <mask>"), objective_class("clm"), "out")
    sample_script.check_flags_fit(dict(sample_script.DEFAULTS, fill="a <mask>"), Filler, "out")   # fits


def test_a_combination_serves_what_its_parts_declare_each_method_from_its_part(checkpoints):
    from minilm.api import part_serving, served
    model = load_on_cpu(checkpoints["mlm+rtd"])
    mlm, rtd = model.objective.parts["mlm"], model.objective.parts["rtd"]
    assert model.objective.capabilities == mlm.capabilities | rtd.capabilities == {"fill", "score", "embed"}
    assert served(model.objective) == ["fill", "score", "embed"]
    assert part_serving(model.objective, "fill") is mlm and part_serving(model.objective, "score") is rtd
    # score() is the rtd part's P(replaced), read through the shared backbone
    ids = torch.tensor([[EOS_ID] + model.tokenizer.encode("The chef cooked the meal.")])
    expected = rtd.replaced_probabilities(ids)[0, 1:].tolist()
    assert [value for _, value in model.score("The chef cooked the meal.")] == pytest.approx(expected)

def test_bad_arguments_are_one_line_errors_worded_for_python(checkpoints, tokenizer):
    decoder, encoder = load_on_cpu(checkpoints["clm"]), load_on_cpu(checkpoints["mlm"])
    with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\], got 0$"):
        decoder.generate("a", top_p=0)
    with pytest.raises(UserError, match=r'^fill\(\) needs at least one <mask> in the text, e\.g\. fill\("The dog'):
        encoder.fill("no mask")
    long = " ".join(["word"] * 39)
    with pytest.raises(UserError, match=rf"^embed\(\) text 2 is {len(tokenizer.encode(long)) + 1} tokens, longer "
                                        r"than the model's context window \(32\); shorten it$"):
        encoder.embed(["short", long])


# ----------------------------------------------------------------------------- wrong arguments
# (checkpoint, the call, the argument its error must name first, what was given as the error shows it)
BAD_CALLS = [
    ("clm", lambda m: m.generate(None), "prompt", "got None"),
    ("clm", lambda m: m.generate(b"The cat"), "prompt", "got b'The cat' (bytes): decode it first"),
    ("clm", lambda m: m.generate(["The cat"]), "prompt", "got ['The cat'] (list)"),
    ("clm", lambda m: m.generate("a", max_new_tokens=2.5), "max_new_tokens", "an integer >= 0, got 2.5 (float)"),
    ("clm", lambda m: m.generate("a", max_new_tokens=True), "max_new_tokens", "got True (bool)"),
    ("clm", lambda m: m.generate("a", max_new_tokens=-1), "max_new_tokens", ">= 0, got -1"),
    ("clm", lambda m: m.generate("a", temperature="1"), "temperature", "a number >= 0, got '1' (str)"),
    ("clm", lambda m: m.generate("a", temperature=-0.5), "temperature", ">= 0, got -0.5"),
    ("clm", lambda m: m.generate("a", temperature=float("nan")), "temperature", "finite number >= 0, got nan"),
    ("clm", lambda m: m.generate("a", temperature=float("inf")), "temperature", "finite number >= 0, got inf"),
    ("clm", lambda m: m.generate("a", top_k=1.5), "top_k", "an integer >= 0, got 1.5 (float)"),
    ("clm", lambda m: m.generate("a", top_k=-1), "top_k", ">= 0, got -1"),
    ("clm", lambda m: m.generate("a", top_p=1.5), "top_p", "in (0, 1], got 1.5"),
    ("clm", lambda m: m.generate("a", top_p=None), "top_p", "got None"),
    ("clm", lambda m: m.generate("a", num_samples=2.0), "num_samples", "an integer >= 1, got 2.0 (float)"),
    ("clm", lambda m: m.generate("a", num_samples=0), "num_samples", ">= 1, got 0"),
    ("clm", lambda m: m.generate("a", seed=1.5), "seed", "an integer in [0, 2**64), got 1.5 (float)"),
    ("clm", lambda m: m.generate("a", seed=-1), "seed", "in [0, 2**64), got -1"),
    ("clm", lambda m: m.generate("a", use_cache="no"), "use_cache", "True or False, got 'no' (str)"),
    ("clm", lambda m: m.score(None), "text", "got None"),
    ("clm", lambda m: m.score(["a"]), "text", "got ['a'] (list)"),
    ("rtd", lambda m: m.score(b"abc"), "text", "(bytes): decode it first"),
    ("mlm", lambda m: m.fill(None), "text", "got None"),
    ("mlm", lambda m: m.fill(b"a <mask>"), "text", "got b'a <mask>' (bytes): decode it first"),
    ("mlm", lambda m: m.fill("a <mask>", top_k=True), "top_k", "an integer >= 1, got True (bool)"),
    ("mlm", lambda m: m.fill("a <mask>", top_k=2.0), "top_k", "got 2.0 (float)"),
    ("mlm", lambda m: m.fill("a <mask>", top_k=0), "top_k", ">= 1, got 0"),
    ("mlm", lambda m: m.embed(None), "texts", "a str or a list of str, got None"),
    ("mlm", lambda m: m.embed([None]), "texts[0]", "must be a str, got None"),
    ("mlm", lambda m: m.embed(["a", 3]), "texts[1]", "must be a str, got 3 (int)"),
    ("mlm", lambda m: m.embed([]), "texts", "an empty list"),
    ("mlm", lambda m: m.embed(["a", " "]), "texts[1]", "is empty (' ')"),
    ("mlm", lambda m: m.embed(b"abc"), "texts", "(bytes): decode it first"),
    ("simcse", lambda m: m.embed([""]), "texts[0]", "is empty ('')"),
    ("mlm", lambda m: m.embed(["a"], batch_size=0), "batch_size", ">= 1, got 0"),
    ("mlm", lambda m: m.embed(["a"], batch_size=2.0), "batch_size", "an integer >= 1, got 2.0 (float)"),
    ("classify", lambda m: m.classify(None), "texts", "got None"),
    ("classify", lambda m: m.classify(""), "texts", "is empty ('')"),
    ("classify", lambda m: m.classify([None]), "texts[0]", "got None"),
    ("classify", lambda m: m.classify(["a"], batch_size=False), "batch_size", "got False (bool)"),
    ("t5", lambda m: m.infill(None), "text", "got None"),
    ("t5", lambda m: m.infill("a <extra_id_0>", beam_size=2.0), "beam_size", "an integer >= 1, got 2.0 (float)"),
    ("t5", lambda m: m.infill("a <extra_id_0>", beam_size=2, length_penalty=1100), "length_penalty",
     "in [-5, 5], got 1100"),
    ("t5", lambda m: m.infill("a <extra_id_0>", length_penalty="1"), "length_penalty", "got '1' (str)"),
    ("t5", lambda m: m.infill("a <extra_id_0>", max_new_tokens=None), "max_new_tokens", "got None"),
    ("t5", lambda m: m.infill("a <extra_id_0>", top_p=0), "top_p", "in (0, 1], got 0"),
    ("clm", lambda m: m.logits(None), "text_or_ids", "a str (a text) or a list of token ids in [0, 1024), got None"),
    ("clm", lambda m: m.logits(b"The cat"), "text_or_ids", "(bytes): decode it first"),
    ("clm", lambda m: m.logits([5, 2.0]), "text_or_ids[1]", "a token id (an int), got 2.0 (float)"),
    ("clm", lambda m: m.logits([5, True]), "text_or_ids[1]", "got True (bool)"),
    ("clm", lambda m: m.logits([5, 1024]), "text_or_ids[1]", "is 1024, not a token id of this model (its vocabulary "
                                                              "is 0 .. 1023)"),
    ("clm", lambda m: m.logits([-1]), "text_or_ids[0]", "is -1"),
    ("clm", lambda m: m.logits([]), "text_or_ids", "is empty"),
    ("clm", lambda m: m.logits(list(range(40))), "text_or_ids", "is 40 tokens, longer than the model's context window"),
    ("clm", lambda m: m.logits(" ".join(["word"] * 40)), "text_or_ids with its framing", "longer than the model's"),
    ("clm", lambda m: m.hidden(torch.zeros(1, 3, dtype=torch.long)), "text_or_ids", "shape (1, 3): give one sequence"),
    ("clm", lambda m: m.hidden(torch.zeros(3)), "text_or_ids", "got a torch.float32 tensor"),
    ("clm", lambda m: m.hidden("a", layer=2), "layer", "must be in [-2, 1], got 2"),
    ("clm", lambda m: m.hidden("a", layer=-3), "layer", "in [-2, 1], got -3"),
    ("clm", lambda m: m.hidden("a", layer=1.0), "layer", "got 1.0 (float)"),
    ("clm", lambda m: m.input_ids(None), "text", "got None"),
    ("t5", lambda m: m.logits("a", target=[1.5]), "target[0]", "got 1.5 (float)"),
    ("t5", lambda m: m.logits("a", target=list(range(32))), "target", "is 32 tokens; with the decoder's start id"),
    ("t5", lambda m: m.logits("a <extra_id_100>"), "text_or_ids", "has <extra_id_100>, which is no sentinel"),
    ("t5", lambda m: m.logits("a", target="<extra_id_100>"), "target", "has <extra_id_100>, which is no sentinel"),
    (None, lambda path: minilm.load(path, device=None), "device", "got None"),
    (None, lambda path: minilm.load(path, device=3), "device", "got 3 (int)"),
    (None, lambda path: minilm.load(path, device="gpu"), "unknown device", "'gpu'"),
    (None, lambda path: minilm.load(None), "path", "a checkpoint file or a run folder (a str or os.PathLike), got None"),
    (None, lambda path: minilm.api.load(path, device="cpu", log="x"), "log", "got 'x' (str)"),
    (None, lambda path: minilm.export(None, "x.safetensors"), "checkpoint", "got None"),
    (None, lambda path: minilm.export(path, None), "out_path", "got None"),
    (None, lambda path: minilm.export(path, "x.safetensors", log=3), "log", "got 3"),
    (None, lambda path: minilm.api.cosine_similarities([[1.0]]), "vectors", "an (N, C) tensor"),
]


@pytest.mark.parametrize("name, call, argument, shown", BAD_CALLS, ids=[f"{i}-{row[2]}" for i, row in
                                                                        enumerate(BAD_CALLS)])
def test_a_wrong_argument_is_one_line_naming_it_what_was_given_and_what_fits(name, call, argument, shown,
                                                                             checkpoints):
    target = checkpoints["clm"] if name is None else load_on_cpu(checkpoints[name])
    with pytest.raises(UserError) as err:
        call(target)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(argument + " "), message
    assert shown in message, message


def test_good_arguments_of_every_accepted_form_still_work(checkpoints, tmp_path):
    """A path object, a torch.device, a tuple of texts, an int where a float goes, a 0 top_k."""
    import pathlib
    decoder = minilm.load(pathlib.Path(checkpoints["clm"]), device=torch.device("cpu"))
    assert decoder.path == checkpoints["clm"]
    assert len(decoder.generate("a", max_new_tokens=2, temperature=1, top_p=1, top_k=0, num_samples=2)) == 2
    encoder = load_on_cpu(checkpoints["mlm"])
    assert encoder.embed(("one text", "another")).shape == (2, 32)
    assert encoder.embed("one text").shape == (1, 32)
    out = minilm.export(pathlib.Path(checkpoints["clm"]), tmp_path / "x.safetensors")
    assert os.path.exists(out)


def test_zero_new_tokens_give_the_text_itself(checkpoints):
    """generate: the prompt; infill: the text without its sentinels, once, however many beams."""
    assert load_on_cpu(checkpoints["clm"]).generate("The cat", max_new_tokens=0, num_samples=2) == ["The cat"] * 2
    t5 = load_on_cpu(checkpoints["t5"])
    assert t5.infill("The cat <extra_id_0> on the mat.", max_new_tokens=0, beam_size=3, num_samples=3) == \
        ["The cat on the mat."]


def test_sample_py_infill_beams_with_zero_new_tokens_print_one_filling_scored_zero(checkpoints):
    """It printed three fillings scored nan, -inf and -inf."""
    result = run_in_process("sample.py", "--ckpt", checkpoints["t5"], "--infill", "The cat <extra_id_0> on the mat.",
                            "--beam_size", 3, "--max_new_tokens", 0, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "--- filling 1 (score 0.000)\nThe cat on the mat.\n"


@pytest.mark.parametrize("name, call", [
    ("clm", lambda m: m.generate("The cat", max_new_tokens=3, temperature=0.0)),
    ("clm", lambda m: m.generate("The cat", max_new_tokens=3, temperature=1.0)),
    ("t5", lambda m: m.infill("The cat <extra_id_0>.", max_new_tokens=3, beam_size=2)),
    ("mlm", lambda m: m.fill("The cat <mask>.")),
    ("clm", lambda m: m.score("The cat.")),
    ("rtd", lambda m: m.score("The cat.")),
    ("mlm", lambda m: m.embed(["The cat."])),
    ("simcse", lambda m: m.embed(["The cat."])),
    ("classify", lambda m: m.classify(["The cat."])),
])
def test_nan_weights_are_a_one_line_error_not_nan_answers(name, call, checkpoints):
    model = load_on_cpu(checkpoints[name])
    with torch.no_grad():
        for p in model.objective.parameters():
            p.fill_(float("nan"))
    with pytest.raises(UserError, match=r"^the model produced NaN or infinite \w+: its weights are damaged"):
        call(model)


# ----------------------------------------------------------------------------- batches
TEXTS = ["A cat.", "A much longer sentence about a dog that ran across the field.", "Rain.", "Two words",
         "The chef cooked the meal in the small kitchen."]


@pytest.mark.parametrize("name", ["mlm", "t5", "simcse", "classify"])
def test_small_batches_give_what_one_batch_gives(name, checkpoints):
    model = load_on_cpu(checkpoints[name])
    if name == "classify":
        one, batched = model.classify(TEXTS), model.classify(TEXTS, batch_size=2)
        assert [[label for label, _ in row] for row in batched] == [[label for label, _ in row] for row in one]
        torch.testing.assert_close(torch.tensor([[p for _, p in row] for row in batched]),
                                   torch.tensor([[p for _, p in row] for row in one]), rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(model.embed(TEXTS, batch_size=2), model.embed(TEXTS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlm", "t5", "simcse", "classify"])
def test_a_long_list_goes_through_the_model_in_batches(name, checkpoints):
    """150 texts: forward passes of at most 64 (the default) or batch_size texts, not one of 150."""
    model = load_on_cpu(checkpoints[name])
    network = model.objective.backbone.encoder if name == "t5" else model.objective.backbone
    sizes = []
    hook = network.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]),
                                             with_kwargs=True)
    try:
        texts = [f"text number {i}" for i in range(150)]
        method = model.classify if name == "classify" else model.embed
        assert len(method(texts)) == 150
        assert sizes == [64, 64, 22]
        sizes.clear()
        assert len(method(texts[:7], batch_size=3)) == 7
        assert sizes == [3, 3, 1]
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- sample.py: hints and --embed
def sample(*args):
    return run_in_process("sample.py", *args, "--device", "cpu")


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("name, flags, offers, never", [
    ("classify", ["--embed", "a", "b"], ['--classify "'], ["--prompt"]),          # said "use --prompt"
    ("classify", ["--score", "a"], ['--classify "'], ["--prompt"]),
    ("plm", ["--score", "a"], ['--embed "'], ["--prompt"]),
    ("rtd+plm", ["--fill", "a <mask>"], ['--score "', "--embed"], ["--prompt"]),   # said "no masked-LM head" only
    ("rtd+plm", ["--prompt", "a"], ['--score "', "--embed"], []),
    ("mlm+rtd", ["--infill", "a <extra_id_0>"], ['--fill "', "--score", "--embed"], ["--prompt"]),
    ("rtd", ["--classify", "a"], ['--score "', "--embed"], ["--prompt"]),
    ("t5", ["--score", "a"], ['--infill "', "--embed"], ["--prompt"]),
    ("clm", ["--embed", "a"], ['--prompt "'], ["--embed"]),
])
def test_each_hint_offers_what_the_checkpoint_serves(name, flags, offers, never, checkpoints):
    line = error_line(sample("--ckpt", checkpoints[name], *flags))
    assert f"({name})" in line and "needs" in line
    tail = line.split(f"({name})", 1)[1]   # the hint, after what the checkpoint holds
    for fragment in offers:
        assert fragment in tail, (fragment, line)
    for fragment in never:
        assert fragment not in tail, (fragment, line)


def test_score_serves_the_detector_of_a_multi_task_objective(checkpoints, tokenizer):
    """rtd+plm has a replaced-token detector (its rtd part): --score said it had none."""
    model = load_on_cpu(checkpoints["rtd+plm"])
    text = "The chef cooked the meal."
    ids = [EOS_ID] + tokenizer.encode(text)
    with torch.no_grad():
        expected = model.objective.parts["rtd"].replaced_probabilities(torch.tensor([ids]))[0, 1:]
    torch.testing.assert_close(torch.tensor([value for _, value in model.score(text)]), expected)
    result = sample("--ckpt", checkpoints["rtd+plm"], "--score", text)
    assert result.returncode == 0, result.stderr
    assert [float(line.split()[0]) for line in result.stdout.splitlines()] == \
        [round(p, 4) for p in expected.tolist()]


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0, got -1"),
    (["--top_p", "2"], "--top_p must be in (0, 1], got 2"),
    (["--length_penalty", "1100"], "--length_penalty must be in [-5, 5], got 1100"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--beam_size", "2"], "--beam_size is for --infill"),
])
def test_embed_refuses_bad_flags_like_the_other_modes(flags, message, checkpoints):
    assert message in error_line(sample("--ckpt", checkpoints["mlm"], "--embed", "a", "b", *flags))


def test_a_missing_checkpoint_is_named_in_the_api_s_words(tmp_path):
    """minilm.load's message names the call, not sample.py's --ckpt flag."""
    with pytest.raises(UserError) as err:
        minilm.load(str(tmp_path / "missing.pt"))
    assert "minilm.load()" in str(err.value) and "--ckpt" not in str(err.value)


# ----------------------------------------------------------------------------- an export loads
EXPORT_CALLS = [
    ("clm", lambda m: m.generate("The cat", max_new_tokens=6, temperature=1.0, seed=3, num_samples=2)),
    ("clm", lambda m: m.score("The cat sat.")),
    ("mlm", lambda m: m.fill("The cat <mask> on the mat.", top_k=3)),
    ("mlm", lambda m: m.embed(["The cat.", "A dog ran across the field."])),
    ("classify", lambda m: m.classify(["The cat.", "A dog ran across the field."])),
    ("t5", lambda m: m.infill("The cat <extra_id_0>.", max_new_tokens=4, temperature=1.0, seed=2)),
]


@pytest.mark.parametrize("name, call", EXPORT_CALLS, ids=[f"{name}-{i}" for i, (name, _) in enumerate(EXPORT_CALLS)])
def test_an_export_loads_and_serves_what_its_checkpoint_serves(name, call, checkpoints, tmp_path):
    """minilm.load(minilm's own .safetensors export) is the checkpoint's model: the same objective,
    weights (t5's shared table still one tensor) and tokenizer, so every method answers the same."""
    from_checkpoint = load_on_cpu(checkpoints[name])
    exported = minilm.export(checkpoints[name], str(tmp_path / "model.safetensors"), log=lambda _: None)
    from_export = load_on_cpu(exported)
    assert (from_export.name, from_export.kind, from_export.path) == (name, from_checkpoint.kind, exported)
    assert from_export.tokenizer.model_bytes == from_checkpoint.tokenizer.model_bytes
    expected = from_checkpoint.objective.state_dict()
    assert from_export.objective.state_dict().keys() == expected.keys()
    for key, tensor in from_export.objective.state_dict().items():
        assert torch.equal(tensor, expected[key]), key
    if name == "t5":
        backbone = from_export.objective.backbone
        assert backbone.encoder.tok_emb.weight is backbone.decoder.tok_emb.weight
    answer, again = call(from_export), call(from_checkpoint)
    if isinstance(answer, torch.Tensor):
        assert torch.equal(answer, again)
    else:
        assert answer == again


def test_an_export_is_read_with_the_checks_of_a_checkpoint(checkpoints, tmp_path):
    """A safetensors file that is no minilm export, and an export whose config asks for more than
    its weights hold, are one-line errors naming the file; a run folder still means its checkpoints."""
    import json as json_module
    from minilm.safetensors_io import load_safetensors, save_safetensors
    foreign = str(tmp_path / "foreign.safetensors")
    save_safetensors({"weight": torch.zeros(2, 2)}, foreign, {"format": "pt"})
    with pytest.raises(UserError, match=r"^\S*foreign.safetensors is a safetensors file but not a minilm export"):
        load_on_cpu(foreign)
    exported = minilm.export(checkpoints["clm"], str(tmp_path / "model.safetensors"), log=lambda _: None)
    weights, metadata = load_safetensors(exported)
    config = json_module.loads(metadata["config"])
    config["model"]["n_layer"] = 2   # the file holds one block's weights
    crafted = str(tmp_path / "crafted.safetensors")
    save_safetensors(weights, crafted, dict(metadata, config=json_module.dumps(config)))
    with pytest.raises(UserError, match=r"crafted.safetensors") as err:
        load_on_cpu(crafted)
    assert "\n" not in str(err.value)
    save_safetensors(weights, crafted, dict(metadata, tokenizer="not base64!"))
    with pytest.raises(UserError, match=r"crafted.safetensors: its metadata's config, tokenizer or step does not"):
        load_on_cpu(crafted)


# ----------------------------------------------------------------------------- logits and hidden states
def forward_loss_and_logits_loss(model, generator):
    """(the objective's own forward loss on a batch of one row it made, the same loss computed
    from Model.logits of that row's ids): equal when logits() computes what forward computes."""
    import torch.nn.functional as F
    from minilm.objectives import window_length_for
    objective = model.objective
    name = model.name
    window = window_length_for(name, model.config.model, model.config.obj)
    raw = torch.randint(7 + 110, model.tokenizer.vocab_size, (1, window), generator=generator)
    if name == "prefix_lm":   # a prefix of one token: the causal reading logits() does
        batch = objective.make_batch(raw, generator)
        batch["prefix_lengths"] = torch.ones(1, dtype=torch.long)
        batch["labels"] = raw[:, 1:]
        batch["counts"] = {"targets": torch.tensor(raw.shape[1] - 1)}
    else:
        batch = objective.make_batch(raw, generator)
    with torch.no_grad():
        loss, _ = objective(batch)
    ids = batch["input_ids"][0]
    if name == "t5":   # the decoder reads its start id, then the target: the labels but the last
        logits = model.logits(ids, target=batch["decoder_input_ids"][0, 1:])
        assert torch.equal(batch["decoder_input_ids"][0, 0], torch.tensor(objective.decoder_start_id))
        return loss, F.cross_entropy(logits, batch["labels"][0])
    logits = model.logits(ids.tolist())
    if name == "mlm":
        return loss, F.cross_entropy(logits[batch["positions"]], batch["targets"])
    return loss, F.cross_entropy(logits, batch["labels"][0])


@pytest.mark.parametrize("name", ["clm", "prefix_lm", "mlm", "t5"])
def test_logits_are_what_the_objective_s_own_forward_computes(name, checkpoints):
    """The loss of the objective's forward on a batch it made (masks, spans, shifted labels as in
    training) equals the cross-entropy of Model.logits on that batch's ids, to 1e-5."""
    model = load_on_cpu(checkpoints[name])
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, from_logits = forward_loss_and_logits_loss(model, generator)
        torch.testing.assert_close(from_logits, loss, rtol=1e-5, atol=1e-5)


def test_logits_of_a_text_are_those_of_its_framed_ids(checkpoints, tokenizer):
    """A text reads as input_ids(text) says (after <eos>; a masked LM's <mask> by id; t5's encoder
    input with <eos> and its sentinels by id), and a decoder's row t predicts the text's token t:
    score()'s log-probabilities are the log-softmax of logits at the text's tokens."""
    decoder = load_on_cpu(checkpoints["clm"])
    text = "The chef cooked the meal."
    ids = decoder.input_ids(text)
    assert ids == [EOS_ID] + tokenizer.encode(text)
    logits = decoder.logits(text)
    assert logits.shape == (len(ids), tokenizer.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, decoder.logits(torch.tensor(ids)))
    chain = logits[:-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(chain, torch.tensor([value for _, value in decoder.score(text)]), rtol=1e-5, atol=1e-5)
    masked = load_on_cpu(checkpoints["mlm"])
    assert masked.input_ids("The <mask> sat.") == [EOS_ID] + tokenizer.encode("The") + [MASK_ID] + \
        tokenizer.encode(" sat.")
    t5 = load_on_cpu(checkpoints["t5"])
    from minilm.tokenizer import SENTINEL_IDS
    assert t5.input_ids("The cat <extra_id_0> mat.") == tokenizer.encode("The cat") + [SENTINEL_IDS[0]] + \
        tokenizer.encode(" mat.") + [EOS_ID]
    target = "<extra_id_0> sat on the"
    torch.testing.assert_close(t5.logits("The cat <extra_id_0> mat.", target=target),
                               t5.logits(t5.input_ids("The cat <extra_id_0> mat."),
                                         target=[SENTINEL_IDS[0]] + tokenizer.encode(" sat on the")))
    assert t5.logits("The cat <extra_id_0> mat.").shape == (1, tokenizer.vocab_size)   # the start id alone


def hand_hidden_states(backbone, ids: torch.Tensor, mask) -> list[torch.Tensor]:
    """The embeddings' output, then each block's, the last through the final norm: by hand."""
    x = backbone.embed(ids)
    states = [x]
    for block in backbone.blocks:
        x = block(x, mask=mask, rotary=backbone.rotary)
        states.append(x)
    states[-1] = backbone.norm(x)
    return states


@pytest.mark.parametrize("name, causal", [("clm", True), ("mlm", False), ("classify", True), ("classify", False)])
def test_hidden_gives_every_layer_the_last_as_the_backbone_s_output(name, causal, tokenizer, tmp_path):
    """Two blocks, by hand; under the mask the objective reads with (a classifier's
    --classifier_attention among them)."""
    from minilm.model import CAUSAL
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = model_config_for(name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=2, n_head=2,
                                                   n_embd=32))
    cfg.train.objective = name
    if name == "classify":
        cfg.obj.labels = '["food", "space"]'
        cfg.obj.classifier_attention = "causal" if causal else "bidirectional"
    objective = build_objective(name, cfg.model, tokenizer, cfg.obj)
    path = str(tmp_path / "two_layers.pt")
    save_checkpoint(path, {"config": cfg.to_dict(), "objective": name, "model": objective.state_dict(), "step": 0,
                           "tokenizer": bytes_to_tensor(tokenizer.model_bytes)})
    model = load_on_cpu(path)
    ids = model.input_ids("The cat sat on the mat.")
    states = model.hidden(ids)
    assert states.shape == (3, len(ids), 32) and states.dtype == torch.float32
    backbone = model.objective.backbone
    with torch.no_grad():
        expected = hand_hidden_states(backbone, torch.tensor([ids]), CAUSAL if causal else None)
        torch.testing.assert_close(states[-1], backbone(torch.tensor([ids]), mask=CAUSAL if causal else None)[0])
    for layer, state in enumerate(expected):
        torch.testing.assert_close(states[layer], state[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.hidden(ids, layer=layer), states[layer])
    torch.testing.assert_close(model.hidden(ids, layer=-1), states[-1])
    # position t of a decoder reads positions up to t only: changing the tokens after t changes
    # nothing before it; an encoder's every position reads the whole text
    changed = ids[:4] + [(token + 1) % tokenizer.vocab_size for token in ids[4:]]
    other = model.hidden(changed)
    assert torch.equal(other[:, :4], states[:, :4]) == causal
    assert not torch.equal(other[1:, 4:], states[1:, 4:])


def test_an_encoder_decoder_s_hidden_states_are_its_encoder_s(checkpoints):
    model = load_on_cpu(checkpoints["t5"])
    ids = model.input_ids("The cat <extra_id_0> mat.")
    with torch.no_grad():
        expected = model.objective.backbone.encode(torch.tensor([ids]))[0]
    torch.testing.assert_close(model.hidden(ids, layer=-1), expected)


def test_sample_py_samples_from_an_export_as_from_its_checkpoint(checkpoints, tmp_path):
    exported = minilm.export(checkpoints["clm"], str(tmp_path / "model.safetensors"), log=lambda _: None)
    outputs = [run_in_process("sample.py", "--ckpt", path, "--prompt", "The cat", "--seed", 5, "--max_new_tokens", 6,
                              "--device", "cpu") for path in (checkpoints["clm"], exported)]
    assert all(result.returncode == 0 for result in outputs), outputs[1].stderr
    assert outputs[0].stdout == outputs[1].stdout and outputs[0].stdout.startswith("--- sample 1\nThe cat")


def test_a_checkpoint_without_an_lm_head_says_what_it_serves_instead(checkpoints):
    for name, offers in (("rtd", "use score("), ("classify", "use classify("),
                         ("simcse", "it has no masked-LM head, detector or decoder: embed texts with embed(")):
        model = load_on_cpu(checkpoints[name])
        with pytest.raises(UserError, match=r"^logits\(\) needs a checkpoint with an LM head") as err:
            model.logits("The cat.")
        assert f"({name}): {offers}" in str(err.value) and "--objective clm, " in str(err.value)
        assert model.hidden("The cat.").shape[0] == 2   # every checkpoint has hidden states
    with pytest.raises(UserError, match=r"^target is the text an encoder-decoder's decoder reads; .*leave target out$"):
        load_on_cpu(checkpoints["clm"]).logits("The cat.", target="sat")


def test_logits_and_hidden_states_are_transformers_on_the_same_llama_weights(tokenizer, tmp_path):
    """A SwiGLU decoder (RMSNorm, rotary, no biases, untied head) is Llama: with its weights put in
    a LlamaForCausalLM by hand, logits() and hidden() equal transformers' logits and
    output_hidden_states (the embeddings, each block, the last after the final norm) to 1e-5."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = model_config_for("clm", ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=2, n_head=2,
                                                    n_embd=32, mlp="swiglu", tie_embeddings=False, norm_eps=1e-6))
    objective = build_objective("clm", cfg.model, tokenizer, cfg.obj)
    with torch.no_grad():
        for p in objective.parameters():   # norms away from 1, so that a misplaced norm shows
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "llama.pt")
    save_checkpoint(path, {"config": cfg.to_dict(), "objective": "clm", "model": objective.state_dict(), "step": 0,
                           "tokenizer": bytes_to_tensor(tokenizer.model_bytes)})
    model = load_on_cpu(path)
    backbone = model.objective.backbone
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=cfg.model.mlp_hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
        rope_theta=cfg.model.rope_base, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)).eval()
    weights = {"model.embed_tokens.weight": backbone.tok_emb.weight, "model.norm.weight": backbone.norm.weight,
               "lm_head.weight": backbone.lm_head.weight}
    for i, block in enumerate(backbone.blocks):
        layer = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.chunk(3)
        gate, up = block.mlp.up.weight.chunk(2)
        weights.update({layer + "self_attn.q_proj.weight": q, layer + "self_attn.k_proj.weight": k,
                        layer + "self_attn.v_proj.weight": v, layer + "self_attn.o_proj.weight": block.attn.proj.weight,
                        layer + "mlp.gate_proj.weight": gate, layer + "mlp.up_proj.weight": up,
                        layer + "mlp.down_proj.weight": block.mlp.down.weight,
                        layer + "input_layernorm.weight": block.norm1.weight,
                        layer + "post_attention_layernorm.weight": block.norm2.weight})
    llama.load_state_dict(weights, strict=True)
    ids = model.input_ids("The cat sat on the mat.")
    with torch.no_grad():
        out = llama(torch.tensor([ids]), output_hidden_states=True)
    torch.testing.assert_close(model.logits(ids), out.logits[0], rtol=1e-5, atol=1e-5)
    states = model.hidden(ids)
    assert len(out.hidden_states) == states.shape[0] == 3
    for layer, state in enumerate(out.hidden_states):
        torch.testing.assert_close(states[layer], state[0], rtol=1e-5, atol=1e-5)
