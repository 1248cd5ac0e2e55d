"""Measure and sample a byte-level model on whole files, streamed with its state.

Training reads windows of a few hundred bytes; a file is read here from its first byte
to its last, in pieces, the state carried (the model guarantees the same result as one
pass), so every byte is predicted from everything before it in its file. This is what
the memory is for: a byte far from the start of a file can use what the file said long
before, beyond any attention window.

    file_losses(model, data)          the loss (nats) of every byte of one file, from its start
    loss_by_position(model, files)    bits per byte overall and in bins of position in the file
    continue_file(model, data, n)     stream a file, then generate a continuation of n bytes
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int

POSITION_BINS = (0, 64, 256, 1024, 4096, 16384)  # lower edges: bytes 0-63, 64-255, ..., 16,384 and beyond


@torch.no_grad()
def file_losses(model: nn.Module, data: Tensor, *, piece: int = 2048) -> Tensor:
    """(len(data) - 1,) float: -log p(byte t+1 | bytes 0..t) in nats, for one file's bytes
    `data` (uint8 or int64, 1-D), streamed in pieces of `piece` bytes."""
    if data.ndim != 1 or len(data) < 2:
        raise ValueError(f"data must be one file's bytes, 1-D with at least 2 bytes, got shape {tuple(data.shape)}")
    check_int("piece", piece, 1)
    device = next(model.parameters()).device
    ids = data.long().to(device)[None]
    losses, state = [], None
    for start in range(0, len(data) - 1, piece):
        part = ids[:, start:min(start + piece, len(data) - 1)]
        logits, state = model(part, state)
        target = ids[0, start + 1:start + 1 + part.shape[1]]
        losses.append(F.cross_entropy(logits[0].float(), target, reduction="none"))
    return torch.cat(losses).cpu()


def loss_by_position(model: nn.Module, files: list[Tensor], *, bins: tuple[int, ...] = POSITION_BINS,
                     piece: int = 2048) -> dict:
    """Bits per byte over all `files` (each read whole), and in bins of position inside a file:
    {"bpb", "bytes", "bins": [{"from", "to", "bpb", "bytes"}]} (`to` None for the last bin)."""
    total, count = torch.zeros(len(bins), dtype=torch.float64), torch.zeros(len(bins), dtype=torch.long)
    edges = torch.tensor(bins)
    for data in files:
        if len(data) < 2:
            continue
        losses = file_losses(model, data, piece=piece).double()
        which = torch.bucketize(torch.arange(1, len(data)), edges, right=True) - 1  # position of the predicted byte
        total.index_add_(0, which, losses)
        count.index_add_(0, which, torch.ones_like(which))
    bpb = lambda t, n: (t / n / math.log(2)).item() if n else float("nan")  # noqa: E731
    return {"bpb": bpb(total.sum(), count.sum().item()), "bytes": int(count.sum()),
            "bins": [{"from": lo, "to": hi, "bpb": bpb(total[i], count[i].item()), "bytes": int(count[i])}
                     for i, (lo, hi) in enumerate(zip(bins, list(bins[1:]) + [None]))]}


@torch.no_grad()
def continue_file(model: nn.Module, data: Tensor, n: int, *, temperature: float = 0.8, piece: int = 2048,
                  generator: torch.Generator | None = None) -> bytes:
    """Stream `data` (one file's bytes) through the model in pieces, then sample `n` more
    bytes from where it ends with `TitansLM.generate` (the state holds the whole file).
    Temperature 0 is greedy."""
    check_int("n", n, 1)
    if data.ndim != 1 or len(data) < 1:
        raise ValueError(f"data must be one file's bytes, 1-D and not empty, got shape {tuple(data.shape)}")
    ids, state = data.long().to(next(model.parameters()).device)[None], None
    for part in ids[:, :-1].split(piece, dim=1):
        _, state = model(part, state)
    new, _ = model.generate(ids[:, -1:], n, temperature=temperature, generator=generator, state=state)
    return bytes(new[0].tolist())
