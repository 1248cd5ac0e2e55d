"""The causal depthwise convolution of q, k and v (section 4.4), with its backward written out.

Each channel c is filtered over time on its own: with K taps w_c0..w_c(K-1), the input x
and the K - 1 steps before it (the tail, zeros at the start of a stream),

    out_t,c = sum_i w_ci * in_(t - K + 1 + i),c        (causal: nothing after t)

where in_j is x_j for j >= 0 and the tail's step j for j < 0. Tap i reads x shifted by
s = K - 1 - i steps, and the tail for the first s outputs.

Why not `F.conv1d(..., groups=channels)`: on CPU its depthwise backward is several times
slower than the forward. Why not the shift-and-add in autograd (a sum of K shifted slices of
the padded input times the taps): padding copies the whole input, and the backward writes each
slice's gradient into zeros the size of the whole input and allocates a fresh input-sized
product per tap. Here the forward is one output and K - 1 in-place multiply-adds, the
backward the same for the input's gradient, and one product buffer for the taps'.
Tested against F.conv1d and by gradcheck.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_depthwise_conv(tail: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """tail: (B, K - 1, C), the steps before x; x: (B, T, C); weight: (C, K).

    Returns the output (B, T, C), out_t = sum_i weight[:, i] * in_(t - K + 1 + i), and the
    new tail, the last K - 1 steps of tail followed by x.
    """
    if tail.shape[1] != weight.shape[1] - 1:
        raise ValueError(f"tail must hold K - 1 = {weight.shape[1] - 1} steps, got {tail.shape[1]}")
    steps = x.shape[1]
    new_tail = x[:, steps - tail.shape[1] :] if steps >= tail.shape[1] else torch.cat([tail[:, steps:], x], dim=1)
    return CausalDepthwiseConv.apply(tail, x, weight), new_tail


def shifts(taps: int, steps: int):
    """(tap i, its shift s, how many outputs read x, how many read the tail) for taps 0..K-2."""
    for i in range(taps - 1):
        s = taps - 1 - i
        yield i, s, max(steps - s, 0), min(s, steps)


class CausalDepthwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(tail, x, weight)
        taps, steps = weight.shape[1], x.shape[1]
        out = x * weight[:, -1]  # the last tap reads step t itself
        for i, s, on_x, on_tail in shifts(taps, steps):
            out[:, s:].addcmul_(x[:, :on_x], weight[:, i])
            out[:, :on_tail].addcmul_(tail[:, i : i + on_tail], weight[:, i])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        tail, x, weight = ctx.saved_tensors
        taps, steps = weight.shape[1], x.shape[1]
        grad_tail = torch.zeros_like(tail)
        grad_x = grad * weight[:, -1]  # out_t read x_(t - s) with tap i: the gradient flows back there
        for i, s, on_x, on_tail in shifts(taps, steps):
            grad_x[:, :on_x].addcmul_(grad[:, s:], weight[:, i])
            grad_tail[:, i : i + on_tail].addcmul_(grad[:, :on_tail], weight[:, i])
        grad_weight = None
        if ctx.needs_input_grad[2]:  # d out / d w_ci = in_(t - s),c, summed over batch and time
            product = torch.empty(grad.numel(), dtype=grad.dtype, device=grad.device)
            columns = []
            for i, s, on_x, on_tail in shifts(taps, steps):
                shifted = product[: x[:, :on_x].numel()].view(x.shape[0], on_x, x.shape[2])  # contiguous: a faster sum
                column = torch.mul(grad[:, s:], x[:, :on_x], out=shifted).sum((0, 1))
                columns.append(column + (grad[:, :on_tail] * tail[:, i : i + on_tail]).sum((0, 1)))
            columns.append(torch.mul(grad, x, out=product.view(x.shape)).sum((0, 1)))
            grad_weight = torch.stack(columns, dim=-1)
        return grad_tail, grad_x, grad_weight
