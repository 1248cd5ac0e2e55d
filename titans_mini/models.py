"""Titans language models (paper section 4): MAC, MAG, MAL, the memory alone, and a baseline.

    TitansLM: ids -> embedding -> n_layers x Block -> RMSNorm -> head -> logits

Each Block is pre-norm with residuals, x + mixer(norm(x)) then x + MLP(norm(x)); the
variant decides the mixers:

    mac  MemoryAsContext                 eq 21-25
    mag  MemoryAsGate                    eq 26-28
    mal  GatedMemory, then Attention     eq 29-31 (each with its own residual; section 4.4's output gate)
    lmm  NeuralMemory                    the long-term memory alone (GatedMemory on request)
    swa  Attention (sliding window)      baseline, MLP widened to match parameters
    transformer  Attention (full causal)  baseline, the same without a window

Every mixer has the same streaming contract, `forward(x, state=None) -> (y, state)`:
a stream fed whole or in pieces, passing the state on, gives the same outputs. So
`TitansLM.generate` feeds one token at a time with constant work per token: the memory
state and the attention window are the whole "cache", however long the context (except
for the full-attention baseline, whose cache keeps every token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import Attention, KVCache
from .checks import check_int
from .config import MEMORY_VARIANTS, TitansConfig
from .memory import MemoryState
from .neural_memory import NeuralMemory
from .state import StreamState


def make_memory(config: TitansConfig) -> NeuralMemory:
    return NeuralMemory(config.dim, config.memory_depth, config.chunk_size,
                        expansion=config.memory_expansion, conv_kernel=config.conv_kernel,
                        momentum=config.momentum, forgetting=config.forgetting,
                        averaged_momentum=config.averaged_momentum,
                        checkpoint_chunks=config.checkpoint_memory)


def make_attention(config: TitansConfig, window: int | None) -> Attention:
    return Attention(config.dim, config.heads, n_persistent=config.n_persistent, window=window)


class GatedOutput(nn.Module):
    """The paper's `y (x) M(.)` of eq 25 and 28: o = W_O (RMSNorm(y) * sigmoid(RMSNorm(m))).

    Paper: "normalise both with learnable vector weights, then a non-linearity" (MAG),
    no formula. We normalise each branch (RMSNorm, learnable scale), squash the memory
    branch with a sigmoid so it acts as a gate on the attention branch, and project.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm_y, self.norm_m = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        return self.out(self.norm_y(y) * torch.sigmoid(self.norm_m(m)))


