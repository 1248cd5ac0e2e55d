"""The neural memory: eq 8-15 token by token, and NeuralMemory's contract."""

import warnings

import pytest
import torch
from torch.func import functional_call
import torch.nn.functional as F

from titans_mini import MemoryState, NeuralMemory
from titans_mini.conv import causal_depthwise_conv
from titans_mini.memory import associative_loss, linear_memory_grad, memory_forward, sequential_memory, surprise


def random_memory(seed=0, **kwargs):
    torch.manual_seed(seed)
    memory = NeuralMemory(**{"dim": 8, "depth": 2, "chunk_size": 4, "expansion": 2, **kwargs}).double()
    with torch.no_grad():  # data-dependent gates, so that the tests see them vary
        memory.to_gates.weight.normal_(0, 0.5)
    return memory


def test_linear_closed_form_gradient_equals_autograd():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    (autograd,) = torch.autograd.grad(sum(associative_loss((w[i],), k[i], v[i]) for i in range(3)), w)
    torch.testing.assert_close(linear_memory_grad(w, k, v), autograd)
    torch.testing.assert_close(surprise((w,), k, v)[0], autograd)


def test_deep_surprise_equals_autograd_per_memory():
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), torch.randn(2, 6, 4, generator=gen, dtype=torch.float64))
    k, v = torch.randn(2, 4, generator=gen, dtype=torch.float64), torch.randn(2, 4, generator=gen, dtype=torch.float64)
    grads = surprise(weights, k, v)
    for b in range(2):
        single = tuple(w[b].clone().requires_grad_() for w in weights)
        expected = torch.autograd.grad(associative_loss(single, k[b], v[b]), single)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got[b], want)


def test_per_token_loop_follows_eq_13_14_by_hand():
    """One matrix memory, three tokens, the recurrence written out with the closed form."""
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(1, 3, 3, generator=gen, dtype=torch.float64)
    q, k, v = (torch.randn(1, 3, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    theta, eta, alpha = torch.tensor([[0.3, 0.2, 0.5]]), torch.tensor([[0.0, 0.9, 0.5]]), torch.tensor([[0.1, 0.0, 0.2]])
    y, (w,), (s,) = sequential_memory((w0,), (torch.zeros_like(w0),), q, k, v, theta, eta, alpha)
    m, mom, outs = w0, torch.zeros_like(w0), []
    for t in range(3):
        mom = eta[0, t] * mom - theta[0, t] * linear_memory_grad(m, k[:, t], v[:, t])
        m = (1 - alpha[0, t]) * m + mom
        outs.append(q[:, t] @ m[0])
    torch.testing.assert_close(y[0], torch.cat(outs))
    torch.testing.assert_close(w, m)
    torch.testing.assert_close(s, mom)


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("cut", [1, 3, 4, 9])
def test_whole_stream_equals_pieces_with_state(sequential, cut):
    memory = random_memory(sequential=sequential)
    x = torch.randn(2, 13, 8, dtype=torch.float64)
    y, state = memory(x)
    y1, mid = memory(x[:, :cut])
    y2, end = memory(x[:, cut:], mid)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y)
    for a, b in zip(end.weights + end.momentum + (end.keys, end.values, end.gates, end.conv), state.weights + state.momentum + (state.keys, state.values, state.gates, state.conv)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sequential", [True, False])
def test_causal_future_tokens_do_not_change_the_past(sequential):
    memory = random_memory(chunk_size=5, sequential=sequential)
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    y, _ = memory(x)
    for t in (0, 3, 7, 11):
        changed = x.clone()
        changed[:, t] += torch.randn(2, 8, dtype=torch.float64)
        y_changed, _ = memory(changed)
        torch.testing.assert_close(y_changed[:, :t], y[:, :t], atol=0, rtol=0)
        assert not torch.allclose(y_changed[:, t], y[:, t])


@pytest.mark.parametrize("sequential", [True, False])
def test_gradcheck_through_the_inner_updates(sequential):
    """Outer-loop gradients reach W_Q, W_K, W_V, the conv, the gates and M_0 through eq 13-14."""
    memory = random_memory(dim=3, chunk_size=2, expansion=1, sequential=sequential)
    x = torch.randn(1, 5, 3, dtype=torch.float64)
    names = [n for n, _ in memory.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in memory.parameters())

    def outputs(*values):
        return functional_call(memory, dict(zip(names, values)), (x,))[0]

    assert torch.autograd.gradcheck(outputs, params)
    grads = torch.autograd.grad(outputs(*params).pow(2).sum(), params)
    reached = {n for n, g in zip(names, grads) if g.abs().sum() > 0}
    assert {"to_qkv.weight", "to_gates.weight", "to_gates.bias", "conv"} <= reached
    assert all(f"initial_weights.{i}" in reached for i in range(2))


def test_switches_pin_gates_and_shape_projections():
    memory = NeuralMemory(6, depth=1, momentum=False, forgetting=False, conv_kernel=0)
    x = torch.randn(2, 5, 6)
    theta, eta, alpha = memory.gates(x)
    assert (eta == 0).all() and (alpha == 0).all() and (theta > 0).all()
    q, k, v, conv = memory.project(x)
    assert conv is None
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(2, 5))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(2, 5))
    _, state = memory(x)
    assert state.conv is None
    raw = NeuralMemory(6, qk_l2norm=False, v_l2norm=False, qkv_silu=False, conv_kernel=0)
    q, k, v, _ = raw.project(x)
    torch.testing.assert_close(torch.cat([q, k, v], -1), raw.to_qkv(x))


