"""Generated recall tasks (no downloads): passkey needle-in-a-haystack and MQAR.

Vocabulary (``TOKENS``, ``VOCAB_SIZE`` = 149): ``<pad>``=0, ``<bos>``, ``<key>``,
``<query>``, ``<eos>``, then 16 filler tokens ``f0..f15`` (the haystack), 64 key tokens
``k0..k63`` and 64 value tokens ``v0..v63``. Batches are ``int64`` CPU tensors:
``input_ids (B, T)`` and ``targets (B, T)``, where ``targets`` is ``IGNORE`` (-100, the
``cross_entropy`` default) everywhere except at answer positions, so the loss is taken
only at answers. ``targets[:, t]`` is the token to predict after reading
``input_ids[:, :t + 1]``. All randomness comes from the ``generator`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

from ..checks import check_int

SPECIALS = ["<pad>", "<bos>", "<key>", "<query>", "<eos>"]
PAD, BOS, KEY, QUERY, EOS = range(len(SPECIALS))
N_FILLER, N_KEYS, N_VALUES = 16, 64, 64
FILLER0 = len(SPECIALS)
KEY0 = FILLER0 + N_FILLER
VALUE0 = KEY0 + N_KEYS
TOKENS = (SPECIALS + [f"f{i}" for i in range(N_FILLER)] + [f"k{i}" for i in range(N_KEYS)]
          + [f"v{i}" for i in range(N_VALUES)])
VOCAB_SIZE = len(TOKENS)
IGNORE = -100
_IDS = {token: i for i, token in enumerate(TOKENS)}


def encode(text: str) -> list[int]:
    """``"<bos> k3 v7"`` -> ``[1, 24, 92]`` (tokens separated by spaces)."""
    unknown = [t for t in text.split() if t not in _IDS]
    if unknown:
        raise ValueError(f"text has tokens outside the vocabulary: {unknown[:5]}")
    return [_IDS[t] for t in text.split()]


def decode(ids: Tensor | Sequence[int]) -> str:
    """One sequence of ids (1-D) -> readable tokens separated by spaces."""
    ids = torch.as_tensor(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    return " ".join(TOKENS[i] for i in ids.tolist())


def _sample_pairs(batch: int, n_pairs: int, n_keys: int, n_values: int,
                  generator: torch.Generator | None, distinct_values: bool = False) -> tuple[Tensor, Tensor]:
    """``n_pairs`` distinct keys per row (so every query has one answer), random values
    (distinct too if `distinct_values`)."""
    check_int("n_keys", n_keys, 1, N_KEYS)
    check_int("n_values", n_values, 1, N_VALUES)
    check_int("n_pairs", n_pairs, 1, min(n_keys, n_values) if distinct_values else n_keys)
    keys = torch.rand(batch, n_keys, generator=generator).argsort(1)[:, :n_pairs] + KEY0
    if distinct_values:
        values = torch.rand(batch, n_values, generator=generator).argsort(1)[:, :n_pairs] + VALUE0
    else:
        values = torch.randint(VALUE0, VALUE0 + n_values, (batch, n_pairs), generator=generator)
    return keys, values


HAYSTACKS = ("filler", "noise")


def _noise(batch: int, length: int, avoid: Tensor, generator: torch.Generator | None) -> Tensor:
    """(batch, length) tokens uniform over the filler, key and value tokens, except the two
    tokens of each row's `avoid` (batch, 2): drawn from the 142 others, then shifted past them."""
    avoid = avoid.sort(1).values
    ids = torch.randint(FILLER0, VALUE0 + N_VALUES - 2, (batch, length), generator=generator)
    for column in avoid.unbind(1):        # smaller first: each shift skips one avoided id
        ids += ids >= column[:, None]
    return ids


def passkey_length(distance: int) -> int:
    """The shortest passkey row whose question comes `distance` tokens after the needle:
    ``<bos> <key> k v``, ``distance - 1`` fillers, ``<query> k v`` = ``distance + 6`` tokens."""
    return distance + 6


