"""First-order linear recurrences, sequentially and as a parallel associative scan.

Titans section 3.2, eq 18: once every surprise u_t of a chunk is known, momentum
`S_t = eta_t S_{t-1} - theta_t u_t` and forgetting `M_t = (1 - alpha_t) M_{t-1} + S_t`
are both of the form

    h_t = a_t * h_{t-1} + b_t                                        (1)

with a scalar coefficient a_t per step and b_t of any shape. Two steps compose into one:
applying (a_1, b_1) then (a_2, b_2) gives h = a_2 a_1 h + (a_2 b_1 + b_2), so

    (a_1, b_1) . (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)               (2)

is associative, and all prefixes of (1) come out of a scan in ceil(log2 T) rounds:
in round r every position t >= 2^r combines with position t - 2^r (Hillis & Steele).
Each round is a handful of whole-tensor operations, so the Python loop has log T
iterations instead of T. (The scan does O(T log T) work against the loop's O(T);
on a GPU the shorter critical path wins, and for the chunk lengths Titans uses the
extra work is small.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(a: Tensor, b: Tensor, h0: Tensor | None) -> None:
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"a and b must be floating point tensors, got {a.dtype} and {b.dtype}")
    if a.ndim < 1 or b.shape[: a.ndim] != a.shape:
        raise ValueError(
            f"a must have the leading shape of b with time as its last axis: "
            f"got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.shape[-1] == 0:
        raise ValueError("the time axis (last axis of a) is empty")
    expected = b.shape[: a.ndim - 1] + b.shape[a.ndim :]
    if h0 is not None and h0.shape != expected:
        raise ValueError(f"h0 must have shape {tuple(expected)} (b without its time axis), got {tuple(h0.shape)}")


def linear_scan_loop(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Every h_t of eq (1), one step at a time: the reference the scan is tested against.

    Args:
        a: coefficients, shape (*batch, T). Time is a's last axis.
        b: inputs, shape (*batch, T, *trailing).
        h0: optional initial state, shape (*batch, *trailing); zero when omitted.
    Returns:
        h with the shape of b.
    """
    _check(a, b, h0)
    time = a.ndim - 1
    a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    h = torch.zeros_like(b.select(time, 0)) if h0 is None else h0
    out = []
    for t in range(b.shape[time]):
        h = a.select(time, t) * h + b.select(time, t)
        out.append(h)
    return torch.stack(out, dim=time)


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Every h_t of eq (1) with a parallel associative scan in ceil(log2 T) rounds.

    Same arguments and result as `linear_scan_loop`. Differentiable.
    """
    _check(a, b, h0)
    time = a.ndim - 1
    steps = b.shape[time]
    a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    if h0 is not None:  # fold h0 into the first input: h_1 = a_1 h0 + b_1
        first = a.narrow(time, 0, 1) * h0.unsqueeze(time) + b.narrow(time, 0, 1)
        b = torch.cat([first, b.narrow(time, 1, steps - 1)], dim=time)
    offset = 1
    while offset < steps:
        keep = steps - offset
        a_cur, b_cur = a.narrow(time, offset, keep), b.narrow(time, offset, keep)
        a_prev, b_prev = a.narrow(time, 0, keep), b.narrow(time, 0, keep)
        # eq (2): combine each position with the one `offset` steps earlier
        b = torch.cat([b.narrow(time, 0, offset), a_cur * b_prev + b_cur], dim=time)
        a = torch.cat([a.narrow(time, 0, offset), a_cur * a_prev], dim=time)
        offset *= 2
    return b
