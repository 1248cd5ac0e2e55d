"""The chunked path (eq 16-18) against the per-token loop with the same mini-batch rule."""

import pytest
import torch

from titans_mini import NeuralMemory
from titans_mini.chunked import chunked_memory, memory_activations, token_deltas, transfer_matrix
from titans_mini.memory import associative_loss, sequential_memory


def random_inputs(depth, steps, seed=0, dim=6, hidden=10, batch=2):
    gen = torch.Generator().manual_seed(seed)
    widths = [dim] + [hidden] * (depth - 1) + [dim]
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    weights = tuple(rand(batch, a, b) / a**0.5 for a, b in zip(widths[:-1], widths[1:]))
    momentum = tuple(0.1 * rand(*w.shape) for w in weights)
    q, k, v = (rand(batch, steps, dim) for _ in range(3))
    gates = [torch.rand(batch, steps, generator=gen, dtype=torch.float64) for _ in range(3)]
    gates[0] = 0.3 * gates[0]  # theta
    return weights, momentum, q, k, v, *gates


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("steps", [1, 7, 16, 21])
def test_chunked_equals_per_token_loop_with_the_same_rule(depth, chunk_size, steps):
    inputs = random_inputs(depth, steps, seed=depth * 100 + chunk_size)
    y_ref, w_ref, s_ref = sequential_memory(*inputs, chunk_size=chunk_size)
    y, w, s = chunked_memory(*inputs, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(w + s, w_ref + s_ref):
        torch.testing.assert_close(got, want)


def test_chunk_size_one_is_the_per_token_recurrence():
    memory = NeuralMemory(8, depth=2, chunk_size=1, expansion=2).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    y_chunk, s_chunk = memory(x)
    memory.sequential = True
    y_loop, s_loop = memory(x)
    torch.testing.assert_close(y_chunk, y_loop)
    torch.testing.assert_close(s_chunk.weights[1], s_loop.weights[1])


def test_larger_chunks_are_a_different_algorithm():
    """Eq 16's '=' is loose: gradients at the chunk start differ from per-token ones."""
    inputs = random_inputs(2, 16, seed=5)
    y1, *_ = chunked_memory(*inputs, chunk_size=1)
    y8, *_ = chunked_memory(*inputs, chunk_size=8)
    assert not torch.allclose(y1, y8, atol=1e-6)
    torch.testing.assert_close(y1[:, 0], y8[:, 0])  # the first token reads the same memory


def test_token_deltas_give_the_autograd_gradient_of_any_weighted_loss():
    """sum_j c_j a_j^T delta_j is the gradient of sum_j c_j l_j: the weighted-gradient trick."""
    weights, _, _, k, v, coef, *_ = random_inputs(3, 9)
    inputs, pre, out = memory_activations(weights, k)
    deltas = token_deltas(weights, pre, out, v)
    trick = [a.mT @ (coef[..., None] * d) for a, d in zip(inputs, deltas)]
    for b in range(k.shape[0]):
        single = tuple(w[b].clone().requires_grad_() for w in weights)
        loss = sum(coef[b, j] * associative_loss(single, k[b, j], v[b, j]) for j in range(k.shape[1]))
        for got, want in zip(trick, torch.autograd.grad(loss, single)):
            torch.testing.assert_close(got[b], want)


def test_transfer_matrix_holds_segment_products():
    decay = torch.tensor([[0.5, 0.2, 0.9]], dtype=torch.float64)
    p = transfer_matrix(decay)[0]
    # row t = 1..3, column i = 0..3: prod_{m=i+1..t} decay_m
    expected = torch.tensor(
        [[0.5, 1.0, 0.0, 0.0], [0.1, 0.2, 1.0, 0.0], [0.09, 0.18, 0.9, 1.0]], dtype=torch.float64
    )
    torch.testing.assert_close(p, expected)


def test_long_chunks_do_not_underflow():
    """Products of many small gates stay exact zeros or small numbers, never NaN."""
    decay = torch.full((1, 256), 0.05)
    p = transfer_matrix(decay)
    assert torch.isfinite(p).all()
    assert p[0, -1, -1] == 1 and p[0, -1, -2] == pytest.approx(0.05)


def test_lengths_that_are_not_multiples_of_the_chunk_work():
    memory = NeuralMemory(8, depth=2, chunk_size=8).double()
    x = torch.randn(3, 13, 8, dtype=torch.float64)
    y_chunk, state = memory(x)
    memory.sequential = True
    y_loop, _ = memory(x)
    memory.sequential = False
    assert y_chunk.shape == (3, 13, 8) and state.pending == 5
    torch.testing.assert_close(y_chunk, y_loop)
    short, state = memory(x[:, :3])  # shorter than one chunk: still read and kept
    assert state.pending == 3 and torch.isfinite(short).all()


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("steps, chunk_size", [(7, 3), (16, 4), (5, 8)])
def test_the_written_out_backward_equals_autograd_through_the_per_token_loop(depth, steps, chunk_size):
    """Every input's gradient (weights, momentum, q, k, v, the three gates), through the outputs
    and the final state: the chunks' hand-written backward against autograd differentiating
    the literal loop of the same rule, with and without recomputation."""
    inputs = random_inputs(depth, steps, seed=depth + steps)
    _, want = grads_of(None, inputs, chunk_size)
    for checkpoint_chunks in (False, True):
        _, got = grads_of(checkpoint_chunks, inputs, chunk_size)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("checkpoint_chunks", [False, True])
def test_the_written_out_backward_passes_gradcheck(checkpoint_chunks):
    """Finite differences of every input, float64: 9 tokens in chunks of 2 (the last one unwritten)."""
    inputs = random_inputs(2, 9, dim=3, hidden=4, batch=2)
    leaves = [t.detach().requires_grad_() for t in (*inputs[0], *inputs[1], *inputs[2:])]

    def run(*leaves):
        y, weights, momentum = chunked_memory(leaves[:2], leaves[2:4], *leaves[4:], chunk_size=2, checkpoint_chunks=checkpoint_chunks)
        return y, *weights, *momentum

    assert torch.autograd.gradcheck(run, leaves)


def test_without_gradients_the_callers_state_is_left_as_it_was():
    """Under no_grad the chunks write in place, on a copy: the weights and momentum passed in
    are unchanged, and the result equals that of the out-of-place path (gradients on)."""
    inputs = random_inputs(2, 13, dim=6, hidden=10)
    before = [t.clone() for t in (*inputs[0], *inputs[1])]
    with torch.no_grad():
        y, weights, momentum = chunked_memory(*inputs, chunk_size=4)
    for t, b in zip((*inputs[0], *inputs[1]), before):
        assert torch.equal(t, b)
    y_grad, weights_grad, _ = chunked_memory(*inputs, chunk_size=4)
    torch.testing.assert_close(y, y_grad.detach())
    for w, w_grad in zip(weights, weights_grad):
        torch.testing.assert_close(w, w_grad.detach())


def grads_of(checkpoint_chunks, inputs, chunk_size):
    """Gradients of a loss on y and the final state; checkpoint_chunks None: the per-token loop."""
    leaves = [t.detach().requires_grad_() for t in (*inputs[0], *inputs[1], *inputs[2:])]
    depth = len(inputs[0])
    state = tuple(leaves[:depth]), tuple(leaves[depth : 2 * depth])
    if checkpoint_chunks is None:
        y, weights, momentum = sequential_memory(*state, *leaves[2 * depth :], chunk_size=chunk_size)
    else:
        y, weights, momentum = chunked_memory(*state, *leaves[2 * depth :], chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks)
    loss = y.pow(2).sum() + sum(w.sin().sum() for w in weights) + sum(s.cos().sum() for s in momentum)
    return y, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("steps", [37, 40, 3])  # 10 chunks in groups of 4, the last incomplete; all full; one chunk
def test_checkpointed_groups_give_the_same_outputs_and_gradients(steps):
    """Every input's gradient, through the outputs and the final state, with and without recomputation."""
    *inputs, theta, eta, alpha = random_inputs(2, steps)
    inputs = (*inputs, 0.2 * theta, eta, alpha)  # small steps: 40 random tokens would diverge at 0.3
    (y, plain), (y_ckpt, recomputed) = grads_of(False, inputs, 4), grads_of(True, inputs, 4)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y_ckpt, y)
    for got, want in zip(recomputed, plain):
        torch.testing.assert_close(got, want)


def test_what_the_checkpointed_forward_keeps_grows_like_the_square_root_of_the_length():
    """Bytes left alive for backward by chunked_memory itself: 4x the chunks keeps about 2x the
    bytes with checkpointing (group starts, sqrt(n) of them, dominate), about 4x without."""
    from test_bench import LiveBytes  # counts the storages an op creates that are still alive

    def held(checkpoint_chunks, n_chunks):
        weights, momentum, *rest = random_inputs(2, 2 * n_chunks, dim=16, hidden=256, batch=1)  # a state large beside a token, as in use
        rest = [t.requires_grad_() for t in rest]
        with LiveBytes() as tracker:
            out = chunked_memory(weights, momentum, *rest, chunk_size=2, checkpoint_chunks=checkpoint_chunks)
        return tracker.live() - out[0].nbytes - sum(t.nbytes for t in (*out[1], *out[2]))

    with_checkpoints = held(True, 256) / held(True, 64)
    without = held(False, 256) / held(False, 64)
    assert 1.6 < with_checkpoints < 2.5 and 3.5 < without < 4.5, (with_checkpoints, without)
