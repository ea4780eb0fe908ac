"""sample.py end to end on the checkpoints the new objectives write: a tiny T5 memorises one
sentence under span corruption and `sample.py --infill` restores the words hidden from it
(greedy, beam search, sampling), from a checkpoint file; a prefix-LM checkpoint continues
`--prompt` with its prompt read in both directions."""
from __future__ import annotations

import pytest
import torch

from minilm.checkpoint import bytes_to_tensor, save_checkpoint
from minilm.config import Config, ModelConfig
from minilm.masking import noise_span_counts, noise_span_output_lengths, noise_span_window
from minilm.objectives import build_objective, model_config_for
from minilm.tokenizer import EOS_ID
from tests.conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

MEAN_SPAN = 8.0
SENTENCE = "The old miller carried seven sacks of grain across the narrow bridge before dawn."


def train_to_memorise(name: str, tokenizer, ids: list[int], steps: int, seq_len: int, options=None, **model):
    """A tiny model of objective `name` trained on one window (`ids`, 32 copies a step, fresh
    corruption or split each step); returns (config, objective, first loss, last loss)."""
    threads = torch.get_num_threads()   # module fixtures run before the one_thread fixture
    torch.set_num_threads(1)
    try:
        return _train_to_memorise(name, tokenizer, ids, steps, seq_len, options, **model)
    finally:
        torch.set_num_threads(threads)


def _train_to_memorise(name, tokenizer, ids, steps, seq_len, options, **model):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model = model_config_for(name, ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=seq_len, n_layer=2,
                                                   n_head=4, n_embd=64, **model))
    cfg.train.objective = name
    for option, value in (options or {}).items():
        setattr(cfg.obj, option, value)
    objective = build_objective(name, cfg.model, tokenizer, cfg.obj)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    raw = torch.tensor([ids] * 32)
    losses = []
    for _ in range(steps):
        loss, _sums = objective(objective.make_batch(raw, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return cfg, objective.eval(), losses[0], losses[-1]


def save_for_sample(path, cfg, objective, tokenizer) -> str:
    """The parts of a train.py checkpoint that sample.py reads."""
    save_checkpoint(str(path), {"config": cfg.to_dict(), "objective": cfg.train.objective,
                                "model": objective.state_dict(), "step": 0,
                                "tokenizer": bytes_to_tensor(tokenizer.model_bytes)})
    return str(path)


def hidden_end(tokenizer, ids: list[int], n_noise: int) -> str:
    """The sentence as an --infill text whose last n_noise tokens are hidden behind <extra_id_0>:
    with one span per window, T5's noise law always hides the end of the window (it lays out
    non-noise first and ends in noise: masking.noise_span_mask). A space before the hidden piece
    stays outside the sentinel when the piece starts a word, as --infill reads it."""
    cut = len(ids) - n_noise
    starts_word = bool(tokenizer.word_starts(torch.tensor(ids))[cut])
    return tokenizer.decode(ids[:cut]).rstrip() + (" " if starts_word else "") + "<extra_id_0>"


@pytest.fixture(scope="module")
def memorised_t5(tokenizer, tmp_path_factory):
    ids = tokenizer.encode(SENTENCE)     # the window; corruption appends the <eos>, as --infill does
    # the encoder input length whose raw window is exactly the sentence (not every length is one)
    # one noise span a window (a mean span above the noise count): a tiny model learns to fill
    # that in 200 steps, while two spans anywhere in the window take it thousands
    seq_len = noise_span_output_lengths(len(ids), mean_noise_span_length=MEAN_SPAN)[0]
    assert noise_span_window(seq_len, mean_noise_span_length=MEAN_SPAN)[0] == len(ids), "pick a sentence a token longer"
    cfg, objective, first, last = train_to_memorise("t5", tokenizer, ids, steps=200, seq_len=seq_len,
                                                    options={"mean_noise_span_length": MEAN_SPAN},
                                                    n_decoder_layer=2)
    path = save_for_sample(tmp_path_factory.mktemp("t5") / "ckpt.pt", cfg, objective, tokenizer)
    return path, ids, first, last


def test_a_tiny_t5_memorises_a_sentence_under_span_corruption(memorised_t5):
    _path, _ids, first, last = memorised_t5
    assert last < 0.1 * first, (first, last)   # far below its start (about ln V)


def test_infill_restores_the_hidden_words(memorised_t5, tokenizer, capsys):
    """Greedy, beam search and sampling at a low temperature all print the sentence back, with
    the hidden words in place of the sentinel, from the checkpoint file."""
    path, ids, _first, _last = memorised_t5
    n_noise, spans = noise_span_counts(len(ids), mean_noise_span_length=MEAN_SPAN)
    assert spans == 1
    text = hidden_end(tokenizer, ids, n_noise)
    assert text.endswith("<extra_id_0>") and "dawn" not in text     # the last word and a half are hidden
    sample = load_script("sample.py")
    for flags in (["--temperature", "0"], ["--beam_size", "3", "--num_samples", "1"],
                  ["--temperature", "0.1", "--num_samples", "2", "--seed", "3"]):
        sample.main(["--ckpt", path, "--infill", text, "--max_new_tokens", "8", *flags])
        out = capsys.readouterr().out
        fillings = [line for line in out.splitlines() if not line.startswith("---")]
        assert fillings and all(f == SENTENCE for f in fillings), (flags, out)


def test_a_t5_checkpoint_refuses_fill_and_prompt(memorised_t5, capsys):
    from minilm.errors import UserError
    path = memorised_t5[0]
    sample = load_script("sample.py")
    with pytest.raises(UserError, match="--infill"):
        sample.main(["--ckpt", path, "--fill", "The <mask> miller."])
    with pytest.raises(UserError, match="--infill"):
        sample.main(["--ckpt", path, "--prompt", "The old"])


def test_prompt_on_a_prefix_lm_checkpoint_continues_the_text(tokenizer, tmp_path, capsys):
    """A prefix LM that memorised the sentence (prefix = its start, read both ways) continues a
    prompt of its first words with the rest of it."""
    ids = [EOS_ID] + tokenizer.encode(SENTENCE)
    cfg, objective, first, last = train_to_memorise("prefix_lm", tokenizer, ids + [EOS_ID], steps=150,
                                                    seq_len=len(ids) + 1)
    assert last < 0.1 * first, (first, last)
    path = save_for_sample(tmp_path / "ckpt.pt", cfg, objective, tokenizer)
    prompt = tokenizer.decode(ids[1:5])
    sample = load_script("sample.py")
    sample.main(["--ckpt", path, "--prompt", prompt, "--temperature", "0", "--num_samples", "1",
                 "--max_new_tokens", str(len(ids))])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "--- sample 1" and out[1] == SENTENCE, out
