"""On-the-fly augmentation of training samples (ShardStream's `transform` hook; never validation or test).

Every random draw comes from a torch.Generator seeded from a hash of (run seed, epoch, pass, sample key),
never from a global RNG. So a sample's augmentation doesn't depend on which rank or DataLoader worker
reads it, nor on what was read before: a run resumed mid-epoch augments exactly as an uninterrupted one,
and the dropout RNG of the training process is left alone.

A user's transform (`data.transform`: any callable, e.g. a torchvision.transforms.v2 pipeline) draws from
the global generators instead; `SeededTransform` runs it with torch's, Python's and NumPy's global
generators seeded from the same hash, which gives it the same guarantees.

Images are float tensors [C, H, W] with pixel values scaled to [0, 1]; results are clamped to it.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

if TYPE_CHECKING:
    from ..config import AugmentConfig

OPS = ("hflip", "vflip", "brightness", "contrast", "noise", "crop")


def sample_seed(seed: int, epoch: int, pass_index: int, key: str) -> int:
    """A seed that depends only on (seed, epoch, pass, key): str hashing is stable across processes."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{pass_index}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(seed: int, epoch: int, pass_index: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, pass_index, key))


def _seed_globals(seed: int) -> None:
    # the CPU generator alone: torch.manual_seed also seeds every device's (~300 us, and the training
    # process's CUDA generator is not the transform's to touch)
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)


class SeededTransform:
    """A transform that draws from the global generators (torch's CPU generator, as torchvision's
    transforms do; Python's `random`; NumPy's legacy one), run with each seeded from (seed, epoch, pass,
    key): the same draws for a sample whichever process reads it and whatever ran before.

    In the training process (no DataLoader workers, or an in-memory split) torch's and Python's
    generators are restored afterwards, so dropout's stream is untouched. NumPy's is left seeded by the
    last sample (saving and restoring it costs ~150 us a sample, more than a small image's decode): still
    deterministic, and checkpointed with the others. A worker's generators serve nothing else: there they
    are only seeded (~20 us a sample)."""

    def __init__(self, fn: Callable, seed: int):
        self.fn, self.seed = fn, seed

    def __call__(self, x, *, key: str, epoch: int, pass_index: int = 0):
        seed = sample_seed(self.seed, epoch, pass_index, key)
        if get_worker_info() is not None:
            _seed_globals(seed)
            return self.fn(x)
        saved = torch.default_generator.get_state(), random.getstate()
        _seed_globals(seed)
        try:
            return self.fn(x)
        finally:
            torch.default_generator.set_state(saved[0])
            random.setstate(saved[1])


class Chain:
    """Transforms applied in order, each with the same (key, epoch, pass)."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, x, *, key: str, epoch: int, pass_index: int = 0):
        for t in self.transforms:
            x = t(x, key=key, epoch=epoch, pass_index=pass_index)
        return x


def chain(*transforms) -> Optional[Callable]:
    """The transforms that are not None, in order; None when there are none."""
    present = [t for t in transforms if t is not None]
    return None if not present else present[0] if len(present) == 1 else Chain(*present)


class Augment:
    """Applies each configured op with its probability, in a fixed order. Picklable (DataLoader workers)."""

    def __init__(self, cfg: AugmentConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    @property
    def active(self) -> list[str]:
        return [op for op in OPS if getattr(self.cfg, op).p > 0]

    def __call__(self, x: torch.Tensor, *, key: str, epoch: int, pass_index: int = 0) -> torch.Tensor:
        g = sample_generator(self.seed, epoch, pass_index, key)
        c = self.cfg
        # One uniform draw per op whether or not it fires, so enabling one op never shifts another's draws.
        fire = torch.rand(len(OPS), generator=g)
        if fire[0] < c.hflip.p:
            x = x.flip(-1)
        if fire[1] < c.vflip.p:
            x = x.flip(-2)
        if fire[2] < c.brightness.p:
            x = x + (torch.rand((), generator=g) * 2 - 1) * c.brightness.max_delta
        if fire[3] < c.contrast.p:
            factor = 1 + (torch.rand((), generator=g) * 2 - 1) * c.contrast.max_factor
            mean = x.mean()
            x = (x - mean) * factor + mean
        if fire[4] < c.noise.p:
            x = x + torch.randn(x.shape, generator=g) * c.noise.std
        if fire[5] < c.crop.p:
            x = random_crop(x, c.crop.max_shift, g)
        return x.clamp(0.0, 1.0)


def random_crop(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by max_shift on every side and cut a window of the original size: a random shift."""
    h, w = x.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=g).tolist()
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    return padded[..., dy : dy + h, dx : dx + w]


def build_augment(cfg: AugmentConfig, seed: int) -> Optional[Augment]:
    """None when every probability is zero: the stream then skips the hook entirely."""
    augment = Augment(cfg, seed)
    return augment if augment.active else None
