"""`TitansConfig`: every choice of a Titans language model in one validated object.

A bad value is refused when the config is built, with a message naming the field, so a
typo fails at once rather than deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .checks import check_int

MEMORY_VARIANTS = ("mac", "mag", "mal", "lmm")
VARIANTS = MEMORY_VARIANTS + ("swa", "transformer")


@dataclass(frozen=True)
class TitansConfig:
    """Architecture of a `TitansLM` (paper section 4).

    vocab_size: token ids the model reads and predicts. The default, 149, is the
        vocabulary of the generated recall tasks (`titans_mini.recall.tasks.VOCAB_SIZE`;
        a test keeps both equal) that the notebooks train on; the model itself knows
        nothing of them. Set it for your data (256 for bytes).
    variant:
        "mac"  memory as context (eq 21-25): segments of `window` tokens, full causal
               attention inside a segment over [persistent || retrieved memory || segment];
        "mag"  memory as gate (eq 26-28): sliding-window attention beside the memory;
        "mal"  memory as layer (eq 29-31): the memory, then sliding-window attention;
        "lmm"  the long-term memory alone, no attention;
        "swa"  baseline: a sliding-window-attention Transformer, its MLP widened to about
               the parameter count of the memory variants;
        "transformer"  baseline: the same with full causal attention (no window: every
               past token is seen, and the cache and the cost per token grow with the context).
    window: MAC's segment length C, and the sliding window of MAG, MAL and SWA: either
        way the number of past tokens attention can see (unused by "transformer").
    n_persistent: learnable persistent-memory tokens per attention layer (eq 19).
    memory_depth, memory_expansion, chunk_size, conv_kernel, momentum, forgetting, averaged_momentum:
        passed to `NeuralMemory` (see there). MAC needs `window % chunk_size == 0` so
        that a segment ends where a chunk ends: the next segment reads the memory the
        whole previous segment wrote.
    memory_output_gate: LMM and MAL only: True normalises the memory's output and gates it
        by a linear map of the layer's input before an output projection (section 4.4,
        `models.GatedMemory`); False adds the memory's output to the residual stream as it
        is; None (the default) chooses by variant, as measured on passkey recall with 4
        distractor pairs (3 seeds, 600 steps): on for MAL (beyond attention's reach 0.97 ->
        1.00, final loss 0.30 -> 0.008), off for LMM (1.00 either way, but the gated memory
        alone learned slower: in a 250-step recipe of dim 32 it stayed at chance where the
        plain one reached 0.95). The gate adds 2 dim^2 + dim parameters per memory layer.
    mlp_expansion: hidden width of each block's MLP, in multiples of `dim`.
    checkpoint_memory: recompute memory chunks in backward (`NeuralMemory`'s
        checkpoint_chunks); off by default: our sequences are short, and it is faster.
    """

    vocab_size: int = 149
    dim: int = 64
    n_layers: int = 2
    heads: int = 4
    variant: str = "mac"
    window: int = 32
    n_persistent: int = 4
    memory_depth: int = 2
    memory_expansion: int = 2
    chunk_size: int = 8
    conv_kernel: int = 4
    momentum: bool = True
    forgetting: bool = True
    averaged_momentum: bool = False
    memory_output_gate: bool | None = None
    mlp_expansion: int = 4
    checkpoint_memory: bool = False

    def __post_init__(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "heads", "window", "memory_depth",
                    "memory_expansion", "chunk_size", "mlp_expansion")
        for name in positive:
            check_int(f"TitansConfig.{name}", getattr(self, name), 1)
        for name in ("n_persistent", "conv_kernel"):
            check_int(f"TitansConfig.{name}", getattr(self, name), 0)
        for name in ("momentum", "forgetting", "averaged_momentum", "checkpoint_memory"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TitansConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.memory_output_gate is not None and not isinstance(self.memory_output_gate, bool):
            raise TypeError(f"TitansConfig.memory_output_gate must be None (by variant) or a bool, "
                            f"got {self.memory_output_gate!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"TitansConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"TitansConfig.heads must divide dim={self.dim} into an even head size "
                             f"(rotary embeddings rotate pairs), got heads={self.heads}")
        if self.variant == "mac" and self.window % self.chunk_size:
            raise ValueError(f"TitansConfig.window (MAC's segment length, {self.window}) must be a "
                             f"multiple of chunk_size={self.chunk_size}")

    @property
    def gates_memory_output(self) -> bool:
        """Whether LMM's or MAL's memory output is normalised and gated (see memory_output_gate)."""
        return self.variant == "mal" if self.memory_output_gate is None else self.memory_output_gate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TitansConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TitansConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TitansConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
