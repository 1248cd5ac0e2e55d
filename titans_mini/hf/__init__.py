"""Titans with Hugging Face: a `transformers` model, the recall tasks for TRL, and GRPO with TRL.

    modeling   TitansHFConfig, TitansModel, TitansForCausalLM (its state is the generation cache)
    recall     make_tokenizer, passkey_dataset, recall_reward_func: the passkey task for TRL
    trainer    grpo_config, TitansGRPOTrainer: GRPO under TRL with the loss of `titans_mini.grpo`

Needs the "hf" extra (pip install "titans-mini[hf]"); the rest of the package never imports
this one. Everything is importable from here: `from titans_mini.hf import TitansForCausalLM`.
"""

try:
    import datasets  # noqa: F401  (passkey_dataset)
    import transformers  # noqa: F401
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError('titans_mini.hf needs the "hf" extra: pip install "titans-mini[hf]"') from err

from .modeling import TitansCache, TitansForCausalLM, TitansHFConfig, TitansModel
from .recall import make_tokenizer, passkey_dataset, recall_reward_func
from .trainer import TESTED_VERSIONS, TRL_TESTED_RANGE, TitansGRPOTrainer, check_trl_interface, grpo_config

__all__ = ["TESTED_VERSIONS", "TRL_TESTED_RANGE", "TitansCache", "TitansForCausalLM", "TitansGRPOTrainer",
           "TitansHFConfig", "TitansModel", "check_trl_interface", "grpo_config", "make_tokenizer",
           "passkey_dataset", "recall_reward_func"]