def test_matrix_memory_with_one_token_is_one_gradient_step():
    memory = NeuralMemory(4, depth=1, chunk_size=1, conv_kernel=0, momentum=False, forgetting=False)
    x = torch.randn(1, 1, 4)
    q, k, v, _ = memory.project(x)
    theta, _, _ = memory.gates(x)
    y, state = memory(x)
    expected = -theta[0, 0] * linear_memory_grad(torch.zeros(1, 4, 4), k[:, 0], v[:, 0])  # M_0 = 0
    torch.testing.assert_close(state.weights[0], expected)
    torch.testing.assert_close(y[:, 0], memory_forward((expected,), q[:, 0:1])[:, 0])


def test_memory_learns_a_repeated_association():
    """Reading a key the memory has seen recalls its value better than chance."""
    torch.manual_seed(3)
    memory = NeuralMemory(16, depth=1, chunk_size=1, conv_kernel=0, momentum=False, forgetting=False)
    weights, momentum = memory.initial_state(1).weights, memory.initial_state(1).momentum
    k = torch.nn.functional.normalize(torch.randn(1, 8, 16), dim=-1)
    v = torch.randn(1, 8, 16)
    theta, zeros = torch.full((1, 8), 0.4), torch.zeros(1, 8)
    errors = []
    for _ in range(10):  # ten passes over eight pairs; M_0 = 0 starts at relative error 1
        _, weights, momentum = sequential_memory(weights, momentum, k, k, v, theta, zeros, zeros)
        errors.append(((memory_forward(weights, k) - v).pow(2).sum() / v.pow(2).sum()).item())
    assert errors[-1] < 0.1 and errors[-1] < errors[0] < 1