def _passkey(batch: int, distance: int, seq_len: int, offsets: Tensor | None, n_pairs: int,
             n_keys: int, n_values: int, haystack: str, generator: torch.Generator | None) -> dict[str, Tensor]:
    check_int("batch", batch, 1)
    check_int("distance", distance, 1)
    check_int("seq_len", seq_len, passkey_length(distance))
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    keys, values = _sample_pairs(batch, n_pairs, n_keys, n_values, generator, distinct_values=haystack == "noise")
    n_extra = n_pairs - 1
    if 3 * n_extra > distance - 1:
        raise ValueError(f"n_pairs={n_pairs} distractors need distance >= {3 * n_extra + 1}, got {distance}")
    if haystack == "filler":
        ids = torch.randint(FILLER0, FILLER0 + N_FILLER, (batch, seq_len), generator=generator)
    else:
        ids = _noise(batch, seq_len, torch.stack([keys[:, 0], values[:, 0]], 1), generator)
    if offsets is None:
        offsets = torch.randint(0, seq_len - passkey_length(distance) + 1, (batch,), generator=generator)
    rows, needle = torch.arange(batch), offsets + 3                  # needle = position of the value
    query = needle + distance
    ids[:, 0] = BOS
    for shift, column in ((-2, torch.full_like(needle, KEY)), (-1, keys[:, 0]), (0, values[:, 0]),
                          (distance, torch.full_like(needle, QUERY)),
                          (distance + 1, keys[:, 0]), (distance + 2, values[:, 0])):
        ids[rows, needle + shift] = column
    # distractor triples at random, non-overlapping places among the distance - 1 fillers
    slots = torch.rand(batch, distance - 1 - 2 * n_extra, generator=generator).argsort(1)[:, :n_extra]
    starts = needle[:, None] + 1 + slots.sort(1).values + 2 * torch.arange(n_extra)
    for shift, column in ((0, torch.full_like(starts, KEY)), (1, keys[:, 1:]), (2, values[:, 1:])):
        ids[rows[:, None], starts + shift] = column
    targets = torch.full_like(ids, IGNORE)
    targets[rows, query + 1] = values[:, 0]
    return {"input_ids": ids, "targets": targets}


