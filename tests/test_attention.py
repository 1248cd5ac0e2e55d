"""Attention with persistent prefix: masks, brute-force equivalence, causality, streaming."""

import math

import pytest
import torch
from einops import rearrange

from titans_mini.attention import Attention, attention_mask, rotary

WINDOWS = [None, 1, 2, 3, 5, 13, 20]


def loop_visible(t: int, j: int, window: int | None) -> bool:
    """Ordinary key j visible from query position t, written out plainly."""
    if j > t:
        return False
    return window is None or t - j < window


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("n_persistent", [0, 3])
@pytest.mark.parametrize("q_offset", [0, 4])
def test_mask_matches_loops(window, n_persistent, q_offset):
    q_len, k_len = 6, 6 + q_offset
    mask = attention_mask(q_len, k_len, window=window, n_persistent=n_persistent, q_offset=q_offset)
    assert mask.shape == (q_len, n_persistent + k_len) and mask.dtype == torch.bool
    for i in range(q_len):
        for col in range(n_persistent + k_len):
            want = col < n_persistent or loop_visible(q_offset + i, col - n_persistent, window)
            assert bool(mask[i, col]) == want, (i, col)


def brute_force(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax over explicit per-query key lists, with plain loops (float64)."""
    batch, T, dim = x.shape
    h = layer.heads
    q, k, v = rearrange(layer.qkv(x), "b t (three h d) -> three b h t d", three=3, h=h)
    pos = torch.arange(T)
    q, k = rotary(q, pos, layer.rope_base), rotary(k, pos, layer.rope_base)
    _, pk, pv = rearrange(layer.qkv(layer.persistent), "p (three h d) -> three h p d", three=3, h=h)
    y = torch.zeros(batch, h, T, dim // h, dtype=x.dtype)
    for b in range(batch):
        for hh in range(h):
            for t in range(T):
                keys = [pk[hh, i] for i in range(pk.shape[1])]
                vals = [pv[hh, i] for i in range(pv.shape[1])]
                for j in range(T):
                    if loop_visible(t, j, layer.window):
                        keys.append(k[b, hh, j])
                        vals.append(v[b, hh, j])
                scores = torch.stack([q[b, hh, t] @ kk for kk in keys]) / math.sqrt(dim // h)
                weights = torch.softmax(scores, 0)
                y[b, hh, t] = sum(w * vv for w, vv in zip(weights, vals))
    return layer.out(rearrange(y, "b h t d -> b t (h d)"))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("n_persistent", [0, 3])
def test_forward_matches_brute_force(window, n_persistent):
    torch.manual_seed(0)
    layer = Attention(8, 2, n_persistent=n_persistent, window=window).double()
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x)
        torch.testing.assert_close(y, brute_force(layer, x), rtol=1e-10, atol=1e-10)


def test_persistent_tokens_change_output():
    torch.manual_seed(0)
    layer = Attention(8, 2, n_persistent=2, window=3)
    x = torch.randn(1, 7, 8)
    y0, _ = layer(x)
    with torch.no_grad():
        layer.persistent.add_(1.0)
    y1, _ = layer(x)
    assert (y0 - y1).abs().min() > 0   # every position reads the persistent tokens


def test_rotary_is_relative():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    pos = lambda p: torch.tensor([p])  # noqa: E731
    d1 = rotary(q, pos(7)) @ rotary(k, pos(3)).T
    d2 = rotary(q, pos(104)) @ rotary(k, pos(100)).T
    torch.testing.assert_close(d1, d2)
    assert not torch.allclose(d1, rotary(q, pos(5)) @ rotary(k, pos(3)).T)
    torch.testing.assert_close(rotary(q, pos(9)).norm(), q.norm())


@pytest.mark.parametrize("window", [None, 1, 4])
def test_causal_and_window_reach(window):
    torch.manual_seed(0)
    layer = Attention(8, 2, n_persistent=2, window=window).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    s = 5
    x2 = x.clone()
    x2[:, s] += torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = layer(x)[0], layer(x2)[0]
    torch.testing.assert_close(y[:, :s], y2[:, :s], rtol=0, atol=0)   # past unaffected
    assert (y[:, s] - y2[:, s]).abs().max() > 1e-6
    reach = 12 if window is None else s + window                        # last query that sees s
    assert (y[:, s:reach] - y2[:, s:reach]).abs().amax(dim=(0, 2)).min() > 1e-9
    torch.testing.assert_close(y[:, reach:], y2[:, reach:], rtol=0, atol=0)


@pytest.mark.parametrize("window", [None, 1, 3, 6])
@pytest.mark.parametrize("pieces", [[1] * 17, [3, 1, 5, 2, 6], [17], [9, 8]])
def test_streaming_equals_full(window, pieces):
    torch.manual_seed(0)
    layer = Attention(8, 2, n_persistent=2, window=window).double()
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    with torch.no_grad():
        full, end = layer(x)
        outs, cache, t = [], None, 0
        for n in pieces:
            y, cache = layer(x[:, t:t + n], cache)
            outs.append(y)
            t += n
            assert cache.pos == t
            if window is not None:
                assert cache.k.shape[2] == min(t, window - 1)   # constant-size state
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache.k, end.k)


def test_gradients_reach_all_parameters():
    torch.manual_seed(0)
    layer = Attention(8, 2, n_persistent=2, window=3)
    y, _ = layer(torch.randn(2, 9, 8))
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs():
    with pytest.raises(ValueError, match="heads"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="heads"):
        Attention(6, 2)            # odd head size: no rotary pairs
    with pytest.raises(ValueError, match="window"):
        Attention(8, 2, window=0)
    with pytest.raises(ValueError, match="n_persistent"):
        Attention(8, 2, n_persistent=-1)
    with pytest.raises(ValueError, match="window"):
        attention_mask(3, 3, window=0)
    with pytest.raises(ValueError, match="q_offset"):
        attention_mask(3, 4, window=None, q_offset=2)
