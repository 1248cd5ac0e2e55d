"""The neural long-term memory as a learner at test time: Titans section 3.1, eq 8-15.

The memory M is a small MLP whose weights are trained *while the model reads*. Each
token x_t offers a key and a value (eq 11), and the memory takes one gradient step on

    l(M_{t-1}; x_t) = || M_{t-1}(k_t) - v_t ||^2                       (eq 12)

Its gradient is the token's "momentary surprise" (eq 8). Past surprise is a momentum
(eq 10) and forgetting is a weight decay (eq 13):

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)                 (eq 10, 14)
    M_t = (1 - alpha_t) M_{t-1} + S_t                                  (eq 13)
    y_t = M_t(q_t)                                                     (eq 15)

This module holds the per-token reference path, written to be read: it is what
notebooks 01-03 derive. `titans_mini.chunked` computes the same thing in parallel.

Conventions: a memory of depth L is a tuple of L weight matrices; row vectors go in,
`h = x @ W`, so W has shape (d_in, d_out); SiLU between layers; no biases. A batch of
B sequences has B independent memories, so each weight carries a leading batch axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .state import StreamState

Weights = tuple[Tensor, ...]


def memory_forward(weights: Weights, x: Tensor) -> Tensor:
    """M(x): the memory MLP. Depth 1 is a matrix, M(x) = x W (online linear regression).

    Works for one memory (weights (d_in, d_out), x (..., d)) and for a batch of
    memories (weights (B, d_in, d_out), x (B, n, d)).
    Paper: the MLP's activation is unspecified; we use SiLU, as the projections do (4.4).
    """
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = F.silu(x)
    return x


def associative_loss(weights: Weights, k: Tensor, v: Tensor) -> Tensor:
    """Eq 12 for one memory and one token: || M(k) - v ||^2 (a sum, not a mean)."""
    return (memory_forward(weights, k) - v).pow(2).sum()


# grad of eq 12 with respect to the weights, batched over B memories (one token each).
_surprise = torch.func.vmap(torch.func.grad(associative_loss))


def surprise(weights: Weights, k: Tensor, v: Tensor) -> Weights:
    """Momentary surprise (eq 8): the gradient of eq 12, one per memory in the batch.

    weights: tuple of (B, d_in, d_out); k, v: (B, d). Returns a tuple shaped like weights.
    Computed with `torch.func.grad`, so it is differentiable for the outer loop.
    """
    return _surprise(weights, k, v)


def linear_memory_grad(w: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Closed-form surprise of a linear memory (eq 17's ingredient).

    With M(k) = k W:  l = ||k W - v||^2,  dl/dW = 2 k^T (k W - v), an outer product.
    w: (B, d_in, d_out); k: (B, d_in); v: (B, d_out). Returns (B, d_in, d_out).
    """
    error = torch.einsum("bi,bio->bo", k, w) - v
    return 2 * torch.einsum("bi,bo->bio", k, error)


@dataclass(frozen=True)
class MemoryState(StreamState):
    """Everything the memory carries from one call to the next.

    weights, momentum: M and S at the start of the current chunk, each a tuple of
        (B, d_in, d_out) tensors. With chunk_size 1 these are simply M_t and S_t.
    keys, values (B, p, d) and gates (B, p, 3) = (theta, eta, alpha): the p tokens
        already seen of the current, incomplete chunk (p < chunk_size). Their gradients
        are taken at `weights`, so they are kept rather than applied: a stream cut
        anywhere continues exactly as if it had not been cut.
    conv: (B, kernel - 1, 3 d), the last projected inputs of the causal convolution,
        or None when the convolution is off.
    """

    weights: Weights
    momentum: Weights
    keys: Tensor
    values: Tensor
    gates: Tensor
    conv: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.weights[0].shape[0]

    @property
    def pending(self) -> int:
        """How many tokens of the current chunk are waiting in the state."""
        return self.keys.shape[1]


def _per_token(x: Tensor) -> Tensor:
    """A per-memory scalar (B,) made to broadcast against (B, d_in, d_out)."""
    return x[:, None, None]


def sequential_memory(
    weights: Weights,
    momentum: Weights,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    *,
    chunk_size: int = 1,
) -> tuple[Tensor, Weights, Weights]:
    """Eq 8-15, one token at a time: the literal recurrence.

    Args:
        weights, momentum: M and S before the first token, tuples of (B, d_in, d_out).
        q, k, v: (B, T, d) queries, keys, values.
        theta, eta, alpha: (B, T) inner learning rate, momentum and forgetting gates.
        chunk_size: 1 takes every gradient at M_{t-1} (eq 13-14 exactly). b > 1 takes
            them at the weights of the chunk start, t' = t - mod(t, b) (section 3.2's
            mini-batch rule), and is the loop `titans_mini.chunked` is tested against.
            The sequence is taken to start at a chunk boundary.

    Returns:
        y: (B, T, d) with y_t = M_t(q_t), read after writing token t (eq 15).
        weights, momentum: at the start of the last, incomplete chunk; after the last
            token when T is a multiple of chunk_size.
    """
    ys = []
    anchor, anchor_momentum = weights, momentum
    for t in range(k.shape[1]):
        if t % chunk_size == 0:
            anchor, anchor_momentum = weights, momentum
        grads = surprise(anchor, k[:, t], v[:, t])  # eq 8
        momentum = tuple(
            _per_token(eta[:, t]) * s - _per_token(theta[:, t]) * g for s, g in zip(momentum, grads)
        )  # eq 10
        weights = tuple(_per_token(1 - alpha[:, t]) * w + s for w, s in zip(weights, momentum))  # eq 13
        ys.append(memory_forward(weights, q[:, t : t + 1]))  # eq 15
    if k.shape[1] % chunk_size == 0:
        anchor, anchor_momentum = weights, momentum
    return torch.cat(ys, dim=1), anchor, anchor_momentum
