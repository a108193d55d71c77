"""A stranger's code and data for the user-path matrix (tests/test_matrix.py): shards written with webdataset's
own TarWriter (jpg images, token arrays), a transform, a Hugging Face model fed dict batches, its own loss and
metric. Nothing here is dtrain's; the config route names these functions by import string, the script route
(matrix_script.py) hands them to dtrain.main."""

import io
from pathlib import Path

import numpy as np
import torch


def write_jpg_shards(root: Path, shard_size: int = 400) -> list[Path]:
    """scikit-learn's 8x8 digits as 16x16 greyscale JPEGs (`jpg` + `cls` members), train/val/test."""
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    splits = {"train": range(0, 1200), "val": range(1200, 1500), "test": range(1500, len(images))}
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for split, rows in splits.items():
        rows = list(rows)
        for n, start in enumerate(range(0, len(rows), shard_size)):
            written.append(root / f"{split}-{n:04d}.tar")
            with wds.TarWriter(str(written[-1])) as sink:
                for i in rows[start : start + shard_size]:
                    buf = io.BytesIO()
                    Image.fromarray(images[i]).resize((16, 16)).save(buf, format="JPEG", quality=90)
                    sink.write({"__key__": f"digit{i:05d}", "jpg": buf.getvalue(), "cls": int(digits.target[i])})
    return written


def jitter(x: torch.Tensor) -> torch.Tensor:
    """A user's augmentation: a random shift of up to 2 pixels (torch's generator, seeded per sample by dtrain)."""
    dy, dx = torch.randint(-2, 3, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


PACKAGES = ("json", "email", "unittest", "xml")  # the classes of the token shards
TOKENS = 48


def write_token_shards(root: Path, per_class: int = 120, shard_size: int = 160) -> list[Path]:
    """Byte tokens of standard-library source (`ids.npy`, int64, TOKENS long) labelled by package (`cls`)."""
    import importlib.util

    import webdataset as wds

    rows = []
    for label, package in enumerate(PACKAGES):
        folder = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
        text = b"".join(p.read_bytes() for p in sorted(folder.rglob("*.py")))
        for i in range(per_class):
            rows.append((f"{package}{i:04d}", np.frombuffer(text[i * TOKENS : (i + 1) * TOKENS], np.uint8), label))
    rows.sort(key=lambda r: r[0][::-1])  # classes interleaved
    splits = {
        "train": rows[: len(rows) * 3 // 4],
        "val": rows[len(rows) * 3 // 4 : len(rows) * 7 // 8],
        "test": rows[len(rows) * 7 // 8 :],
    }
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for split, part in splits.items():
        for n, start in enumerate(range(0, len(part), shard_size)):
            written.append(root / f"{split}-{n:04d}.tar")
            with wds.TarWriter(str(written[-1])) as sink:
                for key, ids, label in part[start : start + shard_size]:
                    buf = io.BytesIO()
                    np.save(buf, ids.astype(np.int64))
                    sink.write({"__key__": key, "ids.npy": buf.getvalue(), "cls": label})
    return written


def to_fields(raw: dict) -> dict:
    """A raw webdataset sample -> the Hugging Face model's keyword arguments (a dict batch: model(**batch))."""
    return {"input_ids": torch.from_numpy(np.load(io.BytesIO(raw["ids.npy"]))), "labels": int(raw["cls"])}


def bert(num_labels: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=256,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TOKENS,
            num_labels=num_labels,
        )
    )


def hf_loss(output, batch):
    return output.loss  # the model's own cross-entropy, from batch["labels"]


def hf_metrics(output, batch):
    return {"acc": (output.logits.argmax(-1) == batch["labels"]).sum().float()}  # a per-batch sum
