"""The parallel chunked memory update: Titans section 3.2, eq 16-18.

Split the sequence into chunks of b tokens and take every gradient of a chunk at the
weights of its start, M_0 (mini-batch gradient descent; for b > 1 this is a different
algorithm from the per-token recurrence, whatever eq 16's "=" suggests). Then inside a
chunk, with token-local indices t = 1..b, unrolling eq 10 and eq 13 gives

    S_t = E_t0 S_0 - sum_{j<=t} E_tj theta_j u_j,      E_tj = prod_{m=j+1..t} eta_m
    M_t = D_t0 M_0 + sum_{i<=t} D_ti S_i,               D_ti = prod_{m=i+1..t} (1 - alpha_m)
        = D_t0 M_0 + F_t0 S_0 - sum_{j<=t} F_tj theta_j u_j,    F = D E   (eq 16)

D_t0 is eq 16's beta_t. D and E are "transfer matrices" of the linear recurrence
h_t = a_t h_{t-1} + e_t (eq 18): we get them from `titans_mini.scan` run on one-hot
inputs, which is exact and never divides one cumulative product by another (such a
division underflows on long chunks).

Two facts make the chunk cheap.
1. Each u_j is a sum of rank-one matrices, one per layer: for h = a W the gradient is
   a^T delta with delta = dl/dh. So a chunk's whole update is A^T diag(c) Delta, one
   matmul per layer: the gradient of the weighted loss sum_j c_j l_j at M_0. No per-token
   gradient is ever stored, and memory grows with the chunk, not the sequence.
2. Reading token t's own weights M_t (eq 15, causal: M_t holds tokens <= t only) needs
   no copy of them either: for any input x of layer l,
       x M_t = D_t0 (x W_0) + F_t0 (x S_0) - sum_{j<=t} F_tj theta_j (x . a_j) delta_j,
   a causal linear-attention product (eq 17 for the linear memory, and layer by layer
   for a deep one).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .memory import Weights
from .scan import linear_scan


def memory_activations(weights: Weights, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Forward through the memory MLP keeping each layer's input a and pre-activation h."""
    inputs, pre = [], []
    for i, w in enumerate(weights):
        inputs.append(x)
        x = x @ w
        pre.append(x)
        if i < len(weights) - 1:
            x = F.silu(x)
    return inputs, pre, x


def silu_derivative(h: Tensor) -> Tensor:
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def token_deltas(weights: Weights, pre: list[Tensor], out: Tensor, v: Tensor) -> list[Tensor]:
    """delta_t^l = d l_t / d h_t^l for every token and layer, l_t = ||M(k_t) - v_t||^2.

    Backpropagation written out, because the chunk needs these per-token factors rather
    than summed weight gradients (`torch.func` would hand back one full gradient per token,
    the very tensors we avoid). Tested against autograd.
    """
    delta = 2 * (out - v)
    deltas = [delta]
    for layer in range(len(weights) - 1, 0, -1):
        delta = (delta @ weights[layer].mT) * silu_derivative(pre[layer - 1])
        deltas.append(delta)
    return deltas[::-1]


def transfer_matrix(decay: Tensor) -> Tensor:
    """P[..., t, i] = prod_{m=i+1..t} decay_m for i <= t, else 0; t = 1..b, i = 0..b.

    decay: (..., b). Returns (..., b, b + 1). It is the scan of h_t = decay_t h_{t-1} + e_t
    from h_0 = e_0, with e_i the one-hot vectors: h_t[i] is the weight of step i in step t.
    """
    steps = decay.shape[-1]
    eye = torch.eye(steps + 1, dtype=decay.dtype, device=decay.device)
    inputs = eye[1:].expand(*decay.shape, steps + 1)
    start = eye[0].expand(*decay.shape[:-1], steps + 1)
    return linear_scan(decay, inputs, start)


