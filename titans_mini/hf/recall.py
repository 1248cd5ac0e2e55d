"""The recall tasks of `titans_mini.recall.tasks` in Hugging Face form, for TRL.

    make_tokenizer       a word-level tokenizer over `tasks.TOKENS`, built offline
    passkey_dataset      passkey prompts as a `datasets.Dataset`
    recall_reward_func   a TRL reward function: 1.0 where the completion starts with the answer
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..recall.tasks import BOS, EOS, PAD, TOKENS, decode, passkey_prompts, recall_reward


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `tasks.TOKENS`, built offline: "<bos> k3 v7" <-> [1, 24, 92].

    Ids equal `tasks.encode`'s; nothing is added around the text (prompts carry their own
    <bos>); an unknown word raises. Pads on the left, as generation needs.
    """
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(TOKENS)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=TOKENS[PAD], bos_token=TOKENS[BOS],
                                   eos_token=TOKENS[EOS], padding_side="left", model_max_length=1 << 20,
                                   model_input_names=["input_ids", "attention_mask"])


def passkey_dataset(n: int, distances: tuple[int, int], *, n_values: int = 64, seed: int = 0):
    """A `datasets.Dataset` of `n` passkey prompts (`tasks.passkey_prompts`) for TRL: columns
    "prompt" (text) and "answer" (the value's token id), in random order.

    Each row's distance is drawn uniformly from `distances` (inclusive) and preceded by
    `distances[1] - distance` fillers, so every prompt has `distances[1] + 5` tokens: TRL
    then pads nothing and each batch runs as one call (left padding works, but costs one
    call per prompt length). This is the longest-offset layout of `passkey_batch` with
    seq_len = passkey_length(distances[1]), what `training.train_passkey` trains on.
    """
    low, high = distances
    if not (isinstance(n, int) and n >= 1 and 1 <= low <= high):
        raise ValueError(f"need n >= 1 and 1 <= distances[0] <= distances[1], got n={n!r}, distances={distances!r}")
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, high - low + 1, (n,), generator=g), minlength=high - low + 1)
    prompts, answers = [], []
    for distance, count in zip(range(low, high + 1), counts.tolist()):
        if count:
            batch = passkey_prompts(count, distance, prefix=high - distance, n_values=n_values, generator=g)
            prompts += [decode(row) for row in batch["prompt_ids"]]
            answers += batch["answers"].tolist()
    order = torch.randperm(n, generator=g).tolist()
    return Dataset.from_dict({"prompt": [prompts[i] for i in order], "answer": [answers[i] for i in order]})


def recall_reward_func(completion_ids: Sequence[Sequence[int]], answer: Sequence[int], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 where a completion starts with its row's answer (`tasks.recall_reward`).

    TRL passes the dataset's "answer" column and the sampled `completion_ids` by name.
    """
    first = torch.tensor([[ids[0] if len(ids) else PAD] for ids in completion_ids])
    present = torch.tensor([[len(ids) > 0] for ids in completion_ids])
    return recall_reward(first, torch.as_tensor(answer), present).tolist()
