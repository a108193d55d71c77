"""Built-in data sets, generated or loaded from what a package ships (nothing is downloaded).

Each returns {split: (x uint8 [N, C, H, W], y int64 [N])} plus metadata the model and loss need.
"""

from __future__ import annotations

import numpy as np

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = int(SPLIT_FRACTIONS["train"] * len(x))
    n_val = int(SPLIT_FRACTIONS["val"] * len(x))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def digits(seed: int = 0, **_) -> tuple[dict, dict]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # values 0..16
    meta = {"task": "classification", "num_classes": 10, "input_shape": [1, 8, 8], "x_scale": 1 / 16}
    return _split(x, d.target.astype(np.int64), seed), meta


def digits_parity(seed: int = 0, **_) -> tuple[dict, dict]:
    """The digits images and split, labelled even (0) or odd (1): a second task for transfer learning."""
    splits, meta = digits(seed)
    return {k: (x, y % 2) for k, (x, y) in splits.items()}, {**meta, "num_classes": 2}


def count(seed: int = 0, samples: int = 6000, max_objects: int = 9, size: int = 32, **_) -> tuple[dict, dict]:
    """Images with 0..max_objects bright disks on a noisy background; label = how many (regression)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((samples, 1, size, size), np.uint8)
    labels = rng.integers(0, max_objects + 1, samples)
    for i, k in enumerate(labels):
        img = rng.normal(20, 8, (size, size))
        centers: list[tuple[float, float, float]] = []
        while len(centers) < k:  # rejection-sample disks that don't touch, so the count is unambiguous
            r = rng.uniform(1.5, 3.0)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            if all((cy - y0) ** 2 + (cx - x0) ** 2 > (r + r0 + 1.5) ** 2 for y0, x0, r0 in centers):
                centers.append((cy, cx, r))
                img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.uniform(150, 255)
        images[i, 0] = np.clip(img, 0, 255).astype(np.uint8)
    meta = {"task": "regression", "num_classes": 0, "input_shape": [1, size, size], "x_scale": 1 / 255,
            "params": {"samples": samples, "max_objects": max_objects, "size": size}}
    return _split(images, labels.astype(np.int64), seed), meta


BUILTIN = {"digits": digits, "digits_parity": digits_parity, "count": count}