class GatedMemory(nn.Module):
    """The memory as a layer with section 4.4's output: o = W_O (RMSNorm(m) * sigmoid(W_g x)),
    m = NeuralMemory(x). Used by MAL, and by LMM on request (`TitansConfig.memory_output_gate`).

    Paper: "normalization and gating with a linear layer before the final output
    projection", no formula. We normalise the memory's read-out (RMSNorm, learnable
    scale), gate it elementwise with a sigmoid of a linear map of the layer's input x
    (so each token decides how much of the memory to let through), and project.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.memory = make_memory(config)
        self.norm = nn.RMSNorm(config.dim)
        self.to_gate = nn.Linear(config.dim, config.dim)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        m, state = self.memory(x, state)
        return self.out(self.norm(m) * torch.sigmoid(self.to_gate(x))), state


@dataclass
class MACState(StreamState):
    """Streaming state of `MemoryAsContext`.

    memory: the NeuralMemory state, written with every attention output so far.
    read_weights: M_{t-1}, the memory as it was when the current segment began (eq 21).
    read_conv: the retrieval's convolution tail over the input stream.
    cache: attention keys/values of the current segment's tokens so far.
    pos: tokens seen.
    """

    memory: MemoryState
    read_weights: tuple[Tensor, ...]
    read_conv: Tensor | None
    cache: KVCache | None
    pos: int


class MemoryAsContext(nn.Module):
    """MAC (eq 21-25). For each segment S of C = `window` tokens:

        h   = M*_{t-1}(q),  q from S                  eq 21  read the memory, no write
        y   = Attn([persistent || h || S])            eq 22-23
        M_t = M_{t-1} written with y                  eq 24
        o   = y (x) M*_t(y)                           eq 25  (`GatedOutput`)

    Causality inside a segment. Attention over the concatenation [h || S] would let token
    i see h_j of a later token j (h_j comes from q_j, hence from x_j). We interleave
    instead, [h_1, x_1, h_2, x_2, ...], and apply plain causal attention: token i then
    sees exactly h_j and x_j for j <= i, and the persistent tokens. The outputs at the
    x positions are y. Eq 25 reads M_t after the whole segment was written (erratum: a
    token would see later tokens' writes); we read the NeuralMemory's output for y_i,
    which has been written with y_1..y_i only (per chunk, see `titans_mini.chunked`).
    `window % chunk_size == 0` makes segment ends chunk ends, so M_{t-1} is complete.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.segment = config.window
        self.memory = make_memory(config)
        self.attention = make_attention(config, window=None)
        self.gate = GatedOutput(config.dim)

    def forward(self, x: Tensor, state: MACState | None = None) -> tuple[Tensor, MACState]:
        if state is None:
            memory = self.memory.initial_state(x.shape[0], x.device, x.dtype)
            state = MACState(memory, memory.weights, None, None, 0)
        outputs, start = [], 0
        while start < x.shape[1]:
            offset = state.pos % self.segment
            piece = x[:, start : start + self.segment - offset]
            if offset == 0:  # a new segment: read what all earlier segments wrote
                read_weights, cache = state.memory.weights, None
            else:
                read_weights, cache = state.read_weights, state.cache
            h, read_conv = self.memory.retrieve(piece, read_weights, state.read_conv)
            tokens = rearrange([h, piece], "two b t d -> b (t two) d")
            y, cache = self.attention(tokens, cache)
            y = y[:, 1::2]
            m, memory = self.memory(y, state.memory)
            outputs.append(self.gate(y, m))
            state = MACState(memory, read_weights, read_conv, cache, state.pos + piece.shape[1])
            start += piece.shape[1]
        return torch.cat(outputs, dim=1), state


@dataclass
class MAGState(StreamState):
    """Streaming state of `MemoryAsGate`: the sliding window's keys and values, and the memory."""

    attention: KVCache
    memory: MemoryState


class MemoryAsGate(nn.Module):
    """MAG (eq 26-28): sliding-window attention and the memory side by side on the same x,

        y = SW-Attn([persistent || x]),   m = M(x),   o = y (x) m   (`GatedOutput`).

    Paper: the memory's input also starts with the persistent tokens; we do not write
    them, because the memory's initial weights M_0 are themselves learned and
    input-independent, which is what writing the same fixed tokens first amounts to.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.attention = make_attention(config, window=config.window)
        self.memory = make_memory(config)
        self.gate = GatedOutput(config.dim)

    def forward(self, x: Tensor, state: MAGState | None = None) -> tuple[Tensor, MAGState]:
        cache, memory = (None, None) if state is None else (state.attention, state.memory)
        y, cache = self.attention(x, cache)
        m, memory = self.memory(x, memory)
        return self.gate(y, m), MAGState(cache, memory)


def make_mixers(config: TitansConfig) -> list[nn.Module]:
    """The sequence mixers of one block, each used as x + mixer(norm(x))."""
    if config.variant == "mac":
        return [MemoryAsContext(config)]
    if config.variant == "mag":
        return [MemoryAsGate(config)]
    if config.variant in ("mal", "lmm"):
        # MAL (eq 29): paper y = M([persistent || x]); as for MAG, we do not write the persistent
        # tokens into the memory: the learned M_0 already plays the part of a fixed prefix written first.
        memory = GatedMemory(config) if config.gates_memory_output else make_memory(config)
        if config.variant == "mal":  # eq 29-31: the memory layer, then attention over its output
            return [memory, make_attention(config, window=config.window)]
        return [memory]
    return [make_attention(config, window=None if config.variant == "transformer" else config.window)]


def mlp_hidden(config: TitansConfig) -> int:
    """MLP width. The attention-only baselines (SWA, Transformer) get the parameters MAG's
    memory branch adds (memory + gate - attention), spent on a wider MLP, so models compare
    at about equal size."""
    hidden = config.mlp_expansion * config.dim
    if config.variant in MEMORY_VARIANTS:
        return hidden
    with torch.device("meta"):  # count without allocating or touching the RNG
        extra = sum(p.numel() for p in MemoryAsGate(config).parameters())
        extra -= sum(p.numel() for p in make_attention(config, config.window).parameters())
    return hidden + round(extra / (2 * config.dim + 1))


@dataclass
class BlockState(StreamState):
    """Streaming state of a `Block`: one state per sequence mixer, in order (MAL: memory, attention)."""

    mixers: tuple


@dataclass
class TitansState(StreamState):
    """Streaming state of a `TitansLM`: one `BlockState` per block. `tokens`: how many it has read."""

    blocks: tuple[BlockState, ...]
    tokens: int


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)) for each mixer, then x + MLP(norm(x))."""

    def __init__(self, config: TitansConfig):
        super().__init__()
        self.mixers = nn.ModuleList(make_mixers(config))
        self.mixer_norms = nn.ModuleList(nn.RMSNorm(config.dim) for _ in self.mixers)
        hidden = mlp_hidden(config)
        self.mlp_norm = nn.RMSNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim))

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        states = (None,) * len(self.mixers) if state is None else state.mixers
        new_states = []
        for mixer, norm, s in zip(self.mixers, self.mixer_norms, states):
            y, s = mixer(norm(x), s)
            x = x + y
            new_states.append(s)
        return x + self.mlp(self.mlp_norm(x)), BlockState(tuple(new_states))


