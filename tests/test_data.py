import numpy as np
import pytest

from dtrain.data import DataError, ShardIndex, ShardStream, make_builtin, read_index
from dtrain.data.shards import write_shards


def keys(batches):
    return [k for b in batches for k in b[2]]


def test_shards_and_index(data_root):
    index = read_index(data_root / "digits")
    assert index.task == "classification" and index.num_classes == 10 and index.input_shape == (1, 8, 8)
    assert sum(index.num_samples(s) for s in ("train", "val", "test")) == 1797
    counts = index.counts("train")
    assert max(counts) - min(counts) < len(counts)  # ShardWriter fills evenly but for the last shard
    for path in index.shards("train"):
        assert path.endswith(".tar")


def test_epoch_order_is_seeded_reshuffled_and_resumable(data_root):
    index = read_index(data_root / "digits")
    s = ShardStream(index, "train", batch_size=32, rank=0, world_size=1, seed=3, shuffle_buffer=300, train=True)
    e0, e0_again, e1 = list(s.epoch(0)), list(s.epoch(0)), list(s.epoch(1))
    assert len(e0) == len(e1) == s.batches_per_epoch == index.num_samples("train") // 32
    assert keys(e0) == keys(e0_again)  # a pure function of (seed, epoch, rank)
    assert keys(e0) != keys(e1)  # every epoch reshuffles
    assert len(set(keys(e0))) == len(keys(e0))  # no sample twice in an epoch
    assert keys(list(s.epoch(0, start=7))) == keys(e0)[7 * 32 :]  # mid-epoch resume skips exactly
    other_seed = ShardStream(
        index, "train", batch_size=32, rank=0, world_size=1, seed=4, shuffle_buffer=300, train=True
    )
    assert keys(list(other_seed.epoch(0))) != keys(e0)


def test_workers_split_shards_without_duplicates(data_root):
    index = read_index(data_root / "digits")
    s = ShardStream(
        index, "train", batch_size=32, rank=0, world_size=1, seed=0, shuffle_buffer=100, train=True, num_workers=2
    )
    got = list(s.epoch(0))
    assert len(got) == s.batches_per_epoch and all(len(b[0]) == 32 for b in got)
    assert len(set(keys(got))) == len(keys(got))
    assert keys(got) == keys(list(s.epoch(0)))  # deterministic with workers too


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path, monkeypatch):
    # 5 shards of very different sizes over 2 ranks: webdataset's split_by_node gives rank 0 three
    # shards and rank 1 two; both must still yield exactly batches_per_epoch full batches.
    x = np.zeros((700, 1, 2, 2), np.uint8)
    y = np.arange(700) % 3
    index = write_shards(
        tmp_path / "uneven",
        {"train": (x, y)},
        {"task": "classification", "num_classes": 3, "input_shape": [1, 2, 2], "x_scale": 1.0},
        140,
    )
    # make the shards uneven: rewrite with a custom split of counts
    import webdataset as wds

    sizes = [400, 50, 100, 50, 100]
    root = tmp_path / "uneven2"
    root.mkdir()
    i = 0
    split = {}
    for n, size in enumerate(sizes):
        name = str(root / f"train-{n:06d}.tar")
        with wds.TarWriter(name) as sink:
            for _ in range(size):
                sink.write({"__key__": f"s{i:05d}", "x.npy": x[i], "y.cls": int(y[i])})
                i += 1
        split[name] = size
    index = ShardIndex({"train": split}, index.meta)
    lengths = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        s = ShardStream(index, "train", batch_size=50, rank=rank, world_size=2, seed=1, shuffle_buffer=10, train=True)
        for epoch in range(3):
            got = list(s.epoch(epoch))
            lengths[rank, epoch] = len(got)
            assert all(len(b[0]) == 50 for b in got)
    assert set(lengths.values()) == {700 // 100}


def test_missing_and_corrupt_shards_are_clear_errors(tmp_path, data_root):
    import shutil

    root = tmp_path / "digits"
    shutil.copytree(data_root / "digits", root)
    first = sorted(root.glob("train-*.tar"))[0]
    first.write_bytes(first.read_bytes()[:700])  # truncated mid-member
    index = read_index(root)
    s = ShardStream(index, "train", batch_size=32, rank=0, world_size=1, train=True)
    with pytest.raises(DataError, match=first.name):
        list(s.epoch(0))
    first.unlink()
    with pytest.raises(DataError, match=f"missing shard .*{first.name}"):
        read_index(root)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        make_builtin("mnist", "/tmp/x", 10)


# ---- the fast tar reader (dtrain/data/tario.py) against webdataset's own ---------------------------
def _members(reader, path):
    with open(path, "rb") as f:
        return [(m["fname"], m["data"]) for m in reader(f)]


def test_fast_tar_reader_reads_what_webdataset_reads(tmp_path, data_root):
    import gzip
    import io
    import tarfile

    from webdataset import tariterators

    from dtrain.data import tario

    def add(tar, name, data=b"", kind=tarfile.REGTYPE):
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data)
        if kind == tarfile.SYMTYPE:
            info.linkname = "a.x"
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    archives = [sorted((data_root / "digits").glob("*.tar"))[0]]  # a shard as dtrain writes it
    deep = "d" * 120 + "/" + "k" * 90  # a ustar prefix
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            add(tar, "__meta__.json", b"{}")
            add(tar, "dir/", kind=tarfile.DIRTYPE)
            add(tar, "s1.x.npy", b"abc" * 300)
            add(tar, "s1.y.cls", b"3")
            add(tar, "link.x", kind=tarfile.SYMTYPE)
            add(tar, f"{deep}.x.npy", b"\0" * 513)
            add(tar, "s2.y.cls", b"")
            if fmt != tarfile.USTAR_FORMAT:  # names ustar cannot hold
                add(tar, "l" * 150 + ".x.npy", b"long")
                add(tar, "sch\u00f6n.y.cls", b"7")
        archives.append(path)
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress(archives[-1].read_bytes()))
    archives.append(gz)
    for path in archives:
        fast = _members(tario.tar_file_iterator, path)
        assert fast == _members(tariterators.tar_file_iterator, path) and len(fast) >= 4, path
    assert ("l" * 150 + ".x.npy", b"long") in fast and (f"{deep}.x.npy", b"\0" * 513) in fast

    shard = bytearray(archives[0].read_bytes())
    truncated = tmp_path / "t.tar"
    truncated.write_bytes(shard[: 512 * 3 + 100])
    flipped = tmp_path / "b.tar"
    shard[512 * 4 + 10] ^= 0x20  # a later member's header: tarfile's stream mode would end the shard there
    flipped.write_bytes(shard)
    for path, error in ((truncated, "unexpected end of data"), (flipped, "bad tar header checksum")):
        with pytest.raises(tarfile.ReadError, match=error):
            _members(tario.tar_file_iterator, path)


