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


def silu_derivative(h: Tensor, s: Tensor | None = None) -> Tensor:
    """silu'(h) = s (1 + h (1 - s)), s = sigmoid(h) (pass s if you have it)."""
    s = torch.sigmoid(h) if s is None else s
    return s * (1 + h * (1 - s))


def silu_second_derivative(h: Tensor, s: Tensor) -> Tensor:
    """silu''(h) = s (1 - s) (2 + h (1 - 2 s)), s = sigmoid(h)."""
    return s * (1 - s) * (2 + h * (1 - 2 * s))


def token_deltas(weights: Weights, pre: list[Tensor], out: Tensor, v: Tensor, record: list | None = None) -> list[Tensor]:
    """delta_t^l = d l_t / d h_t^l for every token and layer, l_t = ||M(k_t) - v_t||^2.

    Backpropagation written out, because the chunk needs these per-token factors rather
    than summed weight gradients (`torch.func` would hand back one full gradient per token,
    the very tensors we avoid). Tested against autograd. record: a list that gets, for each
    hidden layer l from the bottom, (delta^(l+1) W_(l+1)^T, sigmoid(h^l), silu'(h^l)), for
    `chunk_backward`.
    """
    delta = 2 * (out - v)
    deltas, steps = [delta], []
    for layer in range(len(weights) - 1, 0, -1):
        back, sigmoid = delta @ weights[layer].mT, torch.sigmoid(pre[layer - 1])
        slope = silu_derivative(pre[layer - 1], sigmoid)
        delta = back * slope
        deltas.append(delta)
        steps.append((back, sigmoid, slope))
    if record is not None:
        record.extend(steps[::-1])
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


def read_memory(weights: Weights, momentum: Weights, inputs: list[Tensor], deltas: list[Tensor], q: Tensor,
                coef: dict[str, Tensor], record: list | None = None) -> Tensor:
    """y_t = M_t(q_t), layer by layer, as a causal linear-attention product (fact 2 above):

        z = c_W (x W_0) + c_S (x S_0) + ((x A^T) * c_u) Delta,     x' = silu(z) (z itself at the top)

    record: a list that gets each layer's (x, x A^T, x W_0, x S_0, z), for `chunk_backward`.
    """
    x, top = q, len(weights) - 1
    for layer, (w, s, a, delta) in enumerate(zip(weights, momentum, inputs, deltas)):
        attention, xw, xs = x @ a.mT, x @ w, x @ s
        z = torch.addcmul(coef["read_weights"] * xw, coef["read_momentum"], xs)
        z.baddbmm_(attention * coef["read_u"], delta)
        if record is not None:
            record.append((x, attention, xw, xs, z))
        x = F.silu(z) if layer < top else z
    return x


def chunk_step(weights: Weights, momentum: Weights, q: Tensor, k: Tensor, v: Tensor, coef: dict[str, Tensor],
               write: bool, out: tuple[Weights, Weights] | None = None, tape: dict | None = None) -> Tensor:
    """One chunk: read every token's own memory M_t, then (if `write`) move M and S to the chunk end.

    q, k, v: (B, b, d); coef: this chunk's `chunk_coefficients`, scalars shaped (B, 1, 1)
    or (B, b, 1) to broadcast, read_u (B, b, b). The new state is written into `out` (the
    new weights and momenta, default: over `weights` and `momentum`, in place). No autograd
    here: `ChunkGroup` differentiates it (`chunk_backward`). tape: a dict that gets what the
    backward needs. Returns y (B, b, d).
    """
    backs, reads = ([], []) if tape is not None else (None, None)
    inputs, pre, out_k = memory_activations(weights, k)
    deltas = token_deltas(weights, pre, out_k, v, backs)
    y = read_memory(weights, momentum, inputs, deltas, q, coef, reads)
    if tape is not None:
        tape.update(weights=weights, momentum=momentum, inputs=inputs, pre=pre, deltas=deltas, backs=backs, reads=reads)
    if write:
        new_weights, new_momentum = out or (weights, momentum)
        names = ("end_weights", "end_momentum", "end_u", "momentum_momentum", "momentum_u")
        for args in zip(weights, momentum, inputs, deltas, new_weights, new_momentum):
            state_write(*args, *(coef[name] for name in names))
    return y


