"""`dtrain shard --from-folder DIR`: a folder of images with a subfolder per class (torchvision's ImageFolder
layout) as webdataset shards and their descriptors.

Each image keeps its encoded bytes: member `jpg` for .jpg/.jpeg, else its lower-case extension (png, bmp,
webp, ...), beside its class index (`cls`) and its path under DIR (`path.txt`: which file a sample was).
Classes are the class subfolder names in sorted order, ImageFolder's indices; the descriptors list them
(`classes`) with the sample mapping {x: <the image extensions>, y: cls}, so `data.dataset=folder:OUT`
trains on them as they are.

Splits: when DIR's subfolders are `train` (and `val`, `test`), each a class-per-subfolder tree, that split
is the data set's own and is kept. Otherwise each class's images are split by a seeded shuffle: the
`test` and `val` fractions of each class, the rest for training, so every split holds every class in
proportion. A split's samples are shuffled (seeded) before they are written, so every shard mixes the
classes: a shuffle buffer alone would see one class at a time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from .errors import DataError
from .shards import ShardIndex, write_split_shards

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val", "test")


def _images(folder: Path) -> list[Path]:
    """Image files under `folder`, in a sorted walk (subfolders too, as ImageFolder finds them)."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        found += [Path(top) / f for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _classes(tree: Path) -> dict[str, list[Path]]:
    return {d.name: _images(d) for d in sorted(tree.iterdir(), key=lambda p: p.name) if d.is_dir()}


def _member(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def shard_folder(
    src: str | Path,
    out: str | Path,
    shard_size: int,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    progress: bool = False,
) -> ShardIndex:
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"data: image folder {src} does not exist")
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise DataError(f"data: --val-fraction {val} and --test-fraction {test} must leave images for training")
    subdirs = {d.name for d in src.iterdir() if d.is_dir()}
    rng = random.Random(seed)
    if "train" in subdirs and subdirs <= set(SPLITS):  # the data set's own split
        trees = {split: _classes(src / split) for split in SPLITS if split in subdirs}
        classes = sorted({c for tree in trees.values() for c in tree})
        label = {c: i for i, c in enumerate(classes)}
        splits = {split: [(p, label[c]) for c, paths in tree.items() for p in paths] for split, tree in trees.items()}
    else:
        tree = _classes(src)
        classes = list(tree)
        splits = {split: [] for split in SPLITS}
        for label, paths in enumerate(tree.values()):
            paths = paths[:]
            rng.shuffle(paths)
            n_test, n_val = round(test * len(paths)), round(val * len(paths))
            splits["test"] += [(p, label) for p in paths[:n_test]]
            splits["val"] += [(p, label) for p in paths[n_test : n_test + n_val]]
            splits["train"] += [(p, label) for p in paths[n_test + n_val :]]
    if not classes or not splits.get("train"):
        raise DataError(f"data: {src} holds no images in class subfolders ({src}/CLASS/*.jpg, png, ...)")
    extensions = sorted({_member(p) for items in splits.values() for p, _ in items}, key=lambda e: (e != "jpg", e))

    def samples(split: str, items: list):
        items = items[:]
        rng.shuffle(items)
        for i, (path, label) in enumerate(items):
            yield {
                "__key__": f"{split}-{i:07d}",
                _member(path): path.read_bytes(),
                "cls": label,
                "path.txt": str(path.relative_to(src)),
            }

    meta = {
        "task": "classification",
        "num_classes": len(classes),
        "classes": classes,
        "sample": {"x": ";".join(extensions), "y": "cls"},
    }
    return write_split_shards(
        out,
        {split: (samples(split, items), len(items)) for split, items in splits.items() if items},
        meta,
        shard_size,
        progress,
    )
