"""Causal multi-head attention with a persistent-memory prefix (Titans, section 4).

Persistent memory (eq 19): ``x_new = [p_1 .. p_Np || x]`` with ``N_p`` learnable,
input-independent tokens ``p``. Every query may attend to every persistent token.

What we implement: each ``Attention`` layer owns its ``N_p`` tokens ``P`` (shape
``(N_p, dim)``), prepends them to the layer's input and projects them with the same
``W_K, W_V`` as ordinary tokens: ``K = [P W_K || x W_K]``, ``V = [P W_V || x W_V]``.
Paper: prepends once, before the first layer; we prepend inside each attention layer
(the per-layer reading) so the rest of the model keeps the sequence length. The
outputs at persistent positions are never used, so their queries are not computed.

Attention: ``y = softmax(Q K^T / sqrt(d_h) + mask) V`` per head, where the mask lets
query position ``t`` see all persistent keys and the ordinary keys ``j <= t`` (causal),
with a window ``w`` only ``t - w < j <= t`` (sliding window, SWA, used by MAG/MAL);
``window=None`` is full causal attention (MAC, inside a segment, eq 22-23).

Positions (paper: unspecified; we use rotary embeddings, RoPE, on ordinary queries
and keys at their absolute positions because scores then depend only on ``t - j``,
which suits a sliding window). Persistent keys get no rotation: they have no
position, so their score must not depend on the query's position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .checks import check_int
from .state import StreamState


def attention_mask(q_len: int, k_len: int, *, window: int | None, n_persistent: int = 0,
                   q_offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Bool mask ``(q_len, n_persistent + k_len)``, True = the query may attend to the key.

    Columns: ``n_persistent`` persistent keys (always visible), then ``k_len`` ordinary
    keys at positions ``0..k_len-1``. Query ``i`` sits at position ``t = q_offset + i``
    (``q_offset`` = number of cached past keys) and sees key ``j`` iff ``j <= t`` and,
    when ``window`` is an int, ``j > t - window``.
    """
    if window is not None:
        check_int("window (None = no window)", window, 1)
    if q_len < 1 or k_len < 1 or n_persistent < 0 or q_offset < 0 or q_offset + q_len > k_len:
        raise ValueError("need q_len >= 1, n_persistent >= 0, 0 <= q_offset and "
                         f"q_offset + q_len <= k_len; got q_len={q_len}, k_len={k_len}, "
                         f"n_persistent={n_persistent}, q_offset={q_offset}")
    t = torch.arange(q_len, device=device)[:, None] + q_offset
    j = torch.arange(k_len, device=device)[None, :]
    visible = j <= t
    if window is not None:
        visible &= j > t - window
    return torch.cat([torch.ones(q_len, n_persistent, dtype=torch.bool, device=device), visible], 1)


def rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE (Su et al. 2021) on ``x (..., T, d)`` at integer ``positions (T,)``.

    Pairs ``(x_i, x_{i+d/2})`` turn by the angle ``pos * base^(-2i/d)``, so
    ``rotary(q, m) . rotary(k, n)`` depends on ``m - n`` only.
    """
    half, dtype = x.shape[-1] // 2, torch.promote_types(x.dtype, torch.float32)   # angles in >= fp32
    freqs = base ** (-2 * torch.arange(half, device=x.device, dtype=dtype) / x.shape[-1])
    angles = positions.to(dtype)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@dataclass
class KVCache(StreamState):
    """Streaming state of one ``Attention`` layer.

    ``k``, ``v``: ``(batch, heads, L, head_dim)`` ordinary keys (rotary already applied)
    and values of the latest tokens: ``L <= window - 1`` (all a later query can still
    see) or, for ``window=None``, every token since the cache was started.
    ``pos``: absolute position of the next token. Tensors are not detached.
    """

    k: Tensor
    v: Tensor
    pos: int


class Attention(nn.Module):
    """Multi-head causal attention over ``[persistent || x]``, full or sliding-window.

    ``forward(x (B, T, dim), cache=None) -> (y (B, T, dim), cache)``. Feeding a sequence
    in pieces, passing each returned cache to the next call, gives the same outputs as
    one call on the whole sequence; ``cache=None`` starts at position 0 with no past.
    """

    def __init__(self, dim: int, heads: int, *, n_persistent: int = 0,
                 window: int | None = None, rope_base: float = 10000.0):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads or (dim // heads) % 2:
            raise ValueError(f"heads must divide dim into an even head size, got dim={dim}, heads={heads}")
        if n_persistent < 0:
            raise ValueError(f"n_persistent must be >= 0, got {n_persistent}")
        if window is not None:
            check_int("window (None = no window)", window, 1)
        self.dim, self.heads, self.window, self.rope_base = dim, heads, window, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)       # W_Q, W_K, W_V
        self.out = nn.Linear(dim, dim, bias=False)           # W_O
        # paper: unspecified init; unit scale, like the normalised tokens beside them.
        self.persistent = nn.Parameter(torch.randn(n_persistent, dim))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """x (B, T >= 1, dim), unchecked: a model's layer, fed by the model (`TitansLM` checks
        its inputs once, at the top)."""
        batch, T, _ = x.shape
        start = 0 if cache is None else cache.pos
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        positions = torch.arange(start, start + T, device=x.device)
        q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
        if cache is not None:
            k, v = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
        if self.window is not None:   # keys more than window - 1 steps back are never seen again
            drop = max(k.shape[2] - T - (self.window - 1), 0)
            k, v = k[:, :, drop:], v[:, :, drop:]
        # persistent tokens projected like ordinary ones (eq 19); no query, no rotation
        _, pk, pv = rearrange(self.qkv(self.persistent), "p (three h d) -> three h p d",
                              three=3, h=self.heads)
        pk, pv = pk.expand(batch, -1, -1, -1), pv.expand(batch, -1, -1, -1)
        if self.window is None:
            mask = attention_mask(T, k.shape[2], window=None, n_persistent=pk.shape[2],
                                  q_offset=k.shape[2] - T, device=x.device)
            y = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
                                               attn_mask=mask)
            keep = 0
        else:
            y = self._sliding(q, k, v, pk, pv)
            keep = max(k.shape[2] - (self.window - 1), 0)
        y = self.out(rearrange(y, "b h t d -> b t (h d)"))
        return y, KVCache(k[:, :, keep:], v[:, :, keep:], start + T)

    def _sliding(self, q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor) -> Tensor:
        """Block-wise sliding-window attention, ``O(T (w + c))`` instead of ``O(T^2)``.

        Queries go in blocks of ``c = min(w, T)``; a block sees the ``c + w - 1`` keys
        ending at its last query. Keys are left-padded so ``w - 1`` come before the first
        query (padding masked out) and right-padded to whole blocks (seen only by padded
        queries, which are dropped).
        """
        w, T, past, p = self.window, q.shape[2], k.shape[2] - q.shape[2], pk.shape[2]
        c = min(w, T)
        n = -(-T // c)
        left, right = w - 1 - past, n * c - T
        span = c + w - 1
        q = rearrange(F.pad(q, (0, 0, 0, right)), "b h (n c) d -> b (h n) c d", c=c)
        k, v = (rearrange(F.pad(t, (0, 0, left, right)).unfold(2, span, c), "b h n d s -> b (h n) s d")
                for t in (k, v))
        pk, pv = (repeat(t, "b h p d -> b (h n) p d", n=n) for t in (pk, pv))
        real = (torch.arange(w - 1 + n * c, device=q.device) >= left).unfold(0, span, c)    # (n, span)
        real = torch.cat([real.new_ones(n, p), real], 1)
        mask = attention_mask(c, span, window=w, n_persistent=p, q_offset=w - 1, device=q.device)
        mask = repeat(mask & real[:, None, :], "n c s -> (h n) c s", h=self.heads)
        y = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
        return rearrange(y, "b (h n) c d -> b h (n c) d", h=self.heads)[:, :, :T]
