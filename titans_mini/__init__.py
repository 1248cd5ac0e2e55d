"""titans-mini: the Titans architecture (arXiv 2501.00663) and GRPO, built to be read.

The model, one idea a module (none of them knows the experiments below):
    memory         the neural memory as a learner: eq 8-15, token by token
    scan           first-order linear recurrences as a parallel associative scan (eq 18)
    chunked        the parallel chunked update: mini-batch gradient descent (eq 16-18)
    conv           the causal depthwise convolution of q, k, v (section 4.4), its backward written out
    neural_memory  NeuralMemory, the memory as a layer (section 3.1, 4.4)
    attention      causal / sliding-window attention with persistent memory (eq 19)
    config         TitansConfig: one validated object for every model choice
    models         TitansLM with MAC, MAG, MAL (eq 21-31), the memory alone, SWA and Transformer baselines
    checkpoint     save / load a TitansLM (weights_only=True); ASSETS, the shipped files
    grpo           group-relative policy optimisation from scratch
    device         pick_device, seed_everything

Packages that use the model:
    recall         the generated recall experiments: tasks (passkey, MQAR), supervised
                   training, GRPO on recall (rl), long contexts (long_context)
    text           byte-level language modelling of the Python standard library's source,
                   on one process or many (torchrun, DistributedDataParallel)
    hf             Transformers / TRL integration (needs the "hf" extra; never imported here)
"""

from .config import TitansConfig
from .memory import MemoryState, memory_forward, sequential_memory, surprise
from .models import TitansLM
from .neural_memory import NeuralMemory

__version__ = "0.1.0"
__all__ = ["MemoryState", "NeuralMemory", "TitansConfig", "TitansLM", "memory_forward", "sequential_memory",
           "surprise"]
