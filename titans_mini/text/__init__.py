"""Language modelling on real text: the Python standard library's source, byte by byte.

    data      the corpus: files, a split by path hash, batches of windows
    train     training on one process or many (torchrun, DistributedDataParallel)
    evaluate  whole files streamed with the state: bits per byte by position, sampling

They use the model (`titans_mini.models`); the model never uses them.
"""
