"""Any webdataset (issue 14): shards dtrain did not write (jpg + cls, written here by plain `tarfile`,
uneven, with members the mapping ignores), counted by `dtrain index`; the same shards through `pipe:` and
http; sample counts and every error they guard against; transforms that resume exactly; image folders to
shards; in-memory splits that read exactly as shards do."""

from __future__ import annotations

import functools
import http.server
import io
import json
import random
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.cli import main
from dtrain.config import load_config
from dtrain.data import build_streams, read_index
from dtrain.data.augment import SeededTransform
from dtrain.data.elastic import EpochReplay, Segment

SIZES = [10, 30, 17, 25, 14]  # uneven shards: 96 samples


def write_tar(path: Path, samples: list[dict]) -> Path:
    """A shard as any tool would write it: plain tarfile, one member per field, key.ext names."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def jpg(label: int, rng: np.random.Generator, size: int = 16) -> bytes:
    pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    pixels[..., label] += 120  # the class is the dominant colour: something a small CNN learns
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_sample(i: int, rng) -> dict:
    return {
        "__key__": f"s{i:05d}",
        "jpg": jpg(i % 2, rng),
        "cls": str(i % 2).encode(),
        "json": json.dumps({"i": i}).encode(),
    }  # the mapping ignores json


def write_jpg_shards(root: Path, sizes=SIZES) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng, i, paths = np.random.default_rng(0), 0, []
    for n, size in enumerate(sizes):
        paths.append(write_tar(root / f"part-{n:03d}.tar", [image_sample(j, rng) for j in range(i, i + size)]))
        i += size
    return paths


PATTERN = "part-{000..004}.tar"
SAMPLE = "data.sample={x: jpg, y: cls}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wds") / "shards"
    write_jpg_shards(root)
    assert main(["index", str(root / PATTERN), "--out", str(root / "train.json")]) == 0
    return root


def streams(*overrides: str, **kw):
    cfg = load_config(None, [SAMPLE, "data.batch_size=8", "data.shuffle_buffer=20", *overrides])
    return build_streams(cfg.data, seed=3, rank=0, world_size=1, **kw)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


# ---- counts and descriptors ----------------------------------------------------------------------------
def test_index_counts_from_headers_and_writes_a_wids_descriptor(shards, monkeypatch):
    d = json.loads((shards / "train.json").read_text())
    assert d["__kind__"] == "wids-shard-index-v1" and d["wids_version"] == 1  # what wids' resolve_dsdesc checks
    assert [(s["url"], s["nsamples"]) for s in d["shardlist"]] == [
        (f"part-{n:03d}.tar", c) for n, c in enumerate(SIZES)
    ]
    assert all(s["filesize"] == (shards / s["url"]).stat().st_size for s in d["shardlist"])

    # headers only: everything the reader asks of the file is 512-byte headers, payloads are seeked over
    from dtrain.data import tario

    asked = []

    class Counting(io.BufferedReader):
        def read(self, n=-1):
            asked.append(n)
            return super().read(n)

    monkeypatch.setattr(tario, "gopen", lambda url, *a, **k: Counting(io.FileIO(url)))
    assert tario.sample_count(str(shards / "part-001.tar")) == 30
    assert set(asked) == {512} and len(asked) == 30 * 3 + 1  # three members a sample, then the end block


def test_same_keys_in_the_same_order_from_a_path_a_pipe_and_http(shards):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert main(["index", f"pipe:cat {shards}/{PATTERN}", "--out", str(shards / "pipe.json")]) == 0
        assert main(["index", f"{url}/{PATTERN}", "--out", str(shards / "http.json")]) == 0
        counts = [
            [s["nsamples"] for s in json.loads((shards / f).read_text())["shardlist"]]
            for f in ("pipe.json", "http.json")
        ]
        assert counts == [SIZES, SIZES]
        got = {}
        # the local descriptor; one of pipe: URLs; the local one fetched over http (relative URLs -> http)
        for name, spec in (
            ("path", shards / "train.json"),
            ("pipe", shards / "pipe.json"),
            ("http", f"{url}/train.json"),
        ):
            # pipe.json is a descriptor whose URLs are commands: they run only where the user trusts it
            s = streams(f"data.train={spec}", "data.num_workers=2", "data.trust_descriptor_pipes=true").train
            assert s.urls[0].startswith({"path": "/", "pipe": "pipe:cat ", "http": "http://"}[name])
            got[name] = [(k, x) for b in s.epoch(1) for k, x in zip(b["__key__"], b["x"])]
    finally:
        server.shutdown()
    assert len(got["path"]) == 96 // 8 * 8 and len({k for k, _ in got["path"]}) == 96
    for name in ("pipe", "http"):
        assert [k for k, _ in got[name]] == [k for k, _ in got["path"]], name
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got[name], got["path"]))


def test_mapped_batches_are_dicts_of_decoded_fields(shards):
    s = streams(f"data.train={shards / 'train.json'}")
    assert s.val is None and s.test is None and s.mapped and s.input_shape == (3, 16, 16)
    assert s.task == "classification" and s.num_classes is None
    batch = next(iter(s.train.epoch(0)))
    assert set(batch) == {"x", "y", "__key__"}  # json: not mapped, not decoded
    assert batch["x"].shape == (8, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert 0 <= batch["x"].min() and batch["x"].max() <= 1 and batch["y"].dtype == torch.int64
    assert [int(k[1:]) % 2 for k in batch["__key__"]] == batch["y"].tolist()
    # grey images, a user's sample function, a collate hook
    grey = next(iter(streams(f"data.train={shards / 'train.json'}", "data.image=l").train.epoch(0)))
    assert grey["x"].shape == (8, 1, 16, 16)

    def sample(raw):
        return {"x": torch.tensor([json.loads(raw["json"])["i"]]), "name": raw["__key__"]}

    def collate(samples):
        return {"x": torch.cat([s["x"] for s in samples]), "n": len(samples)}

    b = next(iter(streams(f"data.train={shards / 'train.json'}", sample=sample, collate=collate).train.epoch(0)))
    assert b["n"] == 8 and b["__key__"] == [f"s{i:05d}" for i in b["x"].tolist()]


def test_replay_for_an_elastic_resume_reads_no_shard(shards, tmp_path):
    """Counts are all an elastic resume needs: its replay works with every shard gone."""
    import shutil

    shutil.copytree(shards, tmp_path / "s")
    s = streams(f"data.train={tmp_path / 's' / 'train.json'}").train
    for path in (tmp_path / "s").glob("*.tar"):
        path.unlink()
    replay = EpochReplay(
        s.relayout(rank=0, world_size=3, batch_size=4, grad_accum=1, num_workers=0, steps_per_epoch=s.steps_per_epoch),
        1,
        [Segment(1, 8, 1, 0, 0), Segment(3, 4, 1, 0, 5)],
    )
    dealt = [replay.assignment(r) for r in range(3)]
    assert [len(d) for d in dealt] == [(s.steps_per_epoch - 5) * 4] * 3


# ---- every error of point 3: one line, exit 2 ----------------------------------------------------------------
def error_line(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("dtrain: error: ") and not any(l.startswith("Traceback") for l in err)
    return err[-1]


def train_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "train",
        f"run.dir={tmp_path / 'runs'}",
        "log.progress=false",
        "run.doctor=false",
        "model.factory=cnn",
        "data.batch_size=8",
        "data.num_classes=2",
        SAMPLE,
        *overrides,
    ]


def test_shards_without_counts_name_dtrain_index(shards, tmp_path, capsys):
    line = error_line(capsys, train_args(tmp_path, f"data.train={shards / PATTERN}"))
    assert "no sample count for" in line and "part-000.tar" in line and f"dtrain index '{shards / PATTERN}'" in line
    (tmp_path / "bare.json").write_text(json.dumps({"shardlist": [{"url": str(shards / "part-000.tar")}]}))
    line = error_line(capsys, train_args(tmp_path, f"data.train={tmp_path / 'bare.json'}"))
    assert "part-000.tar has no sample count" in line and "dtrain index" in line
    # with the counts beside the pattern it trains
    assert (
        main(
            train_args(
                tmp_path,
                f"data.train={shards / PATTERN}",
                f"data.counts={shards / 'train.json'}",
                "train.max_steps=2",
                "run.name=counted",
            )
        )
        == 0
    )


@pytest.mark.parametrize("change", [-1, +1])
def test_a_shard_whose_count_differs_from_its_descriptor(shards, tmp_path, capsys, change):
    d = json.loads((shards / "train.json").read_text())
    d["shardlist"][2]["nsamples"] += change  # part-002.tar holds 17
    d["shardlist"] = [{**s, "url": str(shards / s["url"])} for s in d["shardlist"]]
    (tmp_path / "d.json").write_text(json.dumps(d))
    line = error_line(
        capsys, train_args(tmp_path, f"data.train={tmp_path / 'd.json'}", "train.max_steps=40", "data.shuffle_buffer=0")
    )
    assert "part-002.tar" in line
    assert f"holds 17 samples, its descriptor lists {17 + change}" in line  # both counts, either way


@pytest.mark.parametrize("case", ["missing", "undecodable"])
def test_a_bad_sample_names_its_shard_and_key(tmp_path, capsys, case):
    rng = np.random.default_rng(1)
    samples = [image_sample(i, rng) for i in range(20)]
    if case == "missing":
        del samples[13]["jpg"]
    else:
        samples[13]["jpg"] = b"\xff\xd8 not a jpeg"
    write_tar(tmp_path / "bad.tar", samples)
    assert main(["index", str(tmp_path / "bad.tar"), "--out", str(tmp_path / "bad.json")]) == 0
    # in a DataLoader worker: the error comes back as the same one line
    line = error_line(
        capsys,
        train_args(
            tmp_path, f"data.train={tmp_path / 'bad.json'}", "data.num_workers=1", "data.sample={x: jpg;png, y: cls}"
        ),
    )
    assert "bad.tar" in line and "s00013" in line
    assert (
        "has no .jpg or .png member for data.sample.x (it has cls, json)"
        if case == "missing"
        else "cannot decode s00013.jpg"
    ) in line


def test_index_of_an_unreadable_shard(tmp_path, capsys):
    write_jpg_shards(tmp_path, [6])
    path = tmp_path / "part-000.tar"
    data = path.read_bytes()
    for cut in (512 * 5 + 100, 512 + 300):  # inside a header; inside the first member's data (seeked over)
        path.write_bytes(data[:cut])
        line = error_line(capsys, ["index", str(path), "--out", str(tmp_path / "x.json")])
        assert "cannot read" in line and "part-000.tar" in line and not (tmp_path / "x.json").exists()
    line = error_line(capsys, ["index", "pipe:cat /nonexistent-{0..1}.tar", "--out", str(tmp_path / "x.json")])
    assert "pipe:cat /nonexistent-0.tar" in line
    # a stranger's first try: a quoted glob, which webdataset does not expand (braces only)
    line = error_line(capsys, ["index", f"{tmp_path}/part-*.tar", "--out", str(tmp_path / "x.json")])
    assert "no shard" in line and "leave it unquoted" in line and "{000000..000099}" in line


# ---- transforms that resume exactly ----------------------------------------------------------------------------
def noisy_flip(x):
    """Draws from the global generators, as torchvision.transforms.v2 does."""
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return (x + 0.1 * torch.randn(x.shape) * random.random() * np.random.rand()).clamp(0, 1)


def test_transform_draws_depend_only_on_seed_epoch_pass_and_key(shards):
    t = SeededTransform(noisy_flip, seed=3)
    x = torch.rand(3, 16, 16)
    rng_before = torch.get_rng_state(), random.getstate()
    a = t(x, key="s1", epoch=2)
    assert torch.equal(a, SeededTransform(noisy_flip, seed=3)(x, key="s1", epoch=2))
    assert not torch.equal(a, t(x, key="s1", epoch=3)) and not torch.equal(a, t(x, key="s2", epoch=2))
    assert not torch.equal(a, t(x, key="s1", epoch=2, pass_index=1))
    # the caller's generators (dropout's) are untouched
    assert torch.equal(rng_before[0], torch.get_rng_state()) and rng_before[1] == random.getstate()

    def by_key(workers: int, start: int = 0):
        s = streams(f"data.train={shards / 'train.json'}", f"data.num_workers={workers}", transform=noisy_flip).train
        return {k: x for b in s.epoch(1, start=start) for k, x in zip(b["__key__"], b["x"])}

    inline, workers, resumed = by_key(0), by_key(2), by_key(0, start=5)
    assert len(inline) == 96 and all(torch.equal(workers[k], inline[k]) for k in inline)
    assert len(resumed) == 96 - 5 * 8 and all(torch.equal(resumed[k], inline[k]) for k in resumed)


# ---- image folders ----------------------------------------------------------------------------------------------
def test_image_folder_to_shards_keeps_the_encoded_bytes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["cat", "dog"]):
        for i in range(20):
            folder = tmp_path / "photos" / cls / ("nested" if i % 5 == 0 else "")
            folder.mkdir(parents=True, exist_ok=True)
            ext, fmt = ("jpeg", "JPEG") if i % 2 else ("png", "PNG")
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.x.{ext}", fmt)
    (tmp_path / "photos" / "dog" / "notes.txt").write_text("not an image")
    assert (
        main(["shard", "--from-folder", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--shard-size", "10"])
        == 0
    )
    assert "2 classes: cat, dog" in capsys.readouterr().out
    index = read_index(tmp_path / "out")
    assert index.classes == ["cat", "dog"] and index.num_classes == 2 and index.task == "classification"
    assert {s: index.num_samples(s) for s in ("train", "val", "test")} == {"train": 28, "val": 6, "test": 6}
    assert index.meta["sample"] == {"x": "jpg;png", "y": "cls"}
    seen = set()
    for url in index.shards("train") + index.shards("val") + index.shards("test"):
        with tarfile.open(url) as tar:
            names = tar.getnames()
            for name in (n for n in names if n.endswith(".path.txt")):
                key = name.removesuffix(".path.txt")
                rel = tar.extractfile(name).read().decode()
                image = next(n for n in names if n.startswith(key + ".") and n.endswith((".jpg", ".png")))
                assert tar.extractfile(image).read() == (tmp_path / "photos" / rel).read_bytes()  # the same bytes
                assert int(tar.extractfile(key + ".cls").read()) == ["cat", "dog"].index(rel.split("/")[0])
                seen.add(rel)
    assert len(seen) == 40
    # trains as it is: the descriptor's own mapping, images as float CHW
    cfg = load_config(None, [f"data.dataset=folder:{tmp_path / 'out'}", "data.batch_size=4"])
    s = build_streams(cfg.data, seed=0, rank=0, world_size=1)
    b = next(iter(s.train.epoch(0)))
    assert b["x"].shape == (4, 3, 12, 10) and s.classes == ["cat", "dog"] and s.num_classes == 2
    # the folder's own train/val split is kept
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "own" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (4, 4)).save(tmp_path / "own" / split / cls / f"{i}.png")
    assert main(["shard", "--from-folder", str(tmp_path / "own"), "--out", str(tmp_path / "own-out")]) == 0
    own = read_index(tmp_path / "own-out")
    assert {s: own.num_samples(s) for s in own.splits} == {"train": 6, "val": 4} and not own.has("test")


# ---- in memory: the same batches as from the shards ---------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_in_memory_split_reads_exactly_as_the_shards(data_root, workers):
    from dtrain.data.augment import Augment

    aug = Augment(load_config(None, ["augment.noise.p=1", "augment.crop.p=0.5"]).augment, seed=0)
    cfg = load_config(
        None, [f"data.root={data_root}", "data.batch_size=50", "data.shuffle_buffer=100", f"data.num_workers={workers}"]
    )

    def build(in_memory):
        return build_streams(
            cfg.data.model_copy(update={"in_memory": in_memory}), seed=3, rank=1, world_size=2, augment=aug
        )

    shard, memory = build(False), build(True)
    assert shard.train.memory is None and memory.train.memory is not None

    def same(a, b):
        a, b = list(a), list(b)
        assert len(a) == len(b) and all(
            p[2] == q[2] and torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b)
        )

    for epoch in (0, 1):
        same(shard.train.epoch(epoch, start=2), memory.train.epoch(epoch, start=2))

    # evaluation: every second sample of the split to each rank, in memory and from the shards alike
    def val_keys(rank, in_memory, world_size=2, workers=workers):
        val = build_streams(
            cfg.data.model_copy(update={"in_memory": in_memory, "num_workers": workers}),
            seed=3,
            rank=rank,
            world_size=world_size,
        ).val
        return [k for b in val.epoch(0) for k in b[2]]

    keys = {(r, m): val_keys(r, m) for r in (0, 1) for m in (False, True)}
    in_shard_order = val_keys(0, False, world_size=1, workers=0)
    assert keys[0, True] == in_shard_order[0::2] and keys[1, True] == in_shard_order[1::2]
    assert keys[0, False] == keys[0, True] if workers == 0 else sorted(keys[0, False]) == sorted(keys[0, True])
    assert sorted(keys[1, False]) == sorted(keys[1, True])
    # the rest of an epoch dealt over 3 ranks (an elastic resume)
    segments = [Segment(2, 50, 1, workers, 0), Segment(3, 25, 1, workers, 4)]
    relaid = [
        s.train.relayout(
            rank=2,
            world_size=3,
            batch_size=25,
            grad_accum=1,
            num_workers=workers,
            steps_per_epoch=s.train.steps_per_epoch,
        )
        for s in (shard, memory)
    ]
    items = EpochReplay(relaid[0], 1, segments).assignment(2)
    same(relaid[0].dealt_epoch(1, 1, items, start=1), relaid[1].dealt_epoch(1, 1, items, start=1))


# ---- evaluation splits: every rank an equal share, by sample ----------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_evaluates_an_equal_share_of_a_streamed_split(shards, tmp_path, workers):
    """Rank r of W evaluates the samples at positions r, r + W, ... of the split (its shards in order),
    however few shards: the ranks' shares are the split exactly once, equal to a sample, and with
    DataLoader workers (which split a rank's share again) nothing is read twice or missed."""
    one = write_jpg_shards(tmp_path / "one", sizes=[13])  # fewer shards than ranks (and than workers)
    assert main(["index", str(one[0]), "--out", str(tmp_path / "one" / "val.json")]) == 0

    def val_keys(val: Path, rank: int, world_size: int, num_workers: int) -> list[str]:
        cfg = load_config(
            None,
            [
                SAMPLE,
                "data.batch_size=4",
                f"data.train={shards / 'train.json'}",
                f"data.val={val}",
                f"data.num_workers={num_workers}",
            ],
        )
        stream = build_streams(cfg.data, seed=3, rank=rank, world_size=world_size).val
        assert stream.memory is None  # streamed from the shards (mapped samples are not kept in memory)
        return keys_of(stream.epoch(0))

    for val in (tmp_path / "one" / "val.json", shards / "train.json"):  # 1 shard of 13; 5 uneven shards, 96
        split = val_keys(val, 0, 1, 0)  # the split's order: its shards in order
        assert len(split) == len(set(split)) == (13 if "one" in str(val) else sum(SIZES))
        for world_size in (2, 3):
            shares = [val_keys(val, rank, world_size, workers) for rank in range(world_size)]
            assert max(map(len, shares)) - min(map(len, shares)) <= 1, [len(s) for s in shares]
            assert sorted(k for share in shares for k in share) == sorted(split)  # each sample once
            # by position, as a split in memory is dealt (every world_size-th sample from the rank)
            assert [sorted(share) for share in shares] == [sorted(split[r::world_size]) for r in range(world_size)]
            if workers == 0:  # one reader: the split's order itself
                assert shares == [split[r::world_size] for r in range(world_size)]


def test_in_memory_auto_is_for_small_local_dtrain_shards(data_root, shards):
    auto = streams(f"data.root={data_root}", "data.sample=null")
    assert auto.train.memory is not None and auto.val.memory is not None
    assert streams(f"data.root={data_root}", "data.sample=null", "data.in_memory_mb=1").train.memory is None
    assert streams(f"data.train={shards / 'train.json'}").train.memory is None  # decoded images: opt in
    assert streams(f"data.train={shards / 'train.json'}", "data.in_memory=true").train.memory is not None


# ---- end to end: 2 gloo ranks, a random augmentation, SIGKILL, resume on 2, 1 and 3 ranks ----------------------
USER_MODULE = '''
import os, time
from pathlib import Path
import torch

STALL_AFTER = int(Path("stall_after").read_text()) if Path("stall_after").exists() else None
calls = 0

def augment(x):
    """A plain random augmentation drawing from torch's global generator, as torchvision.transforms.v2 does."""
    global calls
    calls += 1
    if STALL_AFTER is not None and calls > STALL_AFTER:  # the test kills the run here, mid-epoch
        Path(f"stalled-{os.environ.get('RANK', 0)}").touch()
        time.sleep(600)
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)


class Net(torch.nn.Module):
    """The user's own model: two conv layers and a last layer named fc, with dropout."""
    def __init__(self, num_classes=2, width=8):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(width, width, 3, padding=1),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2))
        self.fc = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
'''
# 96 samples, global batch 24 (12 x 2 ranks; 24 x 1 or 12 x 2 on one rank, 8 x 3 on three): 4 steps per epoch
E2E = [
    "train",
    "train.epochs=4",
    "data.batch_size=12",
    "model.factory=usermod:Net",
    "model.head=fc",
    "data.num_classes=2",
    SAMPLE,
    "data.transform=usermod:augment",
    "data.shuffle_buffer=20",
    "log.progress=false",
    "log.sample_keys=true",
    "train.log_every=1",
    "checkpoint.every=1",
    "run.doctor=false",
]


@pytest.mark.slow
@pytest.mark.multiproc
def test_foreign_jpg_shards_train_and_resume_exactly(tmp_path):
    """jpg shards written by plain tarfile, counted by `dtrain index`, a user's model on 2 gloo ranks with a random
    augmentation from torch's global generator: SIGKILLed mid-epoch and resumed, the same parameters
    (torch.equal) and the same samples at every step as an uninterrupted run; resumed on 1 and on 3 ranks,
    every epoch reads the samples the uninterrupted run reads, none twice, none missing."""
    import collections
    import os
    import re
    import shutil
    import signal
    import uuid

    from conftest import final_params, key_log, result_of, run_ranks, start, torchrun_cmd, wait_for, workers

    write_jpg_shards(tmp_path / "shards")
    assert main(["index", str(tmp_path / "shards" / PATTERN), "--out", str(tmp_path / "shards" / "train.json")]) == 0
    (tmp_path / "usermod.py").write_text(USER_MODULE)  # in cwd: on the workers' sys.path (python -m dtrain)
    args = E2E + [f"data.train={tmp_path / 'shards' / 'train.json'}"]
    straight = tmp_path / "runs" / "straight"
    assert result_of(run_ranks(2, args + ["run.name=straight"], tmp_path))["step"] == 16

    (tmp_path / "stall_after").write_text("120")  # each rank stalls in its 11th step's batch or before
    tag = uuid.uuid4().hex
    proc = start(torchrun_cmd(2, args + ["run.name=killed"]), tmp_path, tag)
    wait_for(lambda: list(tmp_path.glob("stalled-*")), what="a stalled rank")  # past its last checkpoint
    for pid in workers(tag).values():  # both ranks, as a lost node would
        os.kill(pid, signal.SIGKILL)
    assert proc.communicate(timeout=60) and proc.returncode != 0
    (tmp_path / "stall_after").unlink()
    for world in (1, 3):
        shutil.copytree(tmp_path / "runs" / "killed", tmp_path / "runs" / f"on{world}", symlinks=True)
    resumed = run_ranks(2, args + ["run.name=killed"], tmp_path)
    step = int(re.search(r"resumed from .* at step (\d+)", resumed.stderr).group(1))
    assert step % 4, step  # mid-epoch
    a, b = final_params(straight), final_params(tmp_path / "runs" / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert key_log(tmp_path / "runs" / "killed") == key_log(straight)  # the same samples at every step

    def epoch_keys(run_dir: Path, epoch: int) -> collections.Counter:
        return collections.Counter(
            k
            for rows in key_log(run_dir).values()
            for s, keys in rows
            if epoch * 4 < s <= (epoch + 1) * 4
            for k in keys
        )

    for world in (1, 3):
        run = tmp_path / "runs" / f"on{world}"
        proc = run_ranks(
            world, args + [f"run.name=on{world}"], tmp_path, launcher="single" if world == 1 else "torchrun"
        )
        assert f"dealt over {world} rank" in proc.stderr, proc.stderr[-2000:]
        for epoch in range(step // 4 + 1):  # up to the interrupted one: what the uninterrupted run read
            assert epoch_keys(run, epoch) == epoch_keys(straight, epoch), (world, epoch)
        assert sum(epoch_keys(run, 3).values()) == 96  # then a normal epoch on the new ranks
