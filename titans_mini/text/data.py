"""Real text with no download: the Python standard library's own source, as bytes.

Every Python installation carries its standard library's source (`sysconfig`'s "stdlib"
folder): about 12 MB of `.py` files with long-range structure (a name defined hundreds of
lines before it is used). We read it as bytes, a vocabulary of 256, and split it by file:

    source_files()         the files, relative paths in sorted order, test folders excluded
    split_of(path)         "train" (90%), "valid" (5%) or "test" (5%): a hash of the path
    ByteCorpus(split)      one split as a single byte stream, files joined by a 0 byte
    corpus.batch(...)      a batch of windows, or of pieces of long streams from file starts,
                           the same for a given (seed, step) on every machine
    describe()             the Python version and the files and bytes of each split

The split depends only on a file's relative path, so it is stable across machines; the
byte counts are not (they depend on the Python version), hence `describe`. Nothing is
written to disk.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..checks import check_int

SPLITS = ("train", "valid", "test")
EXCLUDED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SEPARATOR = 0  # a NUL byte never occurs in Python source: it marks where one file ends


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[str]:
    """Relative paths (with "/") of the `.py` files under `root` (default: the standard
    library), sorted, leaving out test folders and installed packages."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a folder")
    paths = (p.relative_to(root) for p in root.rglob("*.py"))
    return sorted(p.as_posix() for p in paths if not EXCLUDED_FOLDERS & set(p.parts[:-1]))


def split_of(path: str) -> str:
    """The split of one file, from the first 8 bytes of the SHA-256 of its relative path:
    90% train, 5% valid, 5% test, whatever the machine."""
    bucket = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


class ByteCorpus:
    """One split of the standard library as bytes: `files` (one uint8 tensor per file, in
    path order) and `stream`, all of them joined, each followed by `SEPARATOR`."""

    def __init__(self, split: str, root: Path | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        root = stdlib_root() if root is None else Path(root)
        self.split = split
        self.paths = [p for p in source_files(root) if split_of(p) == split]
        if not self.paths:
            raise ValueError(f"no .py files of split {split!r} under {root}")
        self.files = [torch.from_numpy(np.frombuffer((root / p).read_bytes(), dtype=np.uint8).copy()) for p in self.paths]
        sep = torch.tensor([SEPARATOR], dtype=torch.uint8)
        self.stream = torch.cat([part for f in self.files for part in (f, sep)])

    def __len__(self) -> int:
        return len(self.stream)

    def batch(self, batch_size: int, seq_len: int, *, seed: int, step: int,
              segments: int = 1) -> tuple[Tensor, Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, targets one byte ahead. They
        depend only on (seed, step), so every process of a distributed run, and a resumed run,
        draws the same global batch and takes its own rows of it.

        segments=1: windows of seq_len + 1 contiguous bytes at random places of the stream.
        segments=K: the rows are K * seq_len bytes of the stream from the start of a file
        (drawn in proportion to its length, so a byte's chance of being read is the same as
        in the test files' bytes), read over K consecutive steps: step s gives piece s % K of
        the streams of episode s // K. A model trained on them carries its state from one
        piece to the next and starts fresh with each episode, as it reads a file at test time."""
        check_int("batch_size", batch_size, 1)
        check_int("segments", segments, 1)
        check_int("seq_len", seq_len, 1, (len(self.stream) - 1) // segments)
        episode, piece = divmod(step, segments)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + episode)
        if segments == 1:
            starts = torch.randint(0, len(self.stream) - seq_len, (batch_size,), generator=generator)
        else:
            lengths = torch.tensor([len(f) + 1 for f in self.files])
            file_starts = lengths.cumsum(0) - lengths
            room = file_starts + segments * seq_len < len(self.stream)  # the whole stream fits before the end
            chosen = torch.multinomial((lengths * room).double(), batch_size, replacement=True, generator=generator)
            starts = file_starts[chosen] + piece * seq_len
        windows = self.stream[starts[:, None] + torch.arange(seq_len + 1)].long()
        return windows[:, :-1], windows[:, 1:]


def describe(root: Path | None = None) -> str:
    """One line per split: files and bytes, and the Python version they come from."""
    root = stdlib_root() if root is None else Path(root)
    paths = source_files(root)
    lines = [f"Python {platform.python_version()} standard library at {root}: {len(paths)} files"]
    for split in SPLITS:
        mine = [p for p in paths if split_of(p) == split]
        size = sum((root / p).stat().st_size for p in mine)
        lines.append(f"  {split:<5} {len(mine):4d} files {size / 1e6:6.2f} MB")
    return "\n".join(lines)