def chunk_coefficients(theta: Tensor, eta: Tensor, alpha: Tensor) -> dict[str, Tensor]:
    """Every scalar weight of a chunk's update, for all chunks at once. Gates: (B, n, b).

    read_*: the coefficients of M_0, S_0 and u_j in M_t for each token t (shapes (B, n, b)
    and (B, n, b, b), lower-triangular in (t, j)); end_* and momentum_*: the same for M
    and S at the end of the chunk.
    """
    decay, carry = transfer_matrix(1 - alpha), transfer_matrix(eta)  # D, E
    mixed = decay[..., 1:] @ carry  # F = D E
    read_u = -mixed[..., 1:] * theta.unsqueeze(-2)
    return {
        "read_weights": decay[..., 0],
        "read_momentum": mixed[..., 0],
        "read_u": read_u,
        "end_weights": decay[..., -1, 0],
        "end_momentum": mixed[..., -1, 0],
        "end_u": read_u[..., -1, :],
        "momentum_momentum": carry[..., -1, 0],
        "momentum_u": -carry[..., -1, 1:] * theta,
    }


def chunk_step(
    weights: Weights, momentum: Weights, q: Tensor, k: Tensor, v: Tensor, coef: dict[str, Tensor], write: bool
) -> tuple[Tensor, Weights, Weights]:
    """One chunk: read every token's own memory M_t, then (if `write`) move M and S to the chunk end.

    q, k, v: (B, b, d); coef: this chunk's `chunk_coefficients`, scalars shaped (B, 1, 1)
    or (B, b, 1) to broadcast, read_u (B, b, b).
    """
    inputs, pre, out = memory_activations(weights, k)
    deltas = token_deltas(weights, pre, out, v)

    # read: y_t = M_t(q_t), layer by layer, as a causal linear-attention product
    x = q
    for layer, (w, s) in enumerate(zip(weights, momentum)):
        scores = (x @ inputs[layer].mT) * coef["read_u"]
        x = torch.addcmul(coef["read_weights"] * (x @ w), coef["read_momentum"], x @ s)
        x = torch.baddbmm(x, scores, deltas[layer])
        if layer < len(weights) - 1:
            x = F.silu(x)
    if not write:
        return x, weights, momentum

    # write: the chunk's update as weighted sums of rank-one gradients (eq 16-18); without a
    # graph to record, into the state's own storage (`chunk_group` hands each group a copy)
    names = ("end_weights", "end_momentum", "end_u", "momentum_momentum", "momentum_u")
    write_layer = StateWrite.apply if torch.is_grad_enabled() else partial(state_write, in_place=True)
    states = [write_layer(w, s, a, d, *(coef[name] for name in names))
              for w, s, a, d in zip(weights, momentum, inputs, deltas)]
    return x, tuple(w for w, _ in states), tuple(s for _, s in states)