def state_write(w, s, a, delta, new_w, new_s, c_w, c_m, c_u, c_s, c_su) -> None:
    """One layer's state at a chunk's end (eq 16-18 unrolled, see the module docstring):

        W' = c_w W + c_m S + A^T (c_u * Delta),    S' = c_s S + A^T (c_su * Delta)

    W, S: (B, i, o) weights and momentum at the chunk start; A (B, b, i) the layer's inputs
    and Delta (B, b, o) its deltas; c_w, c_m, c_s (B, 1, 1) and c_u, c_su (B, b, 1).
    Written into new_w and new_s, which may be w and s themselves (in place).
    """
    torch.mul(w, c_w, out=new_w).addcmul_(c_m, s).baddbmm_(a.mT, c_u * delta)  # W' before S' overwrites S
    torch.mul(s, c_s, out=new_s).baddbmm_(a.mT, c_su * delta)


def batch_dot(x: Tensor, y: Tensor) -> Tensor:
    """<x, y> per batch element, (B, 1, 1), one BLAS dot each: no temporary the size of x (on
    CPU a (1 x n) @ (n x 1) matmul is ~10x slower, and (x * y).sum() allocates the product)."""
    return torch.stack([torch.dot(u, w) for u, w in zip(x.flatten(1), y.flatten(1))]).reshape(-1, 1, 1)


