"""Muon: momentum, then an orthogonalized update for each hidden matrix (Keller Jordan 2024).

AdamW scales each weight's step by its own gradient history; for a weight matrix that means the
update is dominated by its few largest singular directions. Muon keeps SGD's momentum but
replaces each matrix's update by (approximately) its nearest orthogonal matrix U V^T (for an
update U S V^T), so every direction the update spans moves by about the same amount. It is for
the 2-D hidden matrices of the blocks only; embeddings, the LM head, norms and biases stay on
AdamW (optim.py builds the groups). Per step, for a weight W (rows x cols) with gradient G:

    buf     = momentum * buf + (1 - momentum) * G          an EMA of the gradient (momentum 0.95)
    update  = (1 - momentum) * G + momentum * buf          Nesterov: one step further along buf
    O       = newton_schulz(update)                        ~ U V^T, 5 iterations (below)
    W       = W * (1 - lr * weight_decay)                  decoupled decay, as AdamW's
    W       = W - lr * 0.2 * sqrt(max(rows, cols)) * O     Moonshot's scale (Liu et al. 2025)

The last scale gives O (whose entries have RMS about 1/sqrt(max(rows, cols))) the RMS of a
typical AdamW update, 0.2, so AdamW's --lr and --weight_decay carry over (torch.optim.Muon's
adjust_lr_fn="match_rms_adamw").

Why our own class and not torch.optim.Muon: the same mathematics (tests/test_optim.py checks it
step for step against torch's in bf16), but torch's Newton-Schulz always runs in bf16, which is
what a GPU's tensor cores want and what a CPU without native bf16 matmuls emulates far slower
than fp32 (benchmarks/README.md, "speedrun"). Here the iteration runs in bf16 on CUDA and in fp32
elsewhere (`ns_dtype`), and a learner reads the whole optimizer in one screen.
"""
from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)   # the quintic's (a, b, c): the reference's, tuned for speed


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.float32):
    """(rows, cols) -> about U V^T, where update = U S V^T, in `dtype`, returned as update's dtype.

    Dividing by the Frobenius norm puts every singular value in (0, 1]; each iteration
    X <- a X + (b A + c A^2) X with A = X X^T applies the odd polynomial p(s) = a s + b s^3 + c s^5
    to every singular value at once (U and V stay). The coefficients make p steep at 0, so 5
    iterations lift small singular values close to 1 without converging exactly: they land in
    about [0.7, 1.2] (REFERENCES.md), which trains as well as exact U V^T. Working on the wide
    orientation (rows <= cols) keeps A = X X^T the smaller square."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T                                          # (r, r), r = min(rows, cols)
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)   # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)                     # a X + (b A + c A^2) X
    return (x.T if tall else x).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (module docstring). State per parameter: "momentum_buffer"."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        eps=eps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype        # None: bf16 on CUDA, fp32 elsewhere (module docstring)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)                                  # EMA of the gradient
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = newton_schulz(update, group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
