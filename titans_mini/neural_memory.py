"""`NeuralMemory`: the long-term memory as a layer (Titans section 3.1 and 4.4).

x (B, T, dim) -> projections q, k, v (eq 11, 15) -> gates theta, eta, alpha ->
the inner loop of eq 8-15 (chunked by default, token by token on request) -> y (B, T, dim).

The outer loop (ordinary training) learns W_Q, W_K, W_V, the convolution, the gate
maps and the initial memory M_0; the inner loop learns the memory weights at test time.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checks import check_int
from .chunked import chunked_memory
from .conv import causal_depthwise_conv
from .memory import MemoryState, memory_forward, sequential_memory



def inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """The inner loop's dtype: float32 at least (float64 stays, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class NeuralMemory(nn.Module):
    """A deep memory written by gradient descent on eq 12 while it reads.

    Args:
        dim: width of x, keys, values and queries.
        depth: memory MLP layers (>= 1). 1 is a matrix memory (online linear regression).
        chunk_size: tokens per chunk of the mini-batch rule (section 3.2); 1 = per token.
        expansion: hidden width of a deep memory is expansion * dim (paper: unspecified).
        conv_kernel: causal depthwise convolution after the q, k, v projections (4.4;
            paper: depthwise-separable, see `project`);
            0 turns it off.
        qkv_silu, qk_l2norm: SiLU on q, k, v and l2-normalised q, k (4.4); switchable.
        v_l2norm: l2-normalised values too (paper: not normalised; see below).
        momentum, forgetting: False pins eta = 0 or alpha = 0 (ablations of table 5).
        theta_max: the largest inner learning rate; None = 1 / (4 chunk_size) (see below).
        eta_max: the largest momentum gate (see below).
        averaged_momentum: theta_t = (1 - eta_t) theta_max sigmoid(.), so that the momentum
            cannot multiply the inner step (see below). Off by default.
        theta_init, eta_init, alpha_init: the gates' values at initialisation
            (theta_init None = theta_max / 2).
        sequential: run the inner loop one token at a time (`memory.sequential_memory`, the
            reference) instead of in parallel (`chunked.chunked_memory`): the same rule and
            the same outputs, much slower; for checking and teaching. An attribute you may
            switch on an existing memory.
        checkpoint_chunks: recompute groups of about sqrt(n) of the n chunks in backward
            (parallel path), so the memory state kept for training grows like sqrt(T), not
            T; off is faster and keeps every chunk's.

    Gates (paper: "functions of x_t", no formula given): we use one linear map of x_t to
    three logits, theta_t = theta_max * sigmoid(.), eta_t = eta_max * sigmoid(.),
    alpha_t = sigmoid(.), with zero weights and biases set so each gate starts at its
    *_init value. Sigmoids keep eta and alpha in [0, 1] as eq 10 and 13 require.

    Why eta_max = 0.9 (paper: eta in [0, 1]). Momentum sums past steps: with a constant
    eta a repeated surprise moves the memory by theta / (1 - eta) per token, 10x theta at
    eta = 0.9 but 200x at 0.995. Training pushes eta towards 1 (a long memory of surprise
    helps recall), and in our passkey runs the deep memory of the second layer then
    diverged within two chunks (weights from 15 to 10^4, then inf) after 200 steps.

    Why theta_max = 1 / (4 chunk_size) (paper: unspecified). For a unit key k, one step
    of eq 12 shrinks the error M k - v by (1 - 2 theta): stable for theta < 1. The
    mini-batch rule of section 3.2 takes all b gradients of a chunk at the chunk-start
    weights and adds them up; when the chunk's keys point the same way (they do: SiLU
    outputs are positive, so normalised keys share a direction; a haystack repeats the
    same filler) the steps add to b * theta, so the linear memory needs b * theta < 1.
    A deep memory is more curved than that: in our passkey runs (dim 64, depth 2,
    chunk 8) training drove the gates up and the inner loop overflowed within 50 steps
    with a cap of 1 / (2b); with 1 / (4b) it trained to 100% recall. The outer loop can
    still choose any theta below the cap. A theta_max above 1 / b is accepted (to see the
    divergence) with a RuntimeWarning.

    Why averaged_momentum (paper: eta_t and theta_t are free functions of x_t). The cap
    on theta bounds one chunk's step, not what momentum adds up: with the gates constant,
    S tends to -theta / (1 - eta) times the surprise, so a haystack that repeats one surprise
    moves the memory by b theta / (1 - eta) per chunk, up to 2.5 at the caps (b theta_max
    = 1/4, eta_max = 0.9). One of our three long-context LMM seeds learned exactly that in
    its second layer (theta and eta at their caps, alpha near 0, on filler) and its inner
    loop overflowed about 100 tokens into every long prompt, so no longer prompt could
    train it. With theta_t = (1 - eta_t) theta_hat_t, eq 10 is an exponential moving
    average of the scaled surprise (Adam's first moment): S_t = eta_t S_(t-1) - (1 - eta_t)
    theta_hat_t grad, the same family of rules, whose repeated step is at most b theta_max
    whatever eta. The price: a strong momentum writes a lone token (the needle) more weakly.
    theta_init then sets theta_hat; the step starts at (1 - eta_init) theta_init.

    Why unit values (paper: q and k are normalised, v is not). A linear memory's step
    is stable whatever the size of v, but a deep one's is not: the layer-1 gradient is
    proportional to the error times the later layers' weights, so large errors make
    large steps that grow those weights, and training (which is free to grow W_V)
    drove the inner loop to overflow within a few dozen steps in our passkey runs.
    With unit values the error stays O(1). The scale the outer loop needs comes back
    through whatever reads y (a gate's RMSNorm, the next block's norm).

    Initial memory M_0 (paper: unspecified): an outer-loop parameter. A matrix memory
    starts at zero (an empty memory); a deep one at random weights, because all-zero
    layers are a fixed point of gradient descent (each layer's gradient is proportional
    to the other layers' weights).
    """

    def __init__(
        self,
        dim: int,
        depth: int = 2,
        chunk_size: int = 16,
        *,
        expansion: int = 4,
        conv_kernel: int = 4,
        qkv_silu: bool = True,
        qk_l2norm: bool = True,
        v_l2norm: bool = True,
        momentum: bool = True,
        forgetting: bool = True,
        theta_max: float | None = None,
        theta_init: float | None = None,
        eta_max: float = 0.9,
        averaged_momentum: bool = False,
        eta_init: float = 0.5,
        alpha_init: float = 0.01,
        sequential: bool = False,
        checkpoint_chunks: bool = True,
    ):
        super().__init__()
        for name, value in {"dim": dim, "depth": depth, "chunk_size": chunk_size, "expansion": expansion}.items():
            check_int(name, value, 1)
        check_int("conv_kernel (0 = no convolution)", conv_kernel, 0)
        theta_max = 0.25 / chunk_size if theta_max is None else theta_max
        theta_init = theta_max / 2 if theta_init is None else theta_init
        if not theta_max > 0:
            raise ValueError(f"theta_max must be > 0, got {theta_max!r}")
        if theta_max > 1 / chunk_size:
            warnings.warn(f"theta_max={theta_max!r} is above 1 / chunk_size = {1 / chunk_size:.4g}, the bound past which "
                          "even a linear memory's chunked update can diverge (see the NeuralMemory docstring); a deep "
                          f"memory trains stably below about 1 / (4 chunk_size) = {0.25 / chunk_size:.4g}, the default",
                          RuntimeWarning, stacklevel=2)
        if not 0 < eta_max <= 1:
            raise ValueError(f"eta_max must lie in (0, 1], got {eta_max!r}")
        for name, value, high in (("theta_init", theta_init, theta_max), ("eta_init", eta_init, eta_max), ("alpha_init", alpha_init, 1.0)):
            if not 0 < value < high:
                raise ValueError(f"{name} must lie strictly between 0 and {high}, got {value!r}")
        self.dim, self.depth, self.chunk_size = dim, depth, chunk_size
        self.conv_kernel, self.qkv_silu, self.qk_l2norm = conv_kernel, qkv_silu, qk_l2norm
        self.v_l2norm = v_l2norm
        self.momentum, self.forgetting, self.theta_max, self.eta_max = momentum, forgetting, theta_max, eta_max
        self.sequential, self.checkpoint_chunks = sequential, checkpoint_chunks
        self.averaged_momentum = averaged_momentum

        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = nn.Parameter(torch.randn(3 * dim, conv_kernel) / math.sqrt(conv_kernel)) if conv_kernel else None
        self.to_gates = nn.Linear(dim, 3)
        nn.init.zeros_(self.to_gates.weight)
        with torch.no_grad():
            self.to_gates.bias.copy_(torch.logit(torch.tensor([theta_init / theta_max, eta_init / eta_max, alpha_init])))

        widths = [dim] + [expansion * dim] * (depth - 1) + [dim]
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.zeros(d_in, d_out) if depth == 1 else torch.randn(d_in, d_out) / math.sqrt(d_in))
            for d_in, d_out in zip(widths[:-1], widths[1:])
        )

    # ----------------------------------------------------------------- pieces
    def project(self, x: Tensor, conv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, v of eq 11 and 15 (section 4.4), and the convolution's new tail.

        Paper: a depthwise-separable convolution, i.e. a depthwise filter over time then a
        pointwise (1x1) channel mix. We keep the depthwise filter only: the pointwise part
        would be one more dim x dim linear map per q, k, v (3 dim^2 parameters) right after
        the projections W_Q, W_K, W_V, which already mix the channels.
        """
        qkv = self.to_qkv(x)
        if self.conv is not None:
            if conv is None:
                conv = qkv.new_zeros(x.shape[0], self.conv_kernel - 1, 3 * self.dim)
            qkv, conv = causal_depthwise_conv(conv, qkv, self.conv)  # out_t = sum_i w_i * in_{t - K + 1 + i}
        if self.qkv_silu:
            qkv = F.silu(qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.qk_l2norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if self.v_l2norm:
            v = F.normalize(v, dim=-1)
        return q, k, v, conv

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta_t, eta_t, alpha_t, each (B, T): data-dependent (section 3.2)."""
        theta, eta, alpha = torch.sigmoid(self.to_gates(x)).unbind(-1)
        theta, eta = self.theta_max * theta, self.eta_max * eta
        eta = eta if self.momentum else torch.zeros_like(eta)
        theta = theta * (1 - eta) if self.averaged_momentum else theta
        alpha = alpha if self.forgetting else torch.zeros_like(alpha)
        return theta, eta, alpha

    def initial_state(self, batch_size: int, device=None, dtype=None) -> MemoryState:
        """M_0 (learned), S_0 = 0, no pending tokens, an empty convolution tail."""
        like = self.initial_weights[0]
        new = dict(device=device or like.device, dtype=inner_dtype(dtype or like.dtype))
        weights = tuple(w.to(**new).expand(batch_size, *w.shape) for w in self.initial_weights)
        return MemoryState(
            weights=weights,
            momentum=tuple(torch.zeros_like(w) for w in weights),
            keys=torch.zeros(batch_size, 0, self.dim, **new),
            values=torch.zeros(batch_size, 0, self.dim, **new),
            gates=torch.zeros(batch_size, 0, 3, **new),
            conv=None if self.conv is None else torch.zeros(batch_size, self.conv_kernel - 1, 3 * self.dim, **new),
        )

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Write x into the memory and read it back: y_t = M_t(q_t).

        Args:
            x: (B, T, dim), T >= 1.
            state: a `MemoryState` from an earlier call (or None for M_0): feeding a
                stream whole, or in pieces with the state passed on, gives the same
                outputs and the same final state.
        Returns:
            y (B, T, dim) and the new state.

        The inner loop runs in float32 even under bf16/fp16 autocast: its many small
        updates would drown in half-precision rounding.
        """
        self._check_input(x, "x")
        state = self.initial_state(x.shape[0], x.device, x.dtype) if state is None else state
        self._check_state(state, x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            inner = x.to(inner_dtype(x.dtype))
            q, k, v, conv = self.project(inner, state.conv)
            gates = torch.stack(self.gates(inner), dim=-1)
            seen = state.pending  # tokens of the current chunk already in the state
            if seen:  # (torch.cat and F.pad copy even what they leave as it is)
                k, v, gates = (torch.cat([old, new], dim=1) for old, new in ((state.keys, k), (state.values, v), (state.gates, gates)))
                q = F.pad(q, (0, 0, seen, 0))  # those tokens were read in an earlier call
            inputs = (state.weights, state.momentum, q, k, v, *gates.unbind(-1))
            if self.sequential:
                y, weights, momentum = sequential_memory(*inputs, chunk_size=self.chunk_size)
            else:
                y, weights, momentum = chunked_memory(*inputs, chunk_size=self.chunk_size,
                                                      checkpoint_chunks=self.checkpoint_chunks)
            keep = k.shape[1] % self.chunk_size
            start = k.shape[1] - keep
            new_state = MemoryState(weights, momentum, k[:, start:], v[:, start:], gates[:, start:], conv)
        return y[:, seen:].to(x.dtype), new_state

    def retrieve(self, x: Tensor, weights, conv: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Read without writing, y_t = M(q_t) for fixed weights (MAC's eq 21).

        `conv` is the convolution tail of *this* input stream (a reader of a different
        stream from the writer keeps its own). Returns y (B, T, dim) and the new tail.
        """
        self._check_input(x, "x")
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, _, _, conv = self.project(x.to(inner_dtype(x.dtype)), conv)
            y = memory_forward(tuple(weights), q)
        return y.to(x.dtype), conv

    # ------------------------------------------------------------- validation
    def _check_input(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"{name} must have shape (batch, time, dim), got {x.ndim} dims {tuple(x.shape)}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have width dim={self.dim}, got {x.shape[-1]}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{name} is empty: got shape {tuple(x.shape)}; need batch >= 1 and time >= 1")

    def _check_state(self, state: MemoryState, x: Tensor) -> None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState or None, got {type(state).__name__}")
        batch = x.shape[0]
        expected = [(batch, *w.shape) for w in self.initial_weights]
        for name, tensors in (("weights", state.weights), ("momentum", state.momentum)):
            got = [tuple(t.shape) for t in tensors]
            if got != expected:
                raise ValueError(f"state.{name} has shapes {got}, expected {expected}: a state from another memory configuration or batch size")
        if state.pending >= self.chunk_size or state.keys.shape != (batch, state.pending, self.dim):
            raise ValueError(
                f"state holds {state.pending} pending tokens of shape {tuple(state.keys.shape)}; "
                f"expected fewer than chunk_size={self.chunk_size} of shape (batch={batch}, p, dim={self.dim})"
            )
        conv = None if self.conv is None else (batch, self.conv_kernel - 1, 3 * self.dim)
        got = None if state.conv is None else tuple(state.conv.shape)
        if got != conv:
            raise ValueError(f"state.conv has shape {got}, expected {conv} for conv_kernel={self.conv_kernel}")
