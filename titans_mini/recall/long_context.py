"""Passkey recall over long contexts, and what the memory's gates do along the way.

A needle thousands of tokens back cannot be evaluated in one forward pass over a batch on a
laptop (the activations grow with the length), but a `TitansLM` carries a state of fixed
size: we feed each prompt in pieces of `piece` tokens, passing the state on, and read the
answer at the end. The model guarantees that this equals one pass over the whole prompt.

    stream(model, ids)                 feed a long input in pieces, the state passed on (from `training`)
    streamed_recall(model, distance)   greedy recall accuracy with the needle `distance` back
    gate_trace(model, ids)             theta_t, eta_t, alpha_t (and the surprise) of every memory layer, per token
    surprise_trace(memory, x)          ||grad of eq 12|| at every token: what the memory found surprising
    survival(alpha)                    prod (1 - alpha_t): how much of a write forgetting leaves (on the CPU)
    time_per_token(model, context)     ms per new token after `context` tokens, and the state's size

The haystack is the passkey task's (`tasks.passkey_prompts`): random filler tokens from
16 (or, with haystack="noise", any key, value or filler token but the needle's, and
distractor pairs), the needle `<key> k v` at the start, the question `<query> k` at the end.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import Tensor, nn

from ..checks import check_int
from ..memory import surprise
from ..neural_memory import NeuralMemory
from .tasks import passkey_prompts
from .training import pairs_at, stream


@torch.no_grad()
def streamed_recall(model: nn.Module, distance: int, *, n: int = 64, piece: int = 1024, seed: int = 1234,
                    haystack: str = "filler", distractors: int = 0) -> float:
    """Greedy accuracy on `n` passkey prompts whose question comes `distance` tokens after
    the value (chance 1/64), each prompt streamed in pieces of `piece` tokens. `haystack`
    and `distractors` (other key/value pairs, as many as fit) as in `tasks.passkey_batch`."""
    check_int("distance", distance, 1)
    check_int("piece", piece, 1)
    device = next(model.parameters()).device
    prompts = passkey_prompts(n, distance, n_pairs=pairs_at(distance, distractors), haystack=haystack,
                              generator=torch.Generator().manual_seed(seed))
    ids, answers = prompts["prompt_ids"].to(device), prompts["answers"].to(device)
    logits, _ = stream(model, ids, piece)
    diverged = (~torch.isfinite(logits[:, -1]).all(-1)).sum().item()
    if diverged:  # a NaN's argmax is some token: counted as a miss, and said
        warnings.warn(f"{diverged} of {n} prompts (distance {distance}, {haystack} haystack) gave non-finite logits: "
                      f"a memory's inner loop diverged on them", RuntimeWarning, stacklevel=2)
    return (logits[:, -1].argmax(-1) == answers).float().mean().item()


@torch.no_grad()
def gate_trace(model: nn.Module, ids: Tensor, *, piece: int = 1024, with_surprise: bool = False) -> list[dict[str, Tensor]]:
    """The gates of every `NeuralMemory` in `model` at every token of `ids` (B, T), streamed
    in pieces: a list (one entry per memory layer, in model order) of
    {"theta", "eta", "alpha"} (and "surprise" if `with_surprise`), each (B, T'), where
    T' = T for every variant (MAC's memory reads one attention output per token).

    Gates are functions of what the memory is given to write (section 3.2), so they are
    read off the memory's input with a forward hook, without changing the model.
    The surprise is the norm of eq 12's gradient at each token, ||grad l(M; k_t, v_t)||
    (eq 8's momentary surprise, `surprise_trace`): slower, as the memory is replayed chunk by chunk.
    """
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    if not memories:
        raise ValueError("the model has no NeuralMemory (the attention baselines 'swa' and 'transformer' have none)")
    inputs: dict[int, list[Tensor]] = {i: [] for i in range(len(memories))}
    hooks = [m.register_forward_hook(lambda module, args, out, i=i: inputs[i].append(args[0]))
             for i, m in enumerate(memories)]
    try:
        stream(model, ids, piece)
    finally:
        for hook in hooks:
            hook.remove()
    trace = []
    for memory, xs in zip(memories, inputs.values()):
        x = torch.cat(xs, dim=1).float()
        theta, eta, alpha = memory.gates(x)
        trace.append({"theta": theta, "eta": eta, "alpha": alpha})
        if with_surprise:
            trace[-1]["surprise"] = surprise_trace(memory, x)
    return trace


@torch.no_grad()
def surprise_trace(memory: NeuralMemory, x: Tensor) -> Tensor:
    """(B, T): ||grad l(M; k_t, v_t)|| of eq 12 at every token of the memory's input x (B, T, dim),
    taken at the weights M the chunked rule uses for it (those at the start of its chunk,
    section 3.2), over all the memory's weight matrices. The memory is replayed chunk by chunk."""
    state, norms = memory.initial_state(x.shape[0], x.device, x.dtype), []
    for part in x.split(memory.chunk_size, dim=1):
        _, k, v, _ = memory.project(part, state.conv)
        n = part.shape[1]
        weights = tuple(w.repeat_interleave(n, dim=0) for w in state.weights)
        grads = surprise(weights, k.flatten(0, 1), v.flatten(0, 1))
        norms.append(sum(g.pow(2).flatten(1).sum(1) for g in grads).sqrt().view(-1, n))
        _, state = memory(part, state)
    return torch.cat(norms, dim=1)


def survival(alpha: Tensor) -> Tensor:
    """prod_t (1 - alpha_t) along the last axis: the share of a write that forgetting (eq 13)
    leaves after the tokens of `alpha`, ignoring what later writes overwrite."""
    return torch.log1p(-alpha.detach().to("cpu", torch.float64)).sum(-1).exp()  # on the CPU: MPS has no float64


@torch.no_grad()
def time_per_token(model: nn.Module, context: int, *, blocks: int = 5, block: int = 16) -> tuple[float, int]:
    """(median ms per new token, numbers in the state) after a passkey prompt of `context`
    tokens streamed in pieces: `blocks` blocks of `block` single-token steps are timed and the
    median block taken (a laptop's timings jump with whatever else it is doing)."""
    device = next(model.parameters()).device
    ids = passkey_prompts(1, context, generator=torch.Generator().manual_seed(0))["prompt_ids"].to(device)
    logits, state = stream(model, ids)
    token, times = logits[:, -1:].argmax(-1), []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(block):
            logits, state = model(token, state)
            token = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
        times.append(1e3 * (time.perf_counter() - start) / block)
    return sorted(times)[blocks // 2], state.numel()