def test_shard_cut_at_a_member_boundary_is_an_error(tmp_path, data_root):
    import shutil
    import tarfile

    root = tmp_path / "digits"
    shutil.copytree(data_root / "digits", root)
    shard = sorted(root.glob("train-*.tar"))[1]
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[6].offset  # after three whole samples: to a tar reader, a shorter archive
    shard.write_bytes(shard.read_bytes()[:cut])
    s = ShardStream(read_index(root), "train", batch_size=32, rank=0, world_size=1, train=True)
    with pytest.raises(DataError, match=f"{shard.name} .*holds 3 samples, its descriptor lists [0-9]+"):
        list(s.epoch(0))


def test_elastic_rest_of_epoch_shorter_than_dealt_is_an_error(data_root):
    index = read_index(data_root / "digits")
    url, count = index.shards("train")[0], index.counts("train")[0]
    s = ShardStream(index, "train", batch_size=32, rank=0, world_size=1, train=True)
    items = [(url, i) for i in range(64)] + [(url, count + i) for i in range(32)]  # 32 the shard no longer has
    with pytest.raises(DataError, match="read 64 of the 96 samples dealt"):
        list(s.dealt_epoch(0, 1, items))


def test_digits_are_read_as_scikit_learn_loads_them_without_importing_it():
    import subprocess
    import sys
    from sklearn.datasets import load_digits
    from dtrain.data.datasets import digits_arrays

    images, labels = digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(labels, d.target) and labels.dtype == np.int64
    check = "import sys; from dtrain.data.datasets import digits; digits(); assert 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)  # ~1.7 s of every first run's start