def chunk_backward(tape: dict, coef: dict[str, Tensor], write: bool, g_y: Tensor,
                   g_weights: Weights, g_momentum: Weights) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The chain rule through one `chunk_step`, written out, last operation first.

    g_weights, g_momentum: per layer, dL/dW and dL/dS of the chunk's end state on entry; on
    return, of its start state (updated in place). Returns dL/dq, dL/dk, dL/dv and dL/dcoef.

    Why by hand: autograd's backward of a chunk makes a fresh weight-sized tensor for every
    matmul that reads W or S (each one's gradient) and then adds them up, about eight per layer
    and chunk, each one's pages faulted in afresh; here every contribution is accumulated into
    the same two buffers per layer (`baddbmm_`), the weight-sized tensors' only writes.
    Checked against autograd through the per-token loop, and by gradcheck.
    """
    names = ("weights", "momentum", "inputs", "pre", "deltas", "backs", "reads")
    weights, momentum, inputs, pre, deltas, backs, reads = (tape[name] for name in names)
    depth = len(weights)
    g_in = [torch.zeros_like(a) for a in inputs]  # dL/dA of each layer's key-path inputs
    g_delta = [torch.zeros_like(d) for d in deltas]
    g = {name: torch.zeros_like(value) for name, value in coef.items()}

    # 1. the write (`state_write`), from the chunk-end state back to the chunk start
    for layer in range(depth) if write else ():
        a, delta, gw, gs = inputs[layer], deltas[layer], g_weights[layer], g_momentum[layer]
        a_gw, a_gs = a @ gw, a @ gs  # (B, b, o): each token's rank-one term against dL/dW', dL/dS'
        g_in[layer].baddbmm_(coef["end_u"] * delta, gw.mT).baddbmm_(coef["momentum_u"] * delta, gs.mT)
        g_delta[layer].addcmul_(coef["end_u"], a_gw).addcmul_(coef["momentum_u"], a_gs)
        g["end_u"] += (delta * a_gw).sum(-1, keepdim=True)
        g["momentum_u"] += (delta * a_gs).sum(-1, keepdim=True)
        g["end_weights"] += batch_dot(gw, weights[layer])
        g["end_momentum"] += batch_dot(gw, momentum[layer])
        g["momentum_momentum"] += batch_dot(gs, momentum[layer])
        gs.mul_(coef["momentum_momentum"]).addcmul_(coef["end_momentum"], gw)  # dL/dS before dL/dW changes
        gw.mul_(coef["end_weights"])

    # 2. the read (`read_memory`), top layer first
    g_z = g_y
    for layer in reversed(range(depth)):
        (x, attention, xw, xs, _), w, s = reads[layer], weights[layer], momentum[layer]
        g["read_weights"] += (g_z * xw).sum(-1, keepdim=True)
        g["read_momentum"] += (g_z * xs).sum(-1, keepdim=True)
        g_zw, g_zs = coef["read_weights"] * g_z, coef["read_momentum"] * g_z
        g_weights[layer].baddbmm_(x.mT, g_zw)
        g_momentum[layer].baddbmm_(x.mT, g_zs)
        g_scores = g_z @ deltas[layer].mT  # dL/d((x A^T) * c_u), (B, b, b)
        g["read_u"] += g_scores * attention
        g_attention = g_scores * coef["read_u"]
        g_delta[layer].baddbmm_((attention * coef["read_u"]).mT, g_z)
        g_in[layer].baddbmm_(g_attention.mT, x)
        g_x = (g_zw @ w.mT).baddbmm_(g_zs, s.mT).baddbmm_(g_attention, inputs[layer])
        g_z = g_x * silu_derivative(reads[layer - 1][-1]) if layer else g_x
    g_q = g_z

    # 3. the deltas (`token_deltas`), bottom layer first: delta^l = (delta^(l+1) W_(l+1)^T) * silu'(h^l)
    g_pre = [None] * depth
    for layer, (back, sigmoid, slope) in enumerate(backs):
        g_back = g_delta[layer] * slope
        g_pre[layer] = g_delta[layer] * back * silu_second_derivative(pre[layer], sigmoid)
        g_delta[layer + 1].baddbmm_(g_back, weights[layer + 1])
        g_weights[layer + 1].baddbmm_(g_back.mT, deltas[layer + 1])
    g_pre[-1] = 2 * g_delta[-1]  # delta^top = 2 (out - v), out = h^top
    g_v = -g_pre[-1]

    # 4. the key path (`memory_activations`), top layer first: h^l = A^l W^l, A^(l+1) = silu(h^l)
    for layer in reversed(range(depth)):
        g_weights[layer].baddbmm_(inputs[layer].mT, g_pre[layer])
        g_in[layer].baddbmm_(g_pre[layer], weights[layer].mT)
        if layer:
            g_pre[layer - 1].addcmul_(g_in[layer], backs[layer - 1][2])
    return g_q, g_in[0], g_v, g


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

    When gradients are recorded, the chunks run in groups (`ChunkGroup`), whose backward is
    written out. With `checkpoint_chunks` on, the groups hold about sqrt(n) of the n chunks
    and all but the last are checkpointed: forward keeps only each group's start weights and
    momentum, and backward recomputes one group at a time, so what is held for backward grows
    like sqrt(T) (n / g group starts plus the g chunks of the group being recomputed, least at
    g = sqrt(n)), for one extra forward pass (less the last group's). Off, one group keeps
    every chunk's start state and activations: faster, and fine for short sequences.
    """
    batch, steps, _ = k.shape
    size = chunk_size
    n_chunks = -(-steps // size)
    pad = n_chunks * size - steps
    tokens = [F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v)]  # (F.pad copies even for pad 0)
    q, k, v = (rearrange(t, "b (n c) d -> b n c d", c=size) for t in tokens)
    gates = [rearrange(F.pad(g, (0, pad)), "b (n c) -> b n c", c=size) for g in (theta, eta, alpha)]
    coefs = chunk_coefficients(*gates)  # name -> (B, n, ...)
    recorded = torch.is_grad_enabled()
    group = math.isqrt(n_chunks - 1) + 1 if recorded and checkpoint_chunks else n_chunks  # ceil(sqrt(n)) chunks a group
    # split, not sliced: the backward of a slice writes its gradient into zeros the size of
    # the whole input (a fill of every chunk's q, k, v per chunk); a split's concatenates once
    groups = zip(*(t.split(group, dim=1) for t in (q, k, v, *coefs.values())))
    ys = []
    for start, parts in zip(range(0, n_chunks, group), groups):
        end, depth = min(start + group, n_chunks), len(weights)
        # a last, incomplete chunk's tokens wait in the state: read, not written
        layout = (depth, tuple(coefs), not (end == n_chunks and pad))
        if recorded:  # the last group keeps its tape: backward would recompute it first thing
            outputs = ChunkGroup.apply(layout, end == n_chunks, *weights, *momentum, *parts)
        else:
            outputs = chunk_group(layout, *weights, *momentum, *parts)
        ys += outputs[: end - start]  # one y per chunk, then the L weights and L momenta
        weights, momentum = outputs[end - start : end - start + depth], outputs[end - start + depth :]
    y = torch.cat(ys, dim=1)
    return (y[:, :steps] if pad else y), weights, momentum


def chunk_group(layout: tuple, *tensors: Tensor, tapes: list | None = None) -> tuple[Tensor, ...]:
    """`chunk_step` over consecutive chunks, the state passed on: one unit of checkpointing.

    layout: (memory depth L, the coefficients' names, whether the last chunk is written);
    tensors: L weights, L momenta, then q, k, v (B, g, b, d) and the coefficients (B, g, ...)
    of the g chunks. Returns each chunk's y (B, b, d), then the L new weights and L new momenta
    (the chunks' outputs are concatenated once, for the whole sequence). The chunks write in
    place, on a copy of the state passed in; with `tapes` (a list, filled with one tape per
    chunk for `chunk_backward`), every chunk's start state is kept instead, each in its own
    tensors.
    """
    depth, names, write_last = layout
    weights, momentum = tensors[:depth], tensors[depth : 2 * depth]
    q, k, v, *values = tensors[2 * depth :]
    count = q.shape[1]
    if tapes is None and (write_last or count > 1):  # in place, but never into the caller's tensors
        weights, momentum = tuple(w.clone() for w in weights), tuple(s.clone() for s in momentum)
    ys = []
    for i, (q_i, k_i, v_i, *coef) in enumerate(zip(*(t.unbind(1) for t in (q, k, v, *per_chunk(names, values))))):
        write, tape, out = write_last or i < count - 1, None, None
        if tapes is not None:
            tapes.append(tape := {})
        if tapes is not None and write:  # a fresh state: the tape keeps this chunk's start
            out = tuple(torch.empty_like(w) for w in weights), tuple(torch.empty_like(s) for s in momentum)
        ys.append(chunk_step(weights, momentum, q_i, k_i, v_i, dict(zip(names, coef)), write, out, tape))
        if out is not None:
            weights, momentum = out
    return *ys, *weights, *momentum


def per_chunk(names: tuple[str, ...], values: list[Tensor]) -> list[Tensor]:
    """The coefficients (B, g, ...) shaped to broadcast in a chunk: scalars (B, g, 1, 1),
    token coefficients (B, g, b, 1), read_u (B, g, b, b) as it is."""
    return [value if name == "read_u" else value.reshape(*value.shape[:2], -1, 1) for name, value in zip(names, values)]


class ChunkGroup(torch.autograd.Function):
    """`chunk_group` with its backward written out (`chunk_backward`, chunk by chunk, last first).

    keep: the forward keeps every chunk's tape (start state and activations); otherwise it
    keeps only its inputs (the group's start weights and momentum, and views of q, k, v and
    the coefficients) and backward runs the group again to make the tapes: checkpointing.

    Why not `torch.utils.checkpoint` around autograd: its non-reentrant form records the whole
    graph in forward and drops only the saved tensors. The graph's many small allocations then
    sit between the freed weight-sized tensors in glibc's heap, which can no longer serve the
    next weight-sized tensor from them: at T 4096 the heap grew by the new state at every
    chunk (1.3 GB of heap for 0.37 GB of live tensors after the forward, glibc 2.36). Without
    a graph it stays flat, and the hand-written backward makes no weight-sized temporaries.
    """

    @staticmethod
    def forward(ctx, layout: tuple, keep: bool, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.layout, ctx.tapes = layout, [] if keep else None
        ctx.save_for_backward(*tensors)
        return chunk_group(layout, *tensors, tapes=ctx.tapes)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (depth, names, write_last), tensors = ctx.layout, ctx.saved_tensors
        tapes = ctx.tapes
        if tapes is None:
            chunk_group(ctx.layout, *tensors, tapes=(tapes := []))
        count = len(tapes)
        g_weights = [g.clone() for g in grads[count : count + depth]]  # updated in place, chunk by chunk
        g_momentum = [g.clone() for g in grads[count + depth :]]
        values = per_chunk(names, tensors[2 * depth + 3 :])
        g_tokens = [torch.empty_like(t) for t in tensors[2 * depth : 2 * depth + 3]]  # q, k, v
        g_values = [torch.empty_like(value) for value in values]
        for i in reversed(range(count)):
            coef = {name: value[:, i] for name, value in zip(names, values)}
            *tokens, g_coef = chunk_backward(tapes[i], coef, write_last or i < count - 1, grads[i], g_weights, g_momentum)
            for out, got in zip(g_tokens + g_values, tokens + [g_coef[name] for name in names]):
                out[:, i] = got
        ctx.tapes = None
        g_values = [g.reshape(t.shape) for g, t in zip(g_values, tensors[2 * depth + 3 :])]
        return None, None, *g_weights, *g_momentum, *g_tokens, *g_values