def state_write(w, s, a, delta, c_w, c_m, c_u, c_s, c_su, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """One layer's state at a chunk's end (eq 16-18 unrolled, see the module docstring):

        W' = c_w W + c_m S + A^T (c_u * Delta),    S' = c_s S + A^T (c_su * Delta)

    W, S: (B, i, o) weights and momentum at the chunk start; A (B, b, i) the layer's inputs
    and Delta (B, b, o) its deltas; c_w, c_m, c_s (B, 1, 1) and c_u, c_su (B, b, 1).
    `in_place`: W' and S' overwrite W and S (no gradient can flow through them then).
    Otherwise one fresh weight-sized tensor each, the rest in place on it.
    """
    new_w = w.mul_(c_w) if in_place else c_w * w
    new_w.addcmul_(c_m, s).baddbmm_(a.mT, c_u * delta)  # W' before S' overwrites S
    new_s = s.mul_(c_s) if in_place else c_s * s
    return new_w, new_s.baddbmm_(a.mT, c_su * delta)


class StateWrite(torch.autograd.Function):
    """`state_write` with a hand-written backward.

    Autograd's backward of the formula would make about five weight-sized temporaries per
    matrix (a scalar times a matrix has a matrix-sized gradient, and each scalar's gradient
    <g, W> is a product, then summed). Weight-sized tensors are a chunk's largest (b rows
    against i x o entries), and each fresh one costs page faults and cache misses. Here the
    scalars' gradients are dot products, and the only weight-sized results are the two
    gradients that flow back to W and S. Tested by gradcheck.
    """

    @staticmethod
    def forward(ctx, w, s, a, delta, c_w, c_m, c_u, c_s, c_su):
        ctx.save_for_backward(w, s, a, delta, c_w, c_m, c_u, c_s, c_su)
        return state_write(w, s, a, delta, c_w, c_m, c_u, c_s, c_su)

    @staticmethod
    def backward(ctx, g_w, g_s):
        w, s, a, delta, c_w, c_m, c_u, c_s, c_su = ctx.saved_tensors
        needs = ctx.needs_input_grad

        def dot(x, y):  # <x, y> per batch element, (B, 1, 1), with no temporary the size of x:
            # one BLAS dot each (on CPU a (1 x n) @ (n x 1) matmul is ~10x slower, and
            # (x * y).sum() allocates a weight-sized product, its pages faulted in afresh)
            return torch.stack([torch.dot(u, w) for u, w in zip(x.flatten(1), y.flatten(1))]).reshape(-1, 1, 1)

        a_gw, a_gs = a @ g_w, a @ g_s  # (B, b, o): the gradient of each token's rank-one term
        grads = [
            c_w * g_w if needs[0] else None,
            (c_s * g_s).addcmul_(c_m, g_w) if needs[1] else None,
            torch.baddbmm((c_u * delta) @ g_w.mT, c_su * delta, g_s.mT) if needs[2] else None,
            torch.addcmul(c_u * a_gw, c_su, a_gs) if needs[3] else None,
            dot(g_w, w) if needs[4] else None,
            dot(g_w, s) if needs[5] else None,
            (delta * a_gw).sum(-1, keepdim=True) if needs[6] else None,
            dot(g_s, s) if needs[7] else None,
            (delta * a_gs).sum(-1, keepdim=True) if needs[8] else None,
        ]
        return tuple(grads)


def chunked_memory(
    weights: Weights,
    momentum: Weights,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    *,
    chunk_size: int,
    checkpoint_chunks: bool = True,
) -> tuple[Tensor, Weights, Weights]:
    """Same arguments and results as `titans_mini.memory.sequential_memory`, in parallel.

    Token t reads its own weights M_t (eq 15), built by the mini-batch rule from the
    chunk-start weights and tokens <= t of its chunk only: it never sees a later token.
    A last, incomplete chunk is read but not written; its start weights are returned.

    When gradients are recorded and `checkpoint_chunks` is on, the chunks are checkpointed
    in groups of about sqrt(n) of the n chunks (`RecomputedGroup`): backward keeps only each
    group's start weights and momentum, and recomputes one group at a time (its chunks'
    states and activations), so what is held for backward grows like sqrt(T) (n / g group
    starts plus the g chunks of the group being recomputed, least at g = sqrt(n)), for one
    extra forward pass (less the last group's, whose graph is kept), as with one checkpoint
    per chunk. Off, backward is faster and holds
    every chunk's activations (fine for the short sequences of the small language models).
    """
    batch, steps, _ = k.shape
    size = chunk_size
    n_chunks = -(-steps // size)
    pad = n_chunks * size - steps
    tokens = [F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v)]  # (F.pad copies even for pad 0)
    q, k, v = (rearrange(t, "b (n c) d -> b n c d", c=size) for t in tokens)
    gates = [rearrange(F.pad(g, (0, pad)), "b (n c) -> b n c", c=size) for g in (theta, eta, alpha)]
    coefs = chunk_coefficients(*gates)  # name -> (B, n, ...)
    checkpointed = checkpoint_chunks and torch.is_grad_enabled()
    group = math.isqrt(n_chunks - 1) + 1 if checkpointed else n_chunks  # ceil(sqrt(n)) chunks a group
    # split, not sliced: the backward of a slice writes its gradient into zeros the size of
    # the whole input (a fill of every chunk's q, k, v per chunk); a split's concatenates once
    groups = zip(*(t.split(group, dim=1) for t in (q, k, v, *coefs.values())))
    ys = []
    for start, parts in zip(range(0, n_chunks, group), groups):
        end = min(start + group, n_chunks)
        # a last, incomplete chunk's tokens wait in the state: read, not written
        layout = (len(weights), tuple(coefs), not (end == n_chunks and pad))
        # the last group is not checkpointed: backward would recompute it first thing, so its
        # graph recorded now costs no more memory and saves a recomputation
        run = RecomputedGroup.apply if checkpointed and end < n_chunks else chunk_group
        outputs, count, depth = run(layout, *weights, *momentum, *parts), end - start, len(weights)
        ys += outputs[:count]  # one y per chunk, then the L weights and L momenta
        weights, momentum = outputs[count : count + depth], outputs[count + depth :]
    y = torch.cat(ys, dim=1)
    return (y[:, :steps] if pad else y), weights, momentum



def chunk_group(layout: tuple, *tensors: Tensor) -> tuple[Tensor, ...]:
    """`chunk_step` over consecutive chunks, the state passed on: one unit of checkpointing.

    layout: (memory depth L, the coefficients' names, whether the last chunk is written);
    tensors: L weights, L momenta, then q, k, v (B, g, b, d) and the coefficients (B, g, ...)
    of the g chunks. Returns each chunk's y (B, b, d), then the L new weights and L new momenta
    (the chunks' outputs are concatenated once, for the whole sequence).
    """
    depth, names, write_last = layout
    weights, momentum = tensors[:depth], tensors[depth : 2 * depth]
    q, k, v, *values = tensors[2 * depth :]
    if not torch.is_grad_enabled() and (write_last or q.shape[1] > 1):
        # the chunks then write in place: on a copy, not the caller's state
        weights, momentum = tuple(w.clone() for w in weights), tuple(s.clone() for s in momentum)
    ys, count = [], q.shape[1]
    # per chunk: scalars shaped (B, 1, 1), token coefficients (B, b, 1), read_u (B, b, b)
    values = [value if name == "read_u" else value.reshape(*value.shape[:2], -1, 1) for name, value in zip(names, values)]
    for i, (q_i, k_i, v_i, *coef) in enumerate(zip(*(t.unbind(1) for t in (q, k, v, *values)))):
        write = write_last or i < count - 1
        y, weights, momentum = chunk_step(weights, momentum, q_i, k_i, v_i, dict(zip(names, coef)), write)
        ys.append(y)
    return *ys, *weights, *momentum


class RecomputedGroup(torch.autograd.Function):
    """Checkpointing of one `chunk_group`: its forward records no graph and keeps only its
    inputs (the group's start weights and momentum, and views of q, k, v and the gates'
    coefficients); backward runs it again with a graph and differentiates that.

    Why not `torch.utils.checkpoint`: its non-reentrant form records the whole graph in
    forward and drops only the saved tensors. The graph's many small allocations then sit
    between the freed weight-sized tensors in glibc's heap, which can no longer serve the
    next weight-sized tensor from them: at T 4096 the heap grew by the new state at every
    chunk (1.3 GB of heap for 0.37 GB of live tensors after the forward, glibc 2.36).
    Without a graph in forward it stays flat. The reentrant form does this too, but it
    needs every input as a positional tensor and does not support `torch.autograd.grad`.
    """

    @staticmethod
    def forward(ctx, layout: tuple, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.layout = layout
        ctx.save_for_backward(*tensors)
        return chunk_group(layout, *tensors)  # autograd is off inside a Function's forward

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad[1:]
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            outputs = chunk_group(ctx.layout, *inputs)
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if out.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
        return None, *(next(got) if need else None for need in needs)
