"""Which standard-library package a snippet of Python source comes from: text classification on shards
written by webdataset's own TarWriter (a `.txt` and a `.cls` member per sample), read as string fields
by `data.sample: {x: txt, y: cls}` and turned into byte tokens by `collate`, for a Hugging Face BERT built
from a small config (configs/snippets.yaml; the script route is examples/snippets_script.py).

    PYTHONPATH=examples python -m snippets data/snippets      # the shards and their descriptors, once
"""

import importlib.util
import re
import sys
import zlib
from pathlib import Path

import torch

PACKAGES = ("asyncio", "email", "unittest", "xml")  # the classes: ids 0..3
LENGTH = 128  # characters a snippet: about three lines of source
VOCAB, MAX_TOKENS = 4096, 64
PAD, CLS = 0, 1  # BERT classifies from its first token
WORDS = re.compile(r"[A-Za-z_]+|\d+|[^\w\s]")


def snippets(package: str, per_class: int):
    """Up to `per_class` snippets of LENGTH characters, line-aligned, from the package's own source files."""
    root = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
    out = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        start = 0
        while start < len(text) and len(out) < per_class:
            piece = text[start : start + LENGTH]
            if piece.strip():
                out.append(piece)
            start = start + LENGTH if "\n" not in piece else start + piece.rindex("\n") + 1
    return out


def write_shards(root, per_class: int = 500, shard_size: int = 100) -> Path:
    """train/val/test shards (every 10th snippet to val, the next to test) with webdataset's TarWriter, and
    descriptors counting them as `dtrain index` does; written aside and moved into place, so ranks that all
    call it on first use leave one complete copy. -> root"""
    import shutil
    import tempfile

    import webdataset as wds
    from dtrain.data.sources import count_shards, descriptor, write_descriptor

    root = Path(root)
    if (root / "test.json").exists():
        return root
    samples = {"train": [], "val": [], "test": []}
    for label, package in enumerate(PACKAGES):
        for i, text in enumerate(snippets(package, per_class)):
            split = "val" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
            samples[split].append({"__key__": f"{package}-{i:05d}", "txt": text, "cls": label})
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    for split, rows in samples.items():
        rows.sort(key=lambda r: r["__key__"][::-1])  # the classes interleaved in every shard
        paths = []
        for n, start in enumerate(range(0, len(rows), shard_size)):
            paths.append(str(tmp / f"{split}-{n:06d}.tar"))
            with wds.TarWriter(paths[-1]) as sink:
                for row in rows[start : start + shard_size]:
                    sink.write(row)
        write_descriptor(descriptor(count_shards(paths), tmp / f"{split}.json"), tmp / f"{split}.json")
    try:
        tmp.rename(root)
    except OSError:  # another rank's copy got there first
        shutil.rmtree(tmp)
    return root


def tokens(text: str) -> list[int]:
    """A tokenizer built here, with no vocabulary to download or fit: words, numbers and punctuation, each
    hashed (crc32, the same in every process) to one of VOCAB - 2 ids, after the [CLS] token."""
    return [CLS] + [2 + zlib.crc32(word.encode()) % (VOCAB - 2) for word in WORDS.findall(text)][: MAX_TOKENS - 1]


def collate(samples):
    """Strings -> token ids padded to the longest, an attention mask, and the labels as `y`."""
    rows = [tokens(s["x"]) for s in samples]
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "y": torch.tensor([s["y"] for s in samples])}


def forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # logits for dtrain's loss


if __name__ == "__main__":
    print(f"shards and descriptors in {write_shards(sys.argv[1] if len(sys.argv) > 1 else 'data/snippets')}")
