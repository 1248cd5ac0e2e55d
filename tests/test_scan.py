"""The associative scan against the plain loop (titans_mini/scan.py)."""

import pytest
import torch

from titans_mini.scan import linear_scan, linear_scan_loop


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 8, 13, 64, 100])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_scan_matches_loop(steps, dtype, tol):
    gen = torch.Generator().manual_seed(steps)
    a = torch.rand(3, steps, generator=gen, dtype=dtype)
    b = torch.randn(3, steps, 4, 5, generator=gen, dtype=dtype)
    h0 = torch.randn(3, 4, 5, generator=gen, dtype=dtype)
    for start in (None, h0):
        expected = linear_scan_loop(a, b, start)
        torch.testing.assert_close(linear_scan(a, b, start), expected, atol=tol, rtol=tol)


def test_loop_is_the_recurrence():
    a = torch.tensor([[0.5, 2.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 3.0]])
    # h1 = 0.5*4 + 1 = 3, h2 = 2*3 + 1 = 7, h3 = 0*7 + 3 = 3
    assert linear_scan_loop(a, b, torch.tensor([4.0])).tolist() == [[3.0, 7.0, 3.0]]
    assert linear_scan(a, b, torch.tensor([4.0])).tolist() == [[3.0, 7.0, 3.0]]


def test_scan_gradients_match_loop():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 11, 3, generator=gen, dtype=torch.float64)
    grads = [torch.autograd.grad((fn(a, b, h0) * weights).sum(), (a, b, h0)) for fn in (linear_scan, linear_scan_loop)]
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="leading shape"):
        linear_scan(torch.rand(2, 5), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="h0"):
        linear_scan(torch.rand(2, 5), torch.rand(2, 5, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="empty"):
        linear_scan(torch.rand(2, 0), torch.rand(2, 0, 3))
    with pytest.raises(TypeError, match="floating"):
        linear_scan(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))
