"""How much memory a training run will take, estimated from the shapes before it starts.

A training step holds four things at its peak (the start of the backward pass):

    parameters       every weight, in its dtype (fp32: 4 bytes each)
    gradients        one per trainable weight, fp32
    optimizer state  AdamW's two moments per trainable weight, fp32: 2 x 4 bytes
    activations      what autograd saves in the forward pass for the backward one, at the
                     chosen batch: per block, the tensors listed in block_units (the residual
                     stream, the norms' outputs, q, k, v, attention's output, the MLP's
                     intermediates), then the final norm and the logits, plus the logits'
                     gradient, the backward pass's first and largest new tensor

The activations are counted in "units" of one (batch, seq_len, n_embd) tensor, B x T x C numbers:

    rmsnorm         2 units besides its input: the normalized x (saved for the gain's gradient)
                    and the output (saved by the next matmul); layernorm's kernel saves only
                    its (B, T) statistics, so 1
    attention       q, k, v: the qkv matmul's output, 3 units (v is a view of it), plus 2 for
                    q and k rotated by RoPE (learned positions: views, 0); the fused kernel's
                    output, 1 (the output projection reads it as is); its log-sum-exp is B x H x T
    residual        the stream after attention, 1 (the block's input is the last block's output)
    MLP             GELU: the up projection's output and GELU's, 2 x B x T x F numbers; SwiGLU:
                    the (gate, up) output, 2F, silu(gate), F, and the product, F: 4 x B x T x F
    dropout         a mask per dropped element (two per block and the embeddings'; on CPU the plain
                    attention path then also keeps 3 x B x H x T x T numbers: the probabilities,
                    the noise and the dropped probabilities)
    cross-attention (an encoder-decoder's decoder blocks) a norm, q, the encoder's k and v,
                    the output and the residual

An estimate: allocator overhead, the optimizer step's temporaries, an objective's own heads
(a classifier's is tiny) and the few (B, T) integer tensors are left out; the logits count one
vocabulary row per position for objectives that read running text, and a decoder's blocks as
many positions as the encoder's; so for the masked LMs (which predict some positions only) and
the encoder-decoders (whose targets are shorter) it is an upper bound. tests/test_memory.py holds
it to the peak that PyTorch's profiler measures on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# data sources (Objective.data) whose objectives put an LM head over every position of running text
TOKEN_DATA = ("blocks", "segment_pairs", "parallel")


def norm_units(cfg) -> int:
    return 2 if cfg.norm == "rmsnorm" else 1


def block_units(cfg, cross_attention: bool = False) -> float:
    """What one block saves for backward, in (B, T, C) units (module docstring)."""
    C, H = cfg.n_embd, cfg.n_head
    units = norm_units(cfg) + 3 + (2 if cfg.position == "rope" else 0) + 1   # norm1, qkv, rotated q k, output
    units += 1 + norm_units(cfg)                                           # residual, norm2
    mlp_numbers = (4 if cfg.mlp == "swiglu" else 2) * cfg.mlp_hidden       # per position
    units += mlp_numbers / C
    if cross_attention:
        units += norm_units(cfg) + 1 + 2 + 1 + 1                            # norm, q, k v, output, residual
    units += H / C                                                          # the softmax's log-sum-exp (B, H, T)
    return units


def activation_bytes(cfg, batch_size: int, dtype: torch.dtype, *, logits: bool = True,
                     checkpointing: bool = False, device_type: str = "cpu") -> int:
    """Bytes autograd keeps for one micro-batch of `batch_size` rows of cfg.seq_len tokens.

    dtype: the compute dtype (bf16/fp16 under autocast: the saved tensors are mostly 2 bytes).
    checkpointing: --activation_checkpointing: each block keeps only its input, and one block's
    activations are alive again while it is recomputed in backward."""
    B, T, C = batch_size, cfg.seq_len, cfg.n_embd
    size = torch.finfo(dtype).bits // 8
    unit = B * T * C * size
    encoder = [block_units(cfg)] * cfg.n_layer
    decoder = [block_units(cfg, cross_attention=True)] * cfg.n_decoder_layer
    blocks = encoder + decoder
    if checkpointing:
        total = unit * (len(blocks) + max(blocks))
    else:
        total = unit * sum(blocks)
    total += unit * (1 + norm_units(cfg))                  # the last block's output, the final norm
    if cfg.dropout:
        # a mask for the embeddings and each block's two residual branches: one byte an element
        # on CUDA, the noise in the activations' dtype on CPU; there attention with dropout takes
        # the plain path, which saves its (B, H, T, T) probabilities, the noise and the dropped
        # probabilities (CUDA's fused kernels draw the mask again in backward instead)
        mask = 1 if device_type == "cuda" else size
        total += (2 * len(blocks) + 1) * B * T * C * mask
        if device_type != "cuda":
            total += len(blocks) * B * cfg.n_head * T * T * 3 * size
    if logits:
        V = cfg.vocab_size
        if device_type == "cpu":    # minilm.losses keeps the logits, then writes their gradient
            total += 2 * B * T * V * size
        else:                       # F.cross_entropy: the logits, an fp32 copy and log-softmax, the gradient
            total += B * T * V * (2 * size + 8)
    return int(total)


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what they are) of the memory a run on `device` has: a GPU's total memory, the
    machine's RAM for the CPU (and for Apple's MPS, which shares it); (None, why) if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{torch.cuda.get_device_name(device)} memory"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):   # not a POSIX system (Windows)
        return None, "unknown RAM"
    return ram, "RAM"


@dataclass
class MemoryEstimate:
    parameters: int     # bytes of each part
    gradients: int
    optimizer: int
    activations: int
    n_params: int
    available: int | None   # the device's memory
    available_what: str

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def describe(self, batch_size: int, seq_len: int) -> str:
        against = f"of {_size(self.available)} {self.available_what}" if self.available else \
            f"({self.available_what})"
        return (f"memory estimate: {_size(self.total)} {against} = parameters {_size(self.parameters)} "
                f"({self.n_params / 1e6:.2f}M) + gradients {_size(self.gradients)} + AdamW state "
                f"{_size(self.optimizer)} + activations {_size(self.activations)} (micro-batch {batch_size} x "
                f"{seq_len} tokens)")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def estimate(objective, batch_size: int, device: torch.device, dtype: torch.dtype, *, world_size: int = 1,
             fsdp: bool = False, checkpointing: bool = False) -> MemoryEstimate:
    """The memory one process of a training run holds at its peak (module docstring). With FSDP
    the parameters, gradients and optimizer state are split across the world_size processes."""
    params = list({id(p): p for p in objective.parameters()}.values())   # a tied weight once
    trainable = [p for p in params if p.requires_grad]
    share = world_size if fsdp else 1
    n_trainable = sum(p.numel() for p in trainable)
    param_bytes = sum(p.numel() * p.element_size() for p in params) // share
    grads = n_trainable * 4 // share
    states = 2 * n_trainable * 4 // share
    cfg = objective.backbone.cfg
    acts = activation_bytes(cfg, batch_size, dtype, logits=getattr(objective, "data", "blocks") in TOKEN_DATA,
                            checkpointing=checkpointing, device_type=device.type)
    available, what = device_memory(device)
    return MemoryEstimate(param_bytes, grads, states, acts, sum(p.numel() for p in params), available, what)


def advice(estimate: MemoryEstimate) -> str:
    """The warning for a run whose estimate exceeds its device's memory."""
    return (f"warning: the memory estimate ({_size(estimate.total)}) is more than the {_size(estimate.available)} of "
            f"{estimate.available_what}: the run will likely fail or swap; lower --batch_size (and raise --grad_accum "
            f"for the same step), --seq_len or the model's size")
