"""pool(): each rule reads exactly the positions it names, and padding never changes a vector."""
from __future__ import annotations

import pytest
import torch

from minilm.pooling import pool


def test_each_pooling_reads_the_positions_it_names():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 4, generator=g)
    lengths = torch.tensor([6, 2, 4])
    assert torch.equal(pool(hidden, lengths, "first"), hidden[:, 0])
    assert torch.equal(pool(hidden, lengths, "last"), torch.stack([hidden[0, 5], hidden[1, 1], hidden[2, 3]]))
    want = torch.stack([hidden[b, :n].mean(0) for b, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(pool(hidden, lengths, "mean"), want)


@pytest.mark.parametrize("how", ["first", "mean", "last"])
def test_padding_positions_never_reach_the_vector(how):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 3, generator=g)
    lengths = torch.tensor([3, 5])
    noisy = hidden.clone()
    noisy[0, 3:] = 1e6   # whatever sits on the padding of row 0
    torch.testing.assert_close(pool(noisy, lengths, how), pool(hidden, lengths, how))
