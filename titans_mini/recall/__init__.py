"""The generated recall experiments the notebooks train on (no downloads).

    tasks         the vocabulary, passkey (needle in a haystack) and MQAR batches, rewards
    training      supervised passkey training and evaluation
    rl            GRPO on the passkey task: pre-train, measure, fine-tune, measure
    long_context  recall streamed over long contexts; the memory's gates along the way

They use the model (`titans_mini.models`, `titans_mini.grpo`); the model never uses them.
"""
