"""Model FLOPs utilization (MFU): how much of the machine's matmul throughput training uses.

FLOPs per token follow nanoGPT's estimate (PaLM appendix B): 6 N for the weight matmuls (2 forward,
4 backward, per parameter) plus 12 L H D T for attention scores and values. N counts the weights
a matmul really uses at every position (matmul_weights): the blocks, the norms, a factorized
model's embed_project (E -> C), and the LM head when the objective runs one (tied: head_project
C -> E if factorized, then the token matrix, once; untied: lm_head). The token, position and
segment tables are lookups and count nothing; an untied token table is not the head's matmul.
The speedrun switches change nothing that matters here: --mlp relu2 has gelu's weights, QK-norm's
two weights of head size per block count 6 FLOPs each as the other norms do (negligible: 2 D
beside the block's 12 C^2 matmul weights), and soft-capping is elementwise, like the softmax.
transformer_flops is the one count every objective uses (Objective.flops_per_token), told at which
share of positions the last block and a head run; encoder_decoder_flops is t5's.

The peak is *measured*, not looked up: the best throughput of a large square matmul in the
training dtype on this device. So MFU = achieved / achievable-by-a-matmul here, comparable
across machines and honest on CPUs whose datasheet peak is never reached.
"""
from __future__ import annotations

import time

import torch


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def matmul_weights(backbone, lm_head: bool = True) -> int:
    """Parameters of `backbone` (a minilm Transformer) that a matmul uses at every position: all
    of them but the embedding tables, plus the output matrix when the LM head runs (`lm_head`).
    nanoGPT's N (num_params(non_embedding=True)) is this for a tied decoder; for an untied one it
    also counts the token table, and for an encoder without an LM head (sop) the output matrix,
    overstating the FLOPs by V * C per token."""
    n = backbone.num_params(non_embedding=True) - backbone.tok_emb.weight.numel()   # blocks, norms, projections
    if backbone.lm_head is not None:
        n -= backbone.lm_head.weight.numel()
    n -= lm_head_weights(backbone)              # added back just below when the head runs
    return n + (lm_head_weights(backbone) + backbone.output_weight.numel() if lm_head else 0)


def parameters_of(module) -> int:
    """How many parameters `module` holds (0 for None): the weights of a head's matmuls."""
    return 0 if module is None else sum(w.numel() for w in module.parameters())


def key_value_weights(attention) -> int:
    """The key and value projections' share of an Attention's (3C, C) qkv layer, with its bias."""
    return sum(w.numel() for w in attention.qkv.parameters()) * 2 // 3


def transformer_flops(backbone, length: int, *, outputs_share: float = 1.0, head: int = 0,
                      head_share: float | None = None) -> float:
    """Training FLOPs per token of one pass of a Transformer (minilm/model.py) over rows of
    `length` tokens: the generic count every objective's MFU uses (Objective.flops_per_token).

        6 x every weight at every position      matmul_weights without the LM head: the blocks,
                                                norms, a factorized model's embed_project
        except the last block and the final     the last block's keys and values still at every
        norm when only an outputs_share of      position, the rest (queries, projection, MLP) and
        positions is wanted (outputs_at)        the final norm at that share
        + 6 x `head` weights at head_share      a head on the hidden states (the LM head's
          of positions (outputs_share if None)  lm_head_matmul_weights, a pooler: 1 / length)
        + 12 H D length per block               attention scores and values (the last block's
                                                at outputs_share)
    """
    cfg = backbone.cfg
    last = backbone.blocks[-1]
    skipped = (1 - outputs_share) * (parameters_of(last) - key_value_weights(last.attn) + parameters_of(backbone.norm))
    weights = matmul_weights(backbone, lm_head=False) - skipped
    head_share = outputs_share if head_share is None else head_share
    attention = (len(backbone.blocks) - 1 + outputs_share) * 12 * cfg.n_head * cfg.head_dim * length
    return 6 * (weights + head_share * head) + attention


def lm_head_matmul_weights(backbone) -> int:
    """The weights the LM head multiplies by: head_project (factorized, tied) and the output matrix."""
    return lm_head_weights(backbone) + backbone.output_weight.numel()


def embed_project_weights(backbone) -> int:
    """Parameters of a factorized model's embed_project (E -> C, with its bias), 0 otherwise: a
    matmul at every position, unlike the tables it reads."""
    project = backbone.embed_project
    return 0 if project is None else sum(w.numel() for w in project.parameters())


def lm_head_weights(backbone) -> int:
    """Parameters of the LM head's matmuls before the output matrix: a factorized tied model's
    head_project (C -> E, with its bias), 0 otherwise. The output matrix is backbone.output_weight."""
    project = backbone.head_project
    return 0 if project is None else sum(w.numel() for w in project.parameters())


def encoder_decoder_flops(model, input_length: int, target_length: int) -> int:
    """Training FLOPs of one example through an EncoderDecoder (minilm/model.py): input_length
    (S) encoder tokens, target_length (T) decoder tokens, the LM head on the decoder's tokens.

        encoder    6 N_enc S + 12 L_enc H D S^2       every token attends to all S inputs
        decoder    6 (N_dec - N_kv) T + 6 N_kv S      the cross-attention keys/values project the
                                                      encoder's S outputs, once, not the T tokens
                   + 12 L_dec H D T (T + S)           self-attention over T, cross-attention over S
    N_enc, N_dec: matmul_weights of each stack (the decoder's with its cross-attention and the
    output matrix), N_kv: the decoder's cross-attention key/value weights. Divide by S for the
    FLOPs per input token (what the trainer's tokens/s counts)."""
    cfg = model.cfg
    attention = 12 * cfg.n_head * cfg.head_dim
    encoder = matmul_weights(model.encoder, lm_head=False)
    decoder = matmul_weights(model.decoder, lm_head=True)
    cross_key_value = sum(block.cross.qkv.weight.numel() * 2 // 3 +
                          (block.cross.qkv.bias.numel() * 2 // 3 if block.cross.qkv.bias is not None else 0)
                          for block in model.decoder.blocks)
    flops = 6 * encoder * input_length + cfg.n_layer * attention * input_length ** 2
    flops += 6 * (decoder - cross_key_value) * target_length + 6 * cross_key_value * input_length
    flops += cfg.n_decoder_layer * attention * target_length * (target_length + input_length)
    return flops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_peak_flops(device, dtype=torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """Best observed FLOP/s of a (size x size) @ (size x size) matmul on `device` in `dtype`."""
    device = torch.device(device)
    if device.type == "cuda":
        size = max(size, 4096)
    # a private generator: measuring must not move the global RNG (resume must be exact)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    _sync(device)
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2 * size ** 3 / dt)
    return best