def test_bf16_autocast_keeps_the_inner_loop_in_float32():
    memory = random_memory().float()
    x = torch.randn(2, 9, 8)
    reference, _ = memory(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = memory(x)
    assert all(w.dtype == torch.float32 for w in state.weights + state.momentum)
    torch.testing.assert_close(y.float(), reference, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_with_the_argument_named():
    memory = NeuralMemory(8, depth=2, chunk_size=4)
    with pytest.raises(ValueError, match="x must have shape"):
        memory(torch.randn(5, 8))
    with pytest.raises(ValueError, match="dim=8"):
        memory(torch.randn(1, 5, 7))
    with pytest.raises(TypeError, match="floating point"):
        memory(torch.ones(1, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        memory(torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(8, depth=0)
    with pytest.raises(ValueError, match="chunk_size"):
        NeuralMemory(8, chunk_size=0)
    with pytest.raises(ValueError, match="eta_init"):
        NeuralMemory(8, eta_init=1.5)
    _, other = NeuralMemory(8, depth=1)(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="state.weights"):
        memory(torch.randn(1, 5, 8), other)
    _, two = memory(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="batch size"):
        memory(torch.randn(1, 5, 8), two)
    with pytest.raises(ValueError, match="pending"):
        NeuralMemory(8, depth=2, chunk_size=1)(torch.randn(2, 5, 8), two)
    with pytest.raises(TypeError, match="MemoryState"):
        memory(torch.randn(1, 5, 8), state={"weights": None})


def test_state_detach_and_to():
    memory = random_memory().float()
    _, state = memory(torch.randn(1, 6, 8))
    assert state.weights[0].requires_grad
    cut = state.detach()
    assert isinstance(cut, MemoryState) and not cut.weights[0].requires_grad
    assert cut.to(torch.float64).keys.dtype == torch.float64
    assert cut.pending == 2 and cut.batch_size == 1
    tensors = cut.weights + cut.momentum + (cut.keys, cut.values, cut.gates, cut.conv)
    assert cut.numel() == sum(t.numel() for t in tensors)


def test_theta_max_above_the_stability_bound_warns_and_does_diverge():
    """The docstring's bound theta * chunk_size < 1 is real: a linear memory reading one
    repeated token stays bounded just below it and blows up above it; above it, a warning
    names the bound."""
    x = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(0)).expand(1, 256, 16)
    norms = {}
    for theta_max in (0.9 / 8, 1.5 / 8):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            memory = NeuralMemory(16, depth=1, chunk_size=8, theta_max=theta_max, theta_init=0.99 * theta_max,
                                  momentum=False, forgetting=False)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert bool(messages) == (theta_max > 1 / 8)
        assert all("1 / chunk_size = 0.125" in m for m in messages)
        with torch.no_grad():
            norms[theta_max] = memory(x.contiguous())[0][0, -1].norm().item()
    assert norms[0.9 / 8] < 10 and not norms[1.5 / 8] < 1e6, norms


def test_averaged_momentum_keeps_the_inner_loop_bounded_where_plain_momentum_overflows():
    """Gates at their caps (theta_max, eta_max 0.9, no forgetting) on one repeated token: the
    momentum multiplies the step by 1 / (1 - eta) = 10 and the deep memory's weights overflow; with
    averaged_momentum, theta_t = (1 - eta_t) theta_hat_t, the same gates stay bounded."""
    x = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(0)).expand(1, 2048, 16).contiguous()
    outputs = {}
    for averaged in (False, True):
        torch.manual_seed(0)
        memory = NeuralMemory(16, depth=2, chunk_size=8, averaged_momentum=averaged)
        with torch.no_grad():
            memory.to_gates.bias.copy_(torch.tensor([20.0, 20.0, -20.0]))  # sigmoid 1, 1, 0
            theta, eta, _ = memory.gates(x)
            outputs[averaged] = max(w.abs().max().item() for w in memory(x)[1].weights)
        expected = memory.theta_max * (1 - eta) if averaged else torch.full_like(theta, memory.theta_max)
        torch.testing.assert_close(theta, expected)
    assert not outputs[False] < 1e6 and outputs[True] < 10, outputs  # the largest memory weight (NaN: overflowed)


@pytest.mark.parametrize("taps", [1, 2, 4])
@pytest.mark.parametrize("steps", [9, 2, 1])  # shorter than the tail too
def test_causal_depthwise_conv_matches_conv1d_and_gradcheck(taps, steps):
    """The hand-written convolution equals F.conv1d with one group per channel over the tail
    followed by x, its new tail is the last K - 1 of those steps, and its backward (tail, x
    and taps) equals finite differences (gradcheck, float64)."""
    torch.manual_seed(0)
    tail = torch.randn(2, taps - 1, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, steps, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, taps, dtype=torch.float64, requires_grad=True)
    padded = torch.cat([tail, x], dim=1)
    out, new_tail = causal_depthwise_conv(tail, x, weight)
    torch.testing.assert_close(out, F.conv1d(padded.mT, weight.unsqueeze(1), groups=5).mT)
    torch.testing.assert_close(new_tail, padded[:, padded.shape[1] - (taps - 1) :])
    assert torch.autograd.gradcheck(lambda *args: causal_depthwise_conv(*args)[0], (tail, x, weight))
