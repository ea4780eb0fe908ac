"""minilm/losses.py: the blockwise summed cross-entropy is F.cross_entropy, loss and gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minilm import losses
from minilm.losses import IGNORE, cross_entropy_sum


def reference(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def draw(n, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = IGNORE
    if n > 1:
        labels[-1] = IGNORE                                   # at least one row is not a target
    return logits, labels


@pytest.mark.parametrize("n", [1, 127, 128, 300])           # below, at and across the block size
def test_fp32_loss_and_gradient_equal_cross_entropy(n):
    logits, labels = draw(n, 97, torch.float32)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = cross_entropy_sum(a, labels), reference(b, labels)
    (0.37 * ours).backward()                                  # a non-unit upstream gradient
    (0.37 * ref).backward()
    assert ours.dtype == torch.float32 and ours.dim() == 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    ignored = labels == IGNORE
    assert ignored.any() == (n > 1) and torch.all(a.grad[ignored] == 0)  # ignored rows: no gradient at all


def test_bf16_logits_give_the_fp32_loss_and_a_bf16_gradient():
    """Under autocast the logits are bf16: the loss must be the fp32 cross-entropy of those very
    bf16 values, and the gradient comes back in bf16, as autograd's cast would give it."""
    logits, labels = draw(300, 500, torch.bfloat16, seed=1)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = cross_entropy_sum(a, labels), reference(b, labels)
    ours.backward()
    ref.backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-3)


def test_extreme_logits_stay_finite():
    """logsumexp is shifted by the row maximum: logits of 1e4 must not overflow exp. (At that size
    fp32 resolves the log-sum-exp to about 5e-4, hence the looser gradient tolerance.)"""
    logits = torch.tensor([[1e4, 0.0, -1e4], [-5e3, 5e3, 5e3]], requires_grad=True)
    labels = torch.tensor([1, 2])
    loss = cross_entropy_sum(logits, labels)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1e4 + torch.log(torch.tensor(2.0)).item()))
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.5, -0.5]]), atol=1e-3, rtol=0)


def test_all_ignored_is_zero_loss_and_zero_gradient():
    logits = torch.randn(5, 7, requires_grad=True)
    loss = cross_entropy_sum(logits, torch.full((5,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_block_size_does_not_change_the_result(monkeypatch):
    logits, labels = draw(100, 50, torch.float32, seed=2)
    results = []
    for rows in (1, 7, 100, 1000):
        monkeypatch.setattr(losses, "ROWS_PER_BLOCK", rows)
        x = logits.clone().requires_grad_()
        loss = cross_entropy_sum(x, labels)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


def test_blocking_is_for_cpu_only():
    """Off the CPU (here the meta device stands in for CUDA) the loss is plain F.cross_entropy:
    one fused kernel beats a Python loop of block launches on a GPU."""
    def backward_name(device):
        logits = torch.randn(4, 10, device=device, requires_grad=True)
        return type(cross_entropy_sum(logits, torch.zeros(4, dtype=torch.long, device=device)).grad_fn).__name__
    assert backward_name("meta") == "NllLossBackward0"
    assert "SummedCrossEntropy" in backward_name("cpu")


def test_step_mean_divides_by_the_step_total_or_the_batch_count_and_never_by_zero():
    from minilm.losses import step_mean
    batch = {"counts": {"targets": torch.tensor(4), "tokens": torch.tensor(0)}}
    summed = torch.tensor(12.0)
    assert step_mean(summed, batch, None) == 3.0                                  # the batch's own count
    assert step_mean(summed, batch, {"targets": torch.tensor(8)}) == 1.5          # the step's total
    assert step_mean(summed, batch, None, "tokens") == 12.0                       # nothing counted: / 1
