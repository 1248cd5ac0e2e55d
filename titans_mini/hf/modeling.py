"""Titans as a Hugging Face `transformers` model.

    TitansHFConfig       PretrainedConfig: the TitansConfig fields + the names transformers reads
    TitansModel          the backbone: input ids -> last_hidden_state (what TRL's fused log-prob head calls)
    TitansForCausalLM    backbone + head: `generate()`, `save_pretrained` / `from_pretrained` (safetensors)
    TitansCache          the model's state, handed back and forth by `generate`

Importing it registers "titans-mini" with AutoConfig, AutoModel and AutoModelForCausalLM,
so a saved folder loads with `AutoModelForCausalLM.from_pretrained(path)`.

Two things a recurrent memory model does differently from a Transformer:

Cache. Titans carries a *state* per layer (the memory weights and momentum of eq 13-14, the
unfinished chunk, the attention window or segment), not a growing key/value cache. It
travels through `generate` as the model's cache (`TitansCache`), so each new token costs the
same however long the text (TitansLM guarantees that a stream cut anywhere continues as if
uncut). Transformers has renamed that argument (`past_key_values` up to 5.23, `cache` from
5.24), so we take it under either name and return it under the name of the installed
version's output classes. The tokens to run are chosen by the model, not by `generate`:
`prepare_inputs_for_generation` (the hook transformers documents for models with their own
cache, as Mamba's used to be) feeds exactly the tokens the state has not read yet. So if a
future transformers loses the cache between steps, the model re-reads the whole sequence:
slower, never wrong (transformers would otherwise feed the last token alone and the model
would continue from it, silently forgetting the prompt). `use_cache=False` gives the same
tokens at quadratic cost. The state cannot be cropped or reordered: assisted decoding is
refused, and beam search runs only with `use_cache=False` (transformers says so).

Padding. A pad token is not harmless here: the memory would *learn* it (eq 12) and attention
would see it. So `attention_mask` is honoured by running each row on its real tokens only:
rows are grouped by their number of left pads, each group runs without its padding (positions
start at 0, exactly as unpadded), and outputs at pad positions are zeros. Right padding (TRL
pads completions on the right) needs nothing: a causal model never reads ahead. A mask with a
hole (real, pad, real) is refused. Equal-length prompts make one group and cost nothing extra.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..config import TitansConfig
from ..models import TitansLM
from ..recall.tasks import BOS, EOS, PAD

MODEL_TYPE = "titans-mini"


# --------------------------------------------------------------------------- config

class TitansHFConfig(PretrainedConfig):
    """Every `TitansConfig` field as an attribute (validated by TitansConfig), plus what
    transformers and TRL read: `hidden_size`, `num_hidden_layers`, `num_attention_heads`
    (aliases of dim, n_layers, heads) and the <pad>, <bos>, <eos> ids of `tasks`.
    `auto_map = {}`: TRL reads `config.auto_map` unguarded when it loads a reference model.
    """

    model_type = MODEL_TYPE
    auto_map = {}
    attribute_map = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "heads"}

    def __init__(self, pad_token_id: int = PAD, bos_token_id: int = BOS, eos_token_id: int = EOS,
                 use_cache: bool = True, tie_word_embeddings: bool = False, **kwargs: Any):
        if tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be False: TitansLM has its own output head")
        names = {f.name for f in dataclasses.fields(TitansConfig)}
        titans = TitansConfig.from_dict({k: kwargs.pop(k) for k in list(kwargs) if k in names})
        for name, value in titans.to_dict().items():
            setattr(self, name, value)
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=False, **kwargs)

    @classmethod
    def from_titans(cls, config: TitansConfig, **kwargs: Any) -> "TitansHFConfig":
        if not isinstance(config, TitansConfig):
            raise TypeError(f"config must be a TitansConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)

    def to_titans(self) -> TitansConfig:
        return TitansConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(TitansConfig)})


# --------------------------------------------------------------------------- cache and padding

class TitansCache:
    """The cache of a TitansForCausalLM: the TitansLM state of each group of rows.

    groups: [(rows, state)]: `rows` (LongTensor) are the batch rows that had the same number
    of left pads, `state` is the TitansLM state after their real tokens.
    seen: tokens consumed so far, pads included (what `get_seq_length()` reports).
    Not a `transformers.Cache`: it cannot be cropped or reordered, and says so.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, groups: list[tuple[Tensor, list]], seen: int):
        self.groups, self.seen = groups, seen

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen


