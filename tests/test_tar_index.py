"""Random access to the samples of local tar shards (dtrain/data/tar_index.py): `indexed_fetch(stream)` gives
for any (shard, position) items the batch `dtrain.ft.memory_fetch` gives from the split in memory, reading
only those samples' bytes; what it can't read (compressed, streamed, truncated or crafted shards, a transform)
is one error line. Every shard is a real file on disk: dtrain's digits, webdataset's TarWriter, Python's
tarfile in GNU format."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.cli import main
from dtrain.config import ConfigError, DataConfig
from dtrain.data import ShardStream, build_streams, read_index, tar_index
from dtrain.data.shards import DataError, ShardIndex
from dtrain.data.tar_index import index, indexed_fetch
from dtrain.ft import global_order, memory_fetch
from test_hostile_shards import patch_header


# ---- helpers ---------------------------------------------------------------------------------------------
def same(a, b) -> bool:
    """Batches equal in every value, dtype, shape, key and type (tuples of dtrain's shards, dicts of mapped ones)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def all_items(stream) -> list[tuple[str, int]]:
    return [(url, p) for url, n in stream.shard_counts.items() for p in range(n)]


def check_every_item(memory_stream, stream, batch: int = 64) -> list:
    """Every item of the split, in order and then shuffled across shards in batches of `batch`: indexed_fetch
    gives memory_fetch's batches. -> the items, shuffled."""
    want, got = memory_fetch(memory_stream), indexed_fetch(stream)
    items = all_items(stream)
    assert len(items) > batch and len(stream.shard_counts) >= 2
    assert same(got(items), want(items))
    random.Random(0).shuffle(items)
    for i in range(0, len(items), batch):
        assert same(got(items[i : i + batch]), want(items[i : i + batch])), i
    return items


def swapped(stream, items):
    """The same fetch with two samples of one shard swapped in its index: the check above must see it."""
    fetch = indexed_fetch(stream)
    fetch(items[:1])
    shard = fetch.indexes[items[0][0]]
    for table in (shard.keys, shard.exts, shard.first):
        table[0], table[1] = table[1], table[0]
    return fetch


def descriptor(root, shards) -> str:
    assert main(["index", *map(str, shards), "--out", str(root / "train.json")]) == 0
    return str(root / "train.json")


def streams(train: str, **data):
    """(in memory, streamed) training streams of the same shards and config."""
    return tuple(
        build_streams(
            DataConfig(train=train, batch_size=8, num_workers=0, in_memory=m, **data), seed=0, rank=0, world_size=1
        ).train
        for m in (True, False)
    )


# ---- the same batches as memory_fetch ----------------------------------------------------------------------
def test_every_digits_sample_is_memory_fetchs_in_any_order(data_root):
    index_ = read_index(data_root / "digits")
    memory, stream = (
        ShardStream(index_, "train", batch_size=25, rank=0, world_size=1, seed=5, train=True, in_memory=m)
        for m in (True, False)
    )
    assert memory.memory is not None and stream.memory is None
    items = check_every_item(memory, stream)
    x, y, keys = indexed_fetch(stream)(items[:64])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(set(keys)) == 64
    assert not same(swapped(stream, sorted(items))(sorted(items)), memory_fetch(memory)(sorted(items)))


def test_the_global_order_fetched_is_what_the_streamed_rank_reads(data_root):
    """dtrain.ft's use: a step's samples of `global_order` (computed, nothing read) fetched by position are
    the batches one rank reads through the shard pipeline (tar stream, shuffle buffer, DataLoader)."""
    stream = ShardStream(
        read_index(data_root / "digits"),
        "train",
        batch_size=25,
        rank=0,
        world_size=1,
        seed=5,
        shuffle_buffer=100,
        train=True,
    )
    fetch, order = indexed_fetch(stream), global_order(stream, 1, 25)
    for step, batch in enumerate(stream.epoch(1)):
        assert same(fetch(order[step * 25 : (step + 1) * 25]), batch), step
    assert step == stream.steps_per_epoch - 1 > 0


def write_webdataset(root):
    """Two shards by webdataset's own TarWriter, four fields a sample (npy, cls, json, txt), one sample with a
    key too long for a ustar header (a pax `path`); a third by Python's tarfile in GNU format (a `././@LongLink`
    long name), with a __info__ member, a directory and a link among the samples (skipped)."""
    import webdataset as wds

    rng = np.random.default_rng(1)

    def sample(key: str) -> dict:
        x = rng.integers(0, 255, (3, 4), dtype=np.uint8)
        return {"__key__": key, "npy": x, "cls": int(rng.integers(0, 5)), "json": {"k": int(key[-3:])}, "txt": key}

    shards = []
    for s in range(2):
        shards.append(root / f"wds-{s}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            for i in range(30):
                sink.write(sample(("p" * 120 if (s, i) == (1, 7) else "") + f"s{s}-{i:03d}"))
    shards.append(root / "gnu.tar")
    with tarfile.open(shards[-1], "w", format=tarfile.GNU_FORMAT) as tar:

        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("__info__", b"{}")  # skipped by webdataset (its meta_prefix and meta_suffix)
        add("dir/", kind=tarfile.DIRTYPE)
        for i in range(20):
            key = ("g" * 150 if i == 3 else "") + f"s2-{i:03d}"
            x = io.BytesIO()
            np.save(x, rng.integers(0, 255, (3, 4), dtype=np.uint8))
            add(f"{key}.npy", x.getvalue())
            add(f"{key}.CLS", str(i % 5).encode())  # webdataset lower-cases extensions
            if i == 5:
                add(f"{key}.lnk", kind=tarfile.SYMTYPE)
            add(f"{key}.json", json.dumps({"k": i}).encode())
            add(f"{key}.txt", key.encode())
    return shards


def test_webdataset_and_gnu_shards_with_four_fields_are_memory_fetchs(tmp_path):
    shards = write_webdataset(tmp_path)
    train = descriptor(tmp_path, shards)
    memory, stream = streams(train, sample={"x": "npy", "y": "cls", "name": "txt", "k": "json#/k"})
    items = check_every_item(memory, stream, batch=16)
    batch = indexed_fetch(stream)(items)
    assert {len(k) for k in batch["__key__"]} == {6, 126, 156}  # the long names were read
    assert [k for k in batch["name"]] == batch["__key__"]
    assert not same(swapped(stream, sorted(items))(sorted(items)), memory_fetch(memory)(sorted(items)))


def raw_fields(sample: dict) -> dict:
    """A user's sample function: the raw dict as the streams hand it over, every member and dunder."""
    return {
        "x": torch.tensor(list(sample["npy"][-12:])),
        "raw": ",".join(sorted(sample)),
        "index": sample["__index__"],
        "url": sample["__url__"],
    }


def test_a_sample_function_gets_the_raw_sample_the_streams_give(tmp_path):
    shards = write_webdataset(tmp_path)
    memory, stream = (
        build_streams(
            DataConfig(train=descriptor(tmp_path, shards), task="regression", batch_size=8, num_workers=0, in_memory=m),
            seed=0,
            rank=0,
            world_size=1,
            sample=raw_fields,
        ).train
        for m in (True, False)
    )
    items = check_every_item(memory, stream, batch=16)
    batch = indexed_fetch(stream)(items[:3])
    assert batch["raw"][0] == "__index__,__key__,__pass__,__url__,cls,json,npy,txt"
    assert batch["index"].tolist() == [p for _, p in items[:3]] and batch["url"] == [u for u, _ in items[:3]]


def test_a_file_url_and_few_open_files_read_the_same(data_root, tmp_path, monkeypatch):
    """file:// shards are local files; with 2 files kept open for 6 shards, files are closed and reopened."""
    src = read_index(data_root / "digits")
    urls = {f"file://{u}": n for u, n in src.splits["train"].items()}
    memory = ShardStream(src, "train", batch_size=25, rank=0, world_size=1, train=True, in_memory=True)
    stream = ShardStream(
        ShardIndex({"train": urls}, src.meta), "train", batch_size=25, rank=0, world_size=1, train=True
    )
    monkeypatch.setattr(tar_index, "OPEN_FILES", 2)
    want, got = memory_fetch(memory), indexed_fetch(stream)
    items = all_items(memory)
    random.Random(1).shuffle(items)
    for i in range(0, len(items), 50):
        x, y, keys = got([(f"file://{u}", p) for u, p in items[i : i + 50]])
        assert same((x, y, keys), want(items[i : i + 50]))
        assert len(got.files) <= 2
    assert len(got.indexes) == len(urls)


def test_indexes_are_built_on_a_shards_first_use_and_hold_its_members(data_root):
    stream = ShardStream(read_index(data_root / "digits"), "train", batch_size=25, rank=0, world_size=1, train=True)
    fetch = indexed_fetch(stream)
    assert fetch.indexes == {}
    url = stream.urls[1]
    fetch([(url, 3)])
    assert list(fetch.indexes) == [url]
    shard = fetch.indexes[url]
    assert len(shard.keys) == stream.shard_counts[url]
    with tarfile.open(url) as tar:  # Python's own reader: where each member's data starts
        want = [(m.name.split(".", 1)[1], m.offset_data, m.size) for m in tar if m.isreg()]
    assert [m for p in range(len(shard.keys)) for m in shard.members(p)] == want


# ---- what it can't read ----------------------------------------------------------------------------------
def one_line(error) -> str:
    assert "\n" not in str(error.value), error.value
    return str(error.value)


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_a_compressed_shard_is_refused_in_one_line_before_any_fetch(data_root, tmp_path, kind):
    compress = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}[kind]
    shards = sorted((data_root / "digits").glob("train-*.tar"))[:2]
    (tmp_path / "a.tar").write_bytes(shards[0].read_bytes())
    (tmp_path / "b.tar.x").write_bytes(compress(shards[1].read_bytes()))
    counts = read_index(data_root / "digits").counts("train")[:2]
    split = ShardIndex({"train": {str(tmp_path / "a.tar"): counts[0], str(tmp_path / "b.tar.x"): counts[1]}})
    stream = ShardStream(split, "train", batch_size=25, rank=0, world_size=1, train=True)
    with pytest.raises(DataError) as e:
        indexed_fetch(stream)
    assert one_line(e).startswith(f"data: {tmp_path / 'b.tar.x'} is a {kind}-compressed shard")
    assert "write the shards uncompressed (.tar), or set data.in_memory=true" in str(e.value)
    with pytest.raises(DataError, match=f"is a {kind}-compressed shard"):
        index(str(tmp_path / "b.tar.x"))


@pytest.mark.parametrize("url", ["pipe:cat /data/train-0.tar", "https://example.com/train-0.tar"])
def test_a_streamed_shard_is_refused_in_one_line(url):
    stream = ShardStream(ShardIndex({"train": {url: 100}}), "train", batch_size=25, rank=0, world_size=1, train=True)
    with pytest.raises(ConfigError) as e:
        indexed_fetch(stream)
    assert one_line(e).startswith(f"data: {url} is streamed") and "set data.in_memory=true" in str(e.value)


def shifted(x, *, key, epoch, pass_index=0):
    """A transform that is a function of (sample, key, epoch, pass), as data.augment's are."""
    from dtrain.data.augment import sample_seed

    return x + sample_seed(5, epoch, pass_index, key) % 7 + 10 * epoch


def test_a_transform_is_applied_as_the_streamed_rank_applies_it(data_root):
    """data.augment under replica groups: the global order's samples fetched with the epoch, transformed, are
    the batches one rank reads through the shard pipeline with the same transform; another epoch differs."""
    stream = ShardStream(
        read_index(data_root / "digits"),
        "train",
        batch_size=25,
        rank=0,
        world_size=1,
        seed=5,
        shuffle_buffer=100,
        train=True,
        transform=shifted,
    )
    fetch, order = indexed_fetch(stream), global_order(stream, 1, 25)
    for step, batch in enumerate(stream.epoch(1)):
        assert same(fetch(order[step * 25 : (step + 1) * 25], epoch=1), batch), step
        assert not same(fetch(order[step * 25 : (step + 1) * 25], epoch=2), batch)
    assert step == stream.steps_per_epoch - 1 > 0


def copied(data_root, tmp_path):
    """A copy of the digits training shards: a stream of them, and its first shard."""
    for path in (data_root / "digits").glob("train*"):
        shutil.copy(path, tmp_path)
    stream = ShardStream(read_index(tmp_path), "train", batch_size=25, rank=0, world_size=1, train=True)
    return stream, stream.urls[0]


def test_a_truncated_or_crafted_shard_is_a_data_error_not_garbage(data_root, tmp_path):
    stream, url = copied(data_root, tmp_path)
    data = Path(url).read_bytes()
    cases = {
        "mid-payload": (data[: 512 * 5 + 100], "unexpected end of data"),
        "at a sample's end": (data[: 512 * 8], f"holds 2 samples, its descriptor lists {stream.shard_counts[url]}"),
    }
    for case, (cut, message) in cases.items():
        Path(url).write_bytes(cut)
        fetch = indexed_fetch(stream)
        with pytest.raises(DataError, match=message) as e:
            fetch([(url, 0)])
        assert one_line(e).startswith("data: ") and url in str(e.value), case
    Path(url).write_bytes(data)
    with tarfile.open(url) as tar:
        second = tar.getmembers()[2].name
    patch_header(tmp_path / url.rsplit("/", 1)[1], second, slice(124, 136), b"%011o" % (len(data) * 2))
    with pytest.raises(DataError, match=f"member '{second}' declares {len(data) * 2} bytes, more than the file holds"):
        indexed_fetch(stream)([(url, 0)])


def test_a_shard_changed_after_it_was_indexed_is_refused(data_root, tmp_path):
    """Cut while a fetch holds it open (a short read), or rewritten while closed (its size and modification
    time no longer the index's): a DataError, not samples read from wherever the offsets now point."""
    stream, url = copied(data_root, tmp_path)
    data = Path(url).read_bytes()
    fetch = indexed_fetch(stream)
    fetch([(url, 0)])
    with open(url, "r+b") as f:
        f.truncate(len(data) // 2)
    for rewrite in (None, data):
        if rewrite is not None:
            fetch.close()  # its next read opens the file again
            Path(url).write_bytes(rewrite[512:] + rewrite[:512])  # same size, another order
            indexed = fetch.indexes[url].mtime_ns  # a later rewrite (within a clock tick it could look the same)
            os.utime(url, ns=(indexed + 10**9, indexed + 10**9))
        with pytest.raises(DataError, match="changed since its samples were indexed") as e:
            fetch([(url, 200)])
        one_line(e)


# ---- what is read ----------------------------------------------------------------------------------------
def bytes_read() -> int:
    """Bytes this process has read by system calls (Linux's /proc/self/io rchar: page cache or disk)."""
    return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads Linux's /proc/self/io")
def test_an_index_reads_headers_and_a_fetch_only_its_samples(tmp_path):
    """A shard of 8 samples of 1 MiB: indexing it reads its headers (a buffer's worth each), not 8 MiB; a fetch
    of 2 samples reads their 2 MiB, not the shard."""
    import webdataset as wds

    mib, url = 1 << 20, str(tmp_path / "big.tar")
    with wds.TarWriter(url) as sink:
        for i in range(8):
            sink.write({"__key__": f"s{i}", "x.npy": np.full(mib, i, np.uint8), "y.cls": i})
    stream = ShardStream(ShardIndex({"train": {url: 8}}), "train", batch_size=2, rank=0, world_size=1, train=True)
    fetch = indexed_fetch(stream)
    before = bytes_read()
    fetch.index(url)
    indexing = bytes_read() - before
    before = bytes_read()
    x, y, keys = fetch([(url, 6), (url, 2)])
    fetching = bytes_read() - before
    assert keys == ["s6", "s2"] and y.tolist() == [6, 2] and x[:, 0].tolist() == [6, 2] and x.shape == (2, mib)
    assert indexing < mib // 4, indexing  # measured 36 KiB (the headers of 16 members, read in a buffer)
    assert 2 * mib <= fetching < 2 * mib + mib // 4, fetching  # measured 2 MiB + 1.5 KiB
