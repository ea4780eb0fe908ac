"""Cross-entropy over a large vocabulary, summed, without materializing fp32 log-probabilities.

A language model's last step turns (N, V) logits into one number per target:

    loss_i = logsumexp(z_i) - z_i[y_i]              (the negative log-probability of the target)
    d loss_i / d z_i = softmax(z_i) - onehot(y_i)   (the whole backward pass)

`F.cross_entropy(logits.float(), ...)` gets there through several full passes over (N, V) fp32
tensors: the upcast copy, log_softmax's output, NLL's zero-filled gradient, log_softmax's backward,
and (under bf16 autocast) the downcast of that gradient. At N = 2,048 tokens and V = 8,192 each
pass is 64 MiB, far more than any CPU cache. `cross_entropy_sum` does the same arithmetic one
block of rows at a time: each block is upcast to fp32 while it is still in cache, only the (N,)
log-sum-exp is kept for backward (with the logits themselves, which autograd keeps anyway), and
the gradient is written straight into the logits' dtype. Same loss, same gradient up to rounding
(tests/test_losses.py checks both against F.cross_entropy); what it saves on a CPU is in
benchmarks/README.md, "The blockwise cross-entropy".

step_mean turns such a sum into a micro-batch's share of the step's loss (objectives/base.py).

The blocking is a CPU cache optimization. On a GPU (memory bandwidth to spare, one kernel launch
per op) and under torch.compile (which fuses the loss by itself) the plain F.cross_entropy path is
used instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # label value for positions that are not predicted (PyTorch's cross_entropy default)
ROWS_PER_BLOCK = 128  # 128 rows x 8,192 fp32 = 4 MiB: the upcast block stays in L2/L3


class _SummedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        # logits (N, V) in any float dtype; labels (N,) int64 with IGNORE for positions not predicted
        real = labels != IGNORE                                    # (N,)
        targets = labels.clamp(min=0)                              # any valid index where ignored
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
        target_logit = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, lse, targets, real)
        return ((lse - target_logit) * real).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, targets, real = ctx.saved_tensors
        grad = torch.empty_like(logits)
        weight = grad_loss.float() * real                          # (N,): 0 for ignored rows
        minus_one = torch.full((logits.shape[0], 1), -1.0, device=logits.device)
        for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            block = (logits[rows] - lse[rows, None]).exp_()               # softmax, fp32 (lse is fp32)
            block.scatter_add_(1, targets[rows, None], minus_one[rows])   # - onehot(target)
            torch.mul(block, weight[rows, None], out=grad[rows])          # rounded once, into grad's dtype
        return grad, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (N, V) against labels (N,) (IGNORE = not a target); a 0-dim
    fp32 tensor. Equal to F.cross_entropy(logits.float(), labels, ignore_index=IGNORE,
    reduction="sum"), computed in fp32 whatever the logits' dtype."""
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return _SummedCrossEntropy.apply(logits, labels)


def step_mean(summed: torch.Tensor, batch: dict, totals: dict | None, key: str = "targets") -> torch.Tensor:
    """A micro-batch's share of the step's mean loss: its summed loss over the step's count of
    `key` (the trainer's `totals`, batch["counts"] added over every micro-batch of the step), or
    over the batch's own count without totals (evaluation, a single batch); at least 1, so a batch
    with nothing to predict gives 0. Backpropagating every micro-batch's share gives exactly the
    gradient of the step's one big batch (objectives/base.py)."""
    return summed / (totals or batch["counts"])[key].clamp(min=1)