def _output_cache_name(output_class: type) -> str:
    """The field under which this transformers' outputs carry the cache, and `generate` reads
    it back: "cache" from transformers 5.24, "past_key_values" before."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


def _take_cache(cache: Any, past_key_values: Any) -> TitansCache | None:
    """The cache passed under either name (`cache`, or the older `past_key_values`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    cache = past_key_values if cache is None else cache
    if cache is not None and not isinstance(cache, TitansCache):
        raise TypeError(f"cache (past_key_values) must be None or the TitansCache this model returned, got "
                        f"{type(cache).__name__}")
    return cache


def padding_groups(attention_mask: Tensor | None, batch: int, length: int,
                   device: torch.device) -> list[tuple[Tensor, int]]:
    """Rows grouped by their number of left pads: [(rows, first real position), ...].

    attention_mask (batch, length) of 0/1, None = no padding. Each row must be left pads,
    real tokens, then (optionally) right pads, with at least one real token.
    """
    if attention_mask is None:
        return [(torch.arange(batch, device=device), 0)]
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be a ({batch}, {length}) tensor of 0/1 like input_ids, got "
                         f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
    real = attention_mask.bool()
    if not real.any(1).all():
        raise ValueError("attention_mask: every row needs at least one real (1) token")
    first = real.int().argmax(1)
    last = length - 1 - real.flip(1).int().argmax(1)
    if not torch.equal(real.sum(1), last - first + 1):
        raise ValueError("attention_mask must be left pads, real tokens, right pads in each row (no holes): "
                         "a recurrent memory cannot skip a token in the middle")
    return [((first == s).nonzero().squeeze(1), s) for s in first.unique().tolist()]


# --------------------------------------------------------------------------- models

class TitansPreTrainedModel(PreTrainedModel):
    """What TitansModel and TitansForCausalLM share: the config class, the weight prefix, no cache
    made by transformers, and no re-initialisation (TitansLM's constructors initialise)."""

    config_class = TitansHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # transformers: no assisted decoding (a memory cannot be rolled back)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """False: generate must not make a DynamicCache; the model returns its own TitansCache."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: TitansLM initialises its modules in their constructors."""


class TitansModel(TitansPreTrainedModel):
    """The backbone: forward(input_ids, attention_mask) -> BaseModelOutputWithPast(last_hidden_state).

    Holds the whole TitansLM (its head is used by TitansForCausalLM): last_hidden_state is
    what TitansLM feeds its head, so `head(last_hidden_state)` are the logits. This split is
    what TRL's fused log-prob computation calls: `model.base_model(...)`, then the head.
    """

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        self.lm = TitansLM(config.to_titans())
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.embed

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.lm.embed = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: TitansCache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                past_key_values: TitansCache | None = None, **kwargs: Any) -> BaseModelOutputWithPast:
        """position_ids are ignored: each row's positions start at its first real token.

        cache (or its older name past_key_values): the TitansCache of an earlier call; the
        input_ids then continue it. attention_mask covers the new tokens, or (as `generate`
        passes it) the tokens the cache has seen followed by the new ones.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: TitansModel reads token ids (input_ids)")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a (batch, time >= 1) integer tensor, got "
                             f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}")
        cache = _take_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, length = input_ids.shape
        if cache is None:
            groups = [(rows, start, None) for rows, start in
                      padding_groups(attention_mask, batch, length, input_ids.device)]
        else:  # continuing: every new token is real
            if attention_mask is not None:
                if attention_mask.shape not in ((batch, length), (batch, cache.seen + length)):
                    raise ValueError(f"with a cache that has seen {cache.seen} tokens, attention_mask must have shape "
                                     f"({batch}, {length}) or ({batch}, {cache.seen + length}), got "
                                     f"{tuple(attention_mask.shape)}")
                if not attention_mask[:, -length:].bool().all():
                    raise ValueError("with a cache, the new tokens' attention_mask must be all ones")
            groups = [(rows, 0, state) for rows, state in cache.groups]
        if len(groups) == 1 and groups[0][1] == 0:  # no left padding: one batched call
            rows, _, state = groups[0]
            hidden, state = self.lm.hidden_states(input_ids, state)
            states = [(rows, state)]
        else:
            hidden, states = None, []
            for rows, start, state in groups:
                h, state = self.lm.hidden_states(input_ids[rows, start:], state)
                if hidden is None:
                    hidden = h.new_zeros(batch, length, h.shape[-1])
                hidden[rows, start:] = h
                states.append((rows, state))
        seen = 0 if cache is None else cache.seen
        new_cache = TitansCache(states, seen + length) if use_cache else None
        return BaseModelOutputWithPast(last_hidden_state=hidden, **{_BASE_CACHE: new_cache})


class TitansForCausalLM(TitansPreTrainedModel, GenerationMixin):
    """TitansLM as a transformers causal LM, every variant (mac, mag, mal, lmm, swa, transformer).

    forward(...) -> CausalLMOutputWithPast(loss, logits, past_key_values). `labels` follow
    transformers (unshifted, -100 = ignore): position t is scored on labels[t + 1].
    `logits_to_keep`: an int k > 0 keeps the last k positions (0 = all), a 1-D tensor keeps
    those positions.
    """

    def __init__(self, config: TitansHFConfig):
        super().__init__(config)
        self.model = TitansModel(config)
        self.post_init()

    @classmethod
    def from_titans(cls, lm: TitansLM, **config_kwargs: Any) -> "TitansForCausalLM":
        """Wrap a (trained) TitansLM: a new model with a copy of its weights, on its device."""
        if not isinstance(lm, TitansLM):
            raise TypeError(f"lm must be a TitansLM, got {type(lm).__name__}")
        model = cls(TitansHFConfig.from_titans(lm.config, **config_kwargs))
        model.model.lm.load_state_dict(lm.state_dict())
        return model.to(next(lm.parameters()).device)

    def to_titans(self) -> TitansLM:
        """The wrapped TitansLM (it shares this model's weights)."""
        return self.model.lm

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm.head = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: TitansCache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
                past_key_values: TitansCache | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, Tensor) and logits_to_keep.ndim == 1:
            hidden = hidden[:, logits_to_keep]
        elif isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep >= 0:
            hidden = hidden[:, -logits_to_keep:]  # -0: everything
        else:
            raise ValueError(f"logits_to_keep must be an int >= 0 or a 1-D tensor of positions, got {logits_to_keep!r}")
        logits = self.get_output_embeddings()(hidden)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape or logits.shape[1] != labels.shape[1]:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)} and go with "
                                 f"logits_to_keep=0, got {tuple(labels.shape)}")
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_LM_CACHE: getattr(out, _BASE_CACHE)})

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      use_cache: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """What `generate` feeds the model at each step: the tokens the cache has not read yet.

        transformers' default slices the last `next_sequence_length` tokens, trusting that the
        cache it passes holds the rest; we read the cache's own count instead, so a step
        without a cache re-reads the whole sequence rather than continuing from one token.
        The cache comes under whichever name this transformers uses and goes on as `cache`.
        """
        cache = _take_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        for unused in ("next_sequence_length", "is_first_iteration", "position_ids", "cache_position"):
            kwargs.pop(unused, None)
        if cache is not None:
            if input_ids.shape[1] <= cache.seen:
                raise ValueError(f"generate with a cache needs the whole sequence: the cache has seen {cache.seen} "
                                 f"tokens, input_ids has {input_ids.shape[1]}")
            input_ids = input_ids[:, cache.seen:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache,
                **kwargs}


_BASE_CACHE = _output_cache_name(BaseModelOutputWithPast)
_LM_CACHE = _output_cache_name(CausalLMOutputWithPast)

AutoConfig.register(MODEL_TYPE, TitansHFConfig, exist_ok=True)
AutoModel.register(TitansHFConfig, TitansModel, exist_ok=True)
AutoModelForCausalLM.register(TitansHFConfig, TitansForCausalLM, exist_ok=True)