def passkey_batch(batch: int, distance: int, *, seq_len: int | None = None, n_pairs: int = 1,
                  n_keys: int = N_KEYS, n_values: int = N_VALUES, haystack: str = "filler",
                  generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Passkey retrieval: ``{"input_ids", "targets"}``, both ``(batch, seq_len)``.

    One row: ``<bos> f.. <key> k v f.. <query> k v f..``. The needle's value ``v`` sits
    at position ``p`` = offset + 3, with the offset uniform in ``[0, seq_len - distance - 6]``
    (so positions vary when ``seq_len`` exceeds the minimum ``distance + 6``, the
    default); ``<query>`` sits at ``p + distance``. The only target is ``v`` at the query
    key (``p + distance + 1``): predicting it means reaching ``distance + 1`` tokens
    back, which one window-``w`` attention layer can do iff ``distance + 1 <= w - 1``.
    ``n_pairs - 1`` distractor triples ``<key> k' v'`` (distinct keys) replace fillers
    between the needle and the query; they need ``distance >= 3 (n_pairs - 1) + 1``.

    ``haystack``: "filler" draws the haystack from the 16 filler tokens (a repeated noise
    that carries nothing, like the paper's S-NIAH-PK); "noise" draws it from every filler,
    key and value token except the needle's key and value, and gives the distractors values
    distinct from the needle's: keys and values then appear everywhere, out of place, and
    the answer still appears once before the question, in the needle.
    """
    check_int("distance", distance, 1)
    seq_len = passkey_length(distance) if seq_len is None else seq_len
    return _passkey(batch, distance, seq_len, None, n_pairs, n_keys, n_values, haystack, generator)


def passkey_prompts(batch: int, distance: int, *, prefix: int = 0, n_pairs: int = 1,
                    n_keys: int = N_KEYS, n_values: int = N_VALUES, haystack: str = "filler",
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Passkey prompts for generation / GRPO: ``{"prompt_ids" (B, prefix + distance + 5),
    "answers" (B,)}``. Same layout as ``passkey_batch`` with ``prefix`` haystack tokens before
    the needle, cut right after ``<query> k``: the next token should be the answer."""
    check_int("prefix", prefix, 0)
    check_int("distance", distance, 1)
    rows = _passkey(batch, distance, prefix + passkey_length(distance), torch.full((batch,), prefix),
                    n_pairs, n_keys, n_values, haystack, generator)["input_ids"]
    return {"prompt_ids": rows[:, :-1], "answers": rows[:, -1]}


def mqar_batch(batch: int, n_pairs: int, n_queries: int, *, gap: int = 0, n_keys: int = N_KEYS,
               n_values: int = N_VALUES, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Multi-query associative recall (Arora et al. 2023, Zoology): ``{"input_ids",
    "targets"}`` of shape ``(batch, 2 + 2 n_pairs + gap + 2 n_queries)``.

    One row: ``<bos> k1 v1 .. kn vn f..(gap) <query> q1 a1 .. qm am``: ``n_queries``
    distinct keys of the row, in random order, each followed by its value; the target
    at each ``q_i`` is ``a_i``. Zoology has no ``<query>`` marker; we add one so both
    tasks share a vocabulary and the model knows where recall starts.
    """
    check_int("batch", batch, 1)
    check_int("gap", gap, 0)
    keys, values = _sample_pairs(batch, n_pairs, n_keys, n_values, generator)
    check_int("n_queries", n_queries, 1, n_pairs)
    pick = torch.rand(batch, n_pairs, generator=generator).argsort(1)[:, :n_queries]
    asked, answers = keys.gather(1, pick), values.gather(1, pick)
    pairs = lambda a, b: rearrange(torch.stack([a, b], -1), "b n two -> b (n two)")  # noqa: E731
    ids = torch.cat([torch.full((batch, 1), BOS), pairs(keys, values),
                     torch.randint(FILLER0, FILLER0 + N_FILLER, (batch, gap), generator=generator),
                     torch.full((batch, 1), QUERY), pairs(asked, answers)], 1)
    targets = torch.full_like(ids, IGNORE)
    targets[:, 2 + 2 * n_pairs + gap::2] = answers
    return {"input_ids": ids, "targets": targets}


def recall_reward(completions: Tensor, answers: Tensor, completion_mask: Tensor | None = None) -> Tensor:
    """GRPO reward ``(B,)`` float: 1.0 where the first completion token is the answer
    (and is not masked out by ``completion_mask``), else 0.0."""
    if completions.ndim != 2 or answers.shape != completions.shape[:1]:
        raise ValueError(f"completions must be (B, L) and answers (B,), got "
                         f"{tuple(completions.shape)} and {tuple(answers.shape)}")
    if completion_mask is not None and completion_mask.shape != completions.shape:
        raise ValueError(f"completion_mask must match completions {tuple(completions.shape)}, "
                         f"got {tuple(completion_mask.shape)}")
    if completions.shape[1] == 0:
        return torch.zeros(len(answers), device=completions.device)
    hit = completions[:, 0] == answers
    if completion_mask is not None:
        hit &= completion_mask[:, 0].bool()
    return hit.float()


def answer_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of answer positions (``targets != IGNORE``) where ``argmax logits`` is right."""
    if logits.ndim != 3 or logits.shape[:2] != targets.shape:
        raise ValueError(f"logits must be (B, T, V) and targets (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    at = targets != IGNORE
    if not at.any():
        raise ValueError("targets has no answer positions (all IGNORE)")
    return (logits.argmax(-1)[at] == targets[at]).float().mean()