class TitansLM(nn.Module):
    """A causal language model of any `TitansConfig` variant.

    forward(input_ids (B, T), state=None) -> (logits (B, T, vocab), state)
    hidden_states(input_ids, state=None) -> (h (B, T, dim), state)   (logits = head(h))
    generate(input_ids, max_new_tokens, ...) -> (new ids (B, n), state)

    `state` is a `TitansState` (None = the start of a stream): pass the returned one to the
    next call to continue the stream; `state.detach()` between calls cuts the gradient there
    (truncated backpropagation through time) without changing the outputs.
    """

    def __init__(self, config: TitansConfig):
        super().__init__()
        if not isinstance(config, TitansConfig):
            raise TypeError(f"config must be a TitansConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, input_ids: Tensor, state: TitansState | None) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor, got {got}")
        if input_ids.ndim != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape (batch >= 1, time >= 1), got {tuple(input_ids.shape)}")
        if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"got values in [{int(input_ids.min())}, {int(input_ids.max())}]")
        if state is not None and not (isinstance(state, TitansState) and len(state.blocks) == len(self.blocks)):
            raise TypeError(f"state must be None or the TitansState of {len(self.blocks)} blocks returned by an "
                            f"earlier call of this model, got {type(state).__name__}")

    def hidden_states(self, input_ids: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        self._check(input_ids, state)
        x = self.embed(input_ids.long())
        blocks = (None,) * len(self.blocks) if state is None else state.blocks
        new_blocks = []
        for block, s in zip(self.blocks, blocks):
            x, s = block(x, s)
            new_blocks.append(s)
        tokens = input_ids.shape[1] + (0 if state is None else state.tokens)
        return self.norm(x), TitansState(tuple(new_blocks), tokens)

    def forward(self, input_ids: Tensor, state: TitansState | None = None) -> tuple[Tensor, TitansState]:
        h, state = self.hidden_states(input_ids, state)
        return self.head(h), state

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, state: TitansState | None = None
                 ) -> tuple[Tensor, TitansState]:
        """Stream `max_new_tokens` tokens after `input_ids`, one forward step per token.

        temperature 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
        Pass `state` to continue a stream (input_ids then follow what it has seen). The
        returned state continues after the last generated token, which it has read.
        """
        check_int("max_new_tokens", max_new_tokens, 1)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
        logits, state = self(input_ids, state)
        new = []
        for _ in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature == 0:
                token = last.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator)
            new.append(token)
            logits, state = self(token, state)
        return torch.cat(new, dim=1), state