# ---- a shard that holds another number of samples than its descriptor lists (#32.4) ---------------------
def _tar_shard(path, first: int, n: int) -> str:
    """`n` samples written with webdataset's TarWriter, keys k{first}.. (x: float32 1x2x2, y: class)."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for i in range(first, first + n):
            sink.write({"__key__": f"k{i:05d}", "x.npy": np.full((1, 2, 2), i % 7, np.float32), "y.cls": i % 3})
    return str(path)


@pytest.fixture
def counted(tmp_path):
    """train and val: 3 shards of 64, 40 and 50 samples each, counted by `dtrain index`'s counter."""
    from dtrain.data.sources import count_shards

    splits = {}
    for split in ("train", "val"):
        urls = [_tar_shard(tmp_path / f"{split}-{s}.tar", 100 * s, n) for s, n in enumerate((64, 40, 50))]
        splits[split] = dict(count_shards(urls))
    assert splits["train"][urls[0].replace("val", "train")] == 64
    meta = {"task": "classification", "num_classes": 3, "input_shape": [1, 2, 2], "x_scale": 1.0}
    return tmp_path, ShardIndex(splits, meta)


@pytest.mark.parametrize("holds", [0, 63, 65])  # a 0-byte file, one sample short, one too many
@pytest.mark.parametrize("read", ["streamed", "workers", "in_memory", "val", "val_in_memory"])
def test_a_shard_with_another_count_than_listed_is_an_error_naming_both(counted, holds, read):
    """The descriptor lists 64 samples in the shard: training (streamed, in DataLoader workers, in memory)
    and evaluation refuse it in one line naming the shard and both counts. (A 0-byte shard was trained on
    with exit 0, the other shards' samples drawn again in its place.)"""
    root, index = counted
    split = "val" if read.startswith("val") else "train"
    shard = root / f"{split}-0.tar"
    if holds:
        _tar_shard(shard, 0, holds)
    else:
        shard.write_bytes(b"")
    s = ShardStream(
        index,
        split,
        batch_size=8,
        rank=1,
        world_size=2,
        train=split == "train",
        shuffle_buffer=10,
        num_workers=2 if read == "workers" else 0,
        in_memory=read.endswith("in_memory"),
    )
    with pytest.raises(DataError) as e:
        for _ in range(2):  # two epochs: the shards' order (and so who reads the shard's end) changes
            list(s.epoch(_))
    assert str(e.value) == (
        f"data: {shard} holds {holds} samples, its descriptor lists 64: truncated or changed? "
        f"write it again, or count it again with `dtrain index`"
    )


@pytest.mark.parametrize("empty", [0, 1])  # the first shard, whose first sample gives the input's shape, or another
def test_training_on_a_0_byte_shard_is_one_line_and_exit_2(counted, capsys, empty):
    """dtrain train on TarWriter shards counted by `dtrain index`, one of them emptied since: exit 2 and one line
    (the old code trained on the other shards with exit 0 where the empty one wasn't the first)."""
    import json
    from dtrain.cli import main

    root, index = counted
    assert main(["index", str(root / "train-{0..2}.tar"), "--out", str(root / "train.json")]) == 0
    shard = root / f"train-{empty}.tar"
    listed = json.loads((root / "train.json").read_text())["shardlist"][empty]["nsamples"]
    shard.write_bytes(b"")
    assert (
        main(
            [
                "train",
                f"data.train={root / 'train.json'}",
                "data.sample={x: x.npy, y: y.cls}",
                "data.num_classes=3",
                "data.batch_size=16",
                f"run.dir={root / 'runs'}",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"dtrain: error: data: {shard} holds 0 samples, its descriptor lists {listed}: "
        f"truncated or changed? write it again, or count it again with `dtrain index`"
    ), err
    assert not any(l.startswith("Traceback") for l in err)


def test_processes_that_share_no_barrier_write_a_builtin_data_set_once(tmp_path):
    """The replica groups of `dtrain launch --ft` (each a world of one) all found data/digits absent: each wrote
    it, one replaced the directory while another read it, and a stranger's first `dtrain launch --ft` ended in
    'missing shard ... listed in train.json'. A file lock beside the data set makes the first one write it."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom dtrain.config import DataConfig; from dtrain.data import resolve_shards; "
        "import os, time; index = resolve_shards(DataConfig(root=sys.argv[1]), seed=0); end = time.time() + 3\n"
        "while time.time() < end:  # the shards it was given stay there while the others start\n"
        "    assert all(os.path.exists(u) for s in index.splits.values() for u in s), 'a shard went missing'\n"
        "print(sum(index.counts('train')))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in outs]
    assert len({out for out, _ in outs}) == 1, outs
