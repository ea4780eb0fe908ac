"""Generating text: sampling from a decoder (temperature, top-k, top-p (nucleus), with a KV cache),
prefix-LM continuation, and greedy / sampled / beam-search decoding for encoder-decoders, all three
built on one step function (seq2seq_step; the section "encoder-decoders" below).

top-k keeps exactly k tokens, the k largest logits; among tied logits at the boundary the ones
torch.topk returns are kept, so the kept set never grows past k (a threshold `logits >= kth`
would keep every tie).
top-p keeps the smallest set of most-probable tokens whose total probability reaches p: tokens
are sorted by probability and a token is kept when the mass *before* it is still below p, so the
token that crosses p is included and the set is never empty (the most probable token is always
kept). Both act after temperature scaling; when both are given, top-k applies first.
"""
from __future__ import annotations

from typing import Callable

import torch

from minilm.errors import UserError
from minilm.model import (CAUSAL, EncoderDecoder, KVCache, Transformer, decoding_mask, padding_mask,
                          prefix_mask)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> the same with -inf outside the kept set."""
    if top_k and top_k < logits.shape[-1]:
        kept = torch.topk(logits, top_k, dim=-1).indices
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        # exclusive cumsum (shifted right), not cumsum - probs: the subtraction rounds, and at a p
        # exactly on a boundary it could keep one token past the smallest set reaching p
        cumsum = probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cumsum[..., :1]), cumsum[..., :-1]], dim=-1)
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def check_finite_logits(logits: torch.Tensor) -> None:
    """One-line UserError when a model's logits hold NaN or inf: its weights are damaged, and
    sampling would fail inside torch.multinomial, or greedy pick garbage (argmax of NaN)."""
    if not torch.isfinite(logits).all():
        raise UserError("the model produced NaN or infinite logits: its weights are damaged (NaN or inf); "
                        "load an earlier checkpoint or retrain")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 means greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True, warn: Callable[[str], None] | None = None,
             prompt_is_prefix: bool = False) -> torch.Tensor:
    """prompt (B, T0) -> (B, T0 + max_new_tokens), from a decoder-only model.

    prompt_is_prefix: the model is a prefix LM (model_kind "prefix_decoder"): the prompt's
    positions attend to each other in both directions, as in training, and every new token
    causally. With the cache that is two plain calls: the prompt in one go with mask=None (all of
    it sees all of it), then one token at a time with mask=None (one new token sees everything
    cached). Without the cache, each step recomputes with prefix_mask.

    Context window: the model sees at most seq_len tokens. A longer prompt keeps its last
    seq_len tokens, and once the text outgrows the window every new token is predicted from the
    last seq_len tokens (recomputed without the cache, since the cached keys' positions would no
    longer match; for a prefix LM, the prompt tokens still in the window stay the prefix). `warn`
    is called once when that happens.
    """
    was_training = model.training
    model.eval()
    window = model.cfg.seq_len
    tokens = prompt
    prompt_len = prompt.shape[1]
    warned = False

    def note_overflow():
        nonlocal warned
        if warn is not None and not warned:
            warn(f"prompt + generation is longer than the model's context window ({window} tokens); "
                 f"each new token sees only the last {window}")
        warned = True

    if tokens.shape[1] > window:
        note_overflow()
    cache = None
    dtype = model.tok_emb.weight.dtype
    if use_cache:
        cache = KVCache(model.cfg, tokens.shape[0], tokens.device, dtype)
    for _ in range(max_new_tokens):
        if tokens.shape[1] > window:
            cache = None  # from here on, a sliding window without a cache
        if cache is not None:
            new = tokens[:, cache.length:]     # the whole prompt first, then one token at a time
            if prompt_is_prefix:
                mask = None                    # the prompt sees itself both ways; one new token sees all
            else:
                mask = decoding_mask(new.shape[1], cache.length, device=new.device) if cache.length else CAUSAL
            hidden = model(new, cache=cache, mask=mask)
        else:
            if tokens.shape[1] > window:
                note_overflow()
            visible = tokens[:, -window:]
            mask = CAUSAL
            if prompt_is_prefix:  # the prompt tokens still inside the window are the prefix
                prefix_len = max(0, prompt_len - (tokens.shape[1] - visible.shape[1]))
                mask = prefix_mask(torch.tensor([prefix_len], device=tokens.device), visible.shape[1])
            hidden = model(visible, mask=mask)
        logits = model.logits(hidden[:, -1])
        check_finite_logits(logits)
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    model.train(was_training)
    return tokens


# ----------------------------------------------------------------------------- encoder-decoders
# An encoder-decoder (minilm.model.EncoderDecoder) decodes in three ways, greedy, sampling and
# beam search, all driven by one step function, seq2seq_step: the decoder tokens so far in, the
# next token's logits out. The encoder runs once per example (encode_inputs); beams and multiple
# samples share that encoding: decoder rows b*copies .. b*copies+copies-1 read its row b.


def seq2seq_step(model: EncoderDecoder, tokens: torch.Tensor, encoder_output: torch.Tensor,
                 encoder_mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
    """The decoder's next-token logits: tokens (N, t) -> (N, V) float32.

    tokens are every decoder token so far (the start token first). With a cache only those it does
    not hold yet are fed (the first call feeds the start token and computes the cross-attention
    keys/values of `encoder_output` once; later calls feed one token, mask None). Without a cache
    the whole prefix is recomputed under the causal mask: the same logits, slower.
    """
    if cache is None:
        hidden = model.decode(tokens, encoder_output, encoder_mask, mask=CAUSAL)
    else:
        new = tokens[:, cache.length:]
        mask = decoding_mask(new.shape[1], cache.length, device=new.device) if cache.length else CAUSAL
        hidden = model.decode(new, encoder_output, encoder_mask, mask=mask, cache=cache)
    return model.logits(hidden[:, -1]).float()


class Seq2SeqSteps:
    """One decode's state between steps: the encoder's output (B, S, C), its mask and the decoder's
    KV cache over N = B * copies rows (copies: beams or samples per example).

    step(tokens) -> (N, V) logits (seq2seq_step); reorder(index) keeps rows `index` of the cache
    (beam search: each surviving beam takes its parent's keys/values). Reordering never moves a
    beam to another example, so the encoder's output and its cross-attention keys/values, one row per
    example, are never reordered.
    """

    def __init__(self, model: EncoderDecoder, encoder_output, encoder_mask, use_cache: bool, max_len: int, rows: int):
        # rows: decoder rows, a whole multiple of encoder_output's (the beams or samples of each example)
        self.model, self.encoder_output, self.encoder_mask = model, encoder_output, encoder_mask
        self.cache = None
        if use_cache:
            self.cache = KVCache(model.decoder.cfg, rows, encoder_output.device, encoder_output.dtype, max_len=max_len)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return seq2seq_step(self.model, tokens, self.encoder_output, self.encoder_mask, self.cache)

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index, cross_too=False)   # a beam never leaves its example: same encoder_output


def encode_inputs(model: EncoderDecoder, input_ids: torch.Tensor, input_lengths: torch.Tensor | None):
    """Run the encoder once: input_ids (B, S), right-padded to S when input_lengths (B,) is given
    -> encoder_output (B, S, C) and its padding mask (B, 1, 1, S) or None. It is not repeated for
    the beams or samples: decoder rows b*copies .. b*copies+copies-1 all read its row b
    (model.attention, grouped query rows)."""
    mask = None if input_lengths is None else padding_mask(input_lengths.to(input_ids.device), input_ids.shape[1])
    return model.encode(input_ids, mask), mask


def check_decoder_length(model: EncoderDecoder, max_new_tokens: int) -> None:
    # the decoder is fed the start token and every generated token but the last: max_new_tokens
    # positions, 0 .. max_new_tokens - 1, each below its seq_len
    if max_new_tokens > model.decoder.cfg.seq_len:
        raise UserError(f"max_new_tokens {max_new_tokens} is more than the decoder's context window "
                        f"({model.decoder.cfg.seq_len}); ask for at most that many")


def sample_loop(step: Callable[[torch.Tensor], torch.Tensor], n_rows: int, max_new_tokens: int, *,
                start_id: int, eos_id: int, pad_id: int, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled decoding with a step function (tokens (N, t) -> (N, V)
    logits) -> (N, max_new_tokens) new tokens. A row stops at its first eos (kept); after it, the
    row holds pad_id. Every step draws for every row, so the generator's state advances the same
    way whatever the step function computes (cache or not)."""
    tokens = torch.full((n_rows, 1), start_id, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = step(tokens)
        check_finite_logits(logits)
        next_token = sample_next(logits, temperature, top_k, top_p, generator)
        next_token = next_token.masked_fill(finished, pad_id)
        finished |= next_token == eos_id
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if finished.all():
            break
    out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out[:, :tokens.shape[1] - 1] = tokens[:, 1:]
    return out


@torch.no_grad()
def generate_seq2seq(model: EncoderDecoder, input_ids: torch.Tensor, max_new_tokens: int, *, start_id: int,
                     eos_id: int, pad_id: int | None = None, input_lengths: torch.Tensor | None = None,
                     num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Greedy (temperature 0) or sampled decoding: input_ids (B, S) -> (B, num_samples,
    max_new_tokens) decoder tokens after the start token.

    input_lengths (B,): the rows are right-padded and row b's input is its first input_lengths[b]
    tokens (the encoder and the cross-attention then ignore the padding); None: no padding.
    The decoder starts from start_id (T5: the pad id). A row ends at its first eos_id (included);
    the rest of it is pad_id (eos_id when None). The encoder runs once; the num_samples samples of
    an example share its encoding.
    """
    check_decoder_length(model, max_new_tokens)
    was_training = model.training
    model.eval()
    encoder_output, encoder_mask = encode_inputs(model, input_ids, input_lengths)
    rows = input_ids.shape[0] * num_samples
    steps = Seq2SeqSteps(model, encoder_output, encoder_mask, use_cache, max_len=max(1, max_new_tokens), rows=rows)
    out = sample_loop(steps.step, rows, max_new_tokens, start_id=start_id, eos_id=eos_id,
                      pad_id=eos_id if pad_id is None else pad_id, temperature=temperature, top_k=top_k,
                      top_p=top_p, generator=generator, device=input_ids.device)
    model.train(was_training)
    return out.view(input_ids.shape[0], num_samples, max_new_tokens)


# ----------------------------------------------------------------------------- beam search
# Conventions (fairseq's SequenceGenerator; Hugging Face's BeamSearchScorer follows the same plan):
#   * a hypothesis' score is sum of log-probabilities / length ** length_penalty, where length is
#     the number of generated tokens including the final eos (not the start token): fairseq's
#     `eos_scores /= (step + 1) ** len_penalty`. length_penalty 0 ranks by the plain sum, which
#     favours short outputs (every token adds a log-probability <= 0); 1 ranks by the mean per
#     token; larger values favour longer outputs still.
#   * each step every row of beams takes the 2K best (beam, token) extensions by sum of
#     log-probabilities; those ending in eos among the first K become finished hypotheses, and the
#     best K that do not end in eos are the beams of the next step (so K beams always run).
#   * a row keeps its K best finished hypotheses. early_stopping=True (fairseq; HF's
#     early_stopping=True): the row is done as soon as it holds K finished hypotheses.
#     early_stopping=False: the row is done only when no running beam can still reach a score
#     above its worst kept hypothesis (HF's early_stopping="never": log-probabilities only
#     lower a sum, so the best a beam can reach is its sum now divided by the most favourable
#     length, max_new_tokens when length_penalty > 0, the next step's length otherwise).
#   * at max_new_tokens the rows not done also consider their running beams (unfinished, no eos),
#     scored at length max_new_tokens. max_new_tokens 0 leaves one hypothesis, the empty one: its
#     sum of no log-probabilities is 0, and so is its score (any other beam scores -inf: none).
#   * length_penalty lies in LENGTH_PENALTY_RANGE: length ** length_penalty stays a float32-sized
#     number for any decoder window, where 1100 overflowed and a large one ranks every beam at 0.
LENGTH_PENALTY_RANGE = "[-5, 5]"


def check_length_penalty(length_penalty: float, name: str = "length_penalty") -> None:
    """One-line UserError for a length_penalty outside LENGTH_PENALTY_RANGE (or not a number)."""
    from minilm.config import check_value
    if not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool):
        raise UserError(f"{name} must be a number in {LENGTH_PENALTY_RANGE}, got {length_penalty!r}")
    try:
        check_value(name, length_penalty, within=LENGTH_PENALTY_RANGE)
    except UserError as err:
        raise UserError(str(err).removeprefix("--")) from None


def beam_loop(step: Callable[[torch.Tensor], torch.Tensor], reorder: Callable[[torch.Tensor], None],
              batch_size: int, beam_size: int, max_new_tokens: int, *, start_id: int, eos_id: int, pad_id: int,
              length_penalty: float = 1.0, early_stopping: bool = True, device=None):
    """Beam search with a step function over batch_size * beam_size rows (example b's beams are
    rows b*K .. b*K+K-1), tokens (N, t) -> (N, V) logits; reorder(index) is told which rows
    survive. Returns (tokens (B, K, max_new_tokens), scores (B, K)), each row's finished
    hypotheses best first; a hypothesis ends with its eos, then pad_id."""
    B, K, L = batch_size, beam_size, max_new_tokens
    tokens = torch.full((B * K, 1), start_id, dtype=torch.long, device=device)
    # only beam 0 is live at the start: K copies of the same start would fill the beams with
    # duplicates
    beam_sums = torch.full((B, K), float("-inf"), device=device)
    beam_sums[:, 0] = 0.0
    kept_tokens = torch.full((B, K, L), pad_id, dtype=torch.long, device=device)
    kept_scores = torch.full((B, K), float("-inf"), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    row_offset = (torch.arange(B, device=device) * K)[:, None]                 # (B, 1)
    for t in range(L):
        logits = step(tokens)
        check_finite_logits(logits)
        log_probs = torch.log_softmax(logits, dim=-1)                          # (B*K, V)
        V = log_probs.shape[-1]
        candidates = (beam_sums[:, :, None] + log_probs.view(B, K, V)).view(B, K * V)
        top_sums, top_index = candidates.topk(min(2 * K, K * V), dim=-1)       # (B, 2K), best first
        top_beam, top_token = top_index // V, top_index % V
        length = t + 1
        # finished hypotheses: eos among the first K candidates, in rows not yet done
        ends = (top_token == eos_id) & ~done[:, None]
        ends[:, K:] = False
        new_scores = torch.where(ends, top_sums / length ** length_penalty, float("-inf"))
        generated = tokens[:, 1:].view(B, K, t)                                # without the start token
        hyps = torch.full((B, top_index.shape[1], L), pad_id, dtype=torch.long, device=device)
        hyps[:, :, :t] = generated.gather(1, top_beam[:, :, None].expand(-1, -1, t))
        hyps[:, :, t] = eos_id
        kept_scores, kept_tokens = merge_best(kept_scores, kept_tokens, new_scores, hyps, K)
        # the next beams: the K best candidates that do not end in eos
        running_sums = top_sums.masked_fill(top_token == eos_id, float("-inf"))
        beam_sums, order = running_sums.topk(K, dim=-1)                       # (B, K)
        parent = (top_beam.gather(1, order) + row_offset).view(-1)           # (B*K,) rows of tokens
        chosen = top_token.gather(1, order).view(-1, 1)
        tokens = torch.cat([tokens[parent], chosen], dim=1)
        reorder(parent)
        done |= row_done(kept_scores, beam_sums, length, L, length_penalty, early_stopping)
        if done.all():
            break
    else:
        # max_new_tokens reached: the rows not done also rank their running beams (no eos)
        scores = torch.where(done[:, None], float("-inf"), beam_sums / max(L, 1) ** length_penalty)
        kept_scores, kept_tokens = merge_best(kept_scores, kept_tokens, scores, tokens[:, 1:].view(B, K, L), K)
    return kept_tokens, kept_scores


def merge_best(scores_a, tokens_a, scores_b, tokens_b, k: int):
    """The k best of two sets of hypotheses per row: scores (B, n), tokens (B, n, L) each."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    best, index = scores.topk(k, dim=1)
    tokens = torch.cat([tokens_a, tokens_b], dim=1)
    return best, tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[2]))


def row_done(kept_scores, beam_sums, length: int, max_length: int, length_penalty: float,
             early_stopping: bool) -> torch.Tensor:
    """(B,) bool: which rows need no more steps (the early_stopping rule above)."""
    full = torch.isfinite(kept_scores[:, -1])   # K finished hypotheses (kept sorted, best first)
    if early_stopping:
        return full
    best_length = max_length if length_penalty > 0 else min(length + 1, max_length)
    reachable = beam_sums.max(dim=1).values / best_length ** length_penalty
    return full & (reachable <= kept_scores[:, -1])


@torch.no_grad()
def beam_search(model: EncoderDecoder, input_ids: torch.Tensor, max_new_tokens: int, *, start_id: int,
                eos_id: int, pad_id: int | None = None, input_lengths: torch.Tensor | None = None,
                beam_size: int = 4, length_penalty: float = 1.0, early_stopping: bool = True,
                use_cache: bool = True):
    """Beam search over an encoder-decoder: input_ids (B, S) -> (tokens (B, beam_size,
    max_new_tokens), scores (B, beam_size)), each example's hypotheses best first (conventions
    above). input_lengths, start_id, eos_id, pad_id as in generate_seq2seq. The encoder runs
    once per example; its output is repeated for the beams after it."""
    if beam_size < 1:
        raise UserError(f"beam_size must be >= 1, got {beam_size}")
    check_length_penalty(length_penalty)
    check_decoder_length(model, max_new_tokens)
    was_training = model.training
    model.eval()
    encoder_output, encoder_mask = encode_inputs(model, input_ids, input_lengths)
    steps = Seq2SeqSteps(model, encoder_output, encoder_mask, use_cache, max_len=max(1, max_new_tokens),
                         rows=input_ids.shape[0] * beam_size)
    out = beam_loop(steps.step, steps.reorder, input_ids.shape[0], beam_size, max_new_tokens,
                    start_id=start_id, eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id,
                    length_penalty=length_penalty, early_stopping=early_stopping, device=input_ids.device)
    model.train(was_training)
    return out
