"""Randomness inside a learner, derived from an explicit seed and the batch it serves.

Learners that draw something per episode (Siamese pairs, MANN presentation order) must not
touch the global RNG: the same seed and the same episode always give the same draw, so runs
repeat exactly and a resumed run needs no extra state.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor


def content_generator(seed: int, *tensors: Tensor) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and a CRC-32 of the bytes of ``tensors``."""
    crc = 0
    for t in tensors:
        raw = t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy()
        crc = zlib.crc32(raw.tobytes(), crc)
    # torch's CPU generator keeps only 32 bits of its seed, so mix seed and CRC into 32 bits.
    mixed = int(np.random.SeedSequence([int(seed) % 2**63, crc]).generate_state(1)[0])
    return torch.Generator().manual_seed(mixed)


def shuffled_order(generator: torch.Generator, tasks: int, length: int) -> Tensor:
    """``[tasks, length]``: an independent random permutation of ``0..length-1`` per task."""
    return torch.rand(tasks, length, generator=generator).argsort(-1)
