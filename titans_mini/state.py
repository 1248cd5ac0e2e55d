"""Streaming state: what a layer carries from one call to the next.

Every layer of the model has the contract `forward(x, state=None) -> (y, state)`: a stream
fed whole, or in pieces with each returned state passed to the next call, gives the same
outputs. Each level has its own state type, all dataclasses of `StreamState`:

    TitansState      one BlockState per block                         (models.TitansLM)
    BlockState       one state per sequence mixer of the block        (models.Block)
    MACState         memory, read weights, segment's attention cache  (models.MemoryAsContext)
    MAGState         attention cache and memory state                 (models.MemoryAsGate)
    KVCache          keys and values attention can still see          (attention.Attention)
    MemoryState      memory weights, momentum, the unfinished chunk   (memory / neural_memory)

and two operations on any of them, applied to every tensor inside:

    state.detach()   cut the gradient: the next call's backward pass stops here. Feeding a
                     long stream in pieces with `state = state.detach()` between them is
                     truncated backpropagation through time: constant memory per piece,
                     the same outputs as without the cut.
    state.to(...)    move (or cast) every tensor, as `Tensor.to` does.
    state.numel()    how many numbers it holds (a tensor shared by two fields counts twice).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor


class StreamState:
    """Base of the state dataclasses: `map_tensors`, `detach`, `to` over all fields,
    nested states and tuples included (ints such as positions are kept)."""

    def map_tensors(self, fn: Callable[[Tensor], Tensor]):
        """A copy with `fn` applied to every tensor inside."""
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), fn)
                                            for f in dataclasses.fields(self) if f.init})

    def detach(self):
        """A copy cut from the autograd graph (truncated backpropagation through time)."""
        return self.map_tensors(Tensor.detach)

    def numel(self) -> int:
        """How many numbers the state holds: the elements of every tensor inside."""
        count = 0

        def add(t: Tensor) -> Tensor:
            nonlocal count
            count += t.numel()
            return t

        self.map_tensors(add)
        return count

    def to(self, *args: Any, **kwargs: Any):
        """A copy with every tensor moved or cast, as `Tensor.to(*args, **kwargs)`."""
        return self.map_tensors(lambda t: t.to(*args, **kwargs))


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, StreamState):
        return value.map_tensors(fn)
    if isinstance(value, tuple):
        return tuple(_map(v, fn) for v in value)
    return value
