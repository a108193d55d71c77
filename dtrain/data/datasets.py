"""Built-in data sets, generated or loaded from what a package ships (nothing is downloaded).

Each returns {split: (x uint8 [N, C, H, W], y int64 [N])} plus metadata the model and loss need
(`text`: x uint8 [N, context + 1] byte tokens, y unused).
"""

from __future__ import annotations

import numpy as np

SPLIT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_train = int(SPLIT_FRACTIONS["train"] * len(x))
    n_val = int(SPLIT_FRACTIONS["val"] * len(x))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def digits(seed: int = 0, **_) -> tuple[dict, dict]:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)."""
    images, labels = digits_arrays()
    x = images.astype(np.uint8)[:, None]  # values 0..16
    meta = {"task": "classification", "num_classes": 10, "input_shape": [1, 8, 8], "x_scale": 1 / 16}
    return _split(x, labels.astype(np.int64), seed), meta


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], labels) of the UCI optical handwritten digits (E. Alpaydin, C. Kaynak, 1998; CC BY
    4.0), as scikit-learn ships them: its digits.csv.gz (64 pixels and the label a row) is package data of
    dtrain's (DIGITS_NOTICE.md), so the core install needs neither scikit-learn nor SciPy (~190 MB)."""
    from pathlib import Path

    data = np.loadtxt(Path(__file__).with_name("digits.csv.gz"), delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


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
    meta = {
        "task": "regression",
        "num_classes": 0,
        "input_shape": [1, size, size],
        "x_scale": 1 / 255,
        "params": {"samples": samples, "max_objects": max_objects, "size": size},
    }
    return _split(images, labels.astype(np.int64), seed), meta


def text(seed: int = 0, context: int = 256, num_bytes: int = 1_000_000, **_) -> tuple[dict, dict]:
    """Byte-level language modelling on Python's own stdlib source (nothing downloaded): the .py files under
    sysconfig's stdlib path in a sorted walk (site-packages left out), concatenated, the first `num_bytes`
    cut into non-overlapping windows of context + 1 bytes. A sample's input is window[:-1], its target
    window[1:]. Stored as uint8: one byte per token. (Which bytes depends on the Python version.)"""
    import os
    import sysconfig

    chunks, total = [], 0
    # a lazy walk in sorted order (directory files first, then sorted subdirectories): stops once it has enough
    for top, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(top, name), "rb") as f:
                    chunks.append(f.read())
            except OSError:
                continue
            total += len(chunks[-1])
            if total >= num_bytes:
                break
        if total >= num_bytes:
            break
    tokens = np.frombuffer(b"".join(chunks)[:num_bytes], dtype=np.uint8)
    n = len(tokens) // (context + 1)
    windows = tokens[: n * (context + 1)].reshape(n, context + 1).copy()
    meta = {
        "task": "lm",
        "num_classes": 256,
        "input_shape": [context],
        "x_scale": 1.0,
        "params": {"context": context, "num_bytes": num_bytes},
    }
    return _split(windows, np.zeros(n, np.int64), seed), meta


def photo_folder(out, seed: int = 0, per_class: int = 500, size: int = 32, **_):
    """An image folder of real photographs, two classes (the two photos scikit-learn ships with
    load_sample_images: a Chinese temple and a flower), in torchvision's ImageFolder layout:
    out/china/*.jpg and out/flower/*.jpg, each a random square patch (a tenth to a quarter of the photo's
    height, anywhere in it) resized to size x size, in grey, saved as JPEG. Which photo a patch comes from
    is the task: in grey, from texture and shape (roof tiles, branches, sky against petals and leaves),
    not from colour alone."""
    from pathlib import Path

    from PIL import Image

    try:
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError:
        from ..config import ConfigError

        raise ConfigError(
            "data: the photos data set is cut from the photographs scikit-learn ships; "
            "pip install 'dtrain[photos]' (scikit-learn)"
        ) from None

    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for name, image in zip(("china", "flower"), photos.images):
        photo = Image.fromarray(image)
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = image.shape[:2]
        for i in range(per_class):
            side = int(rng.integers(h // 10, h // 4 + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR).convert("L")
            crop.save(folder / f"{name}-{i:04d}.jpg", quality=90)
    return out


BUILTIN = {"digits": digits, "digits_parity": digits_parity, "count": count, "text": text}
# data sets made as an image folder and sharded by `dtrain shard --from-folder`'s code, as a user's would be
FOLDERS = {"photos": photo_folder}
