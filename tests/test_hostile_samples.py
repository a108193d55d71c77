"""What a sample decodes to, and what the data says about itself (issues #32.3, #33): shards dtrain did not
write, made here with webdataset's TarWriter or plain tarfile, read through a real training run in this
process and through the decode functions.

- data.task left out: float targets train as a regression (not scored as a classification); the baseline
  mae_predict_mean is logged only where the training mean is known (dtrain's own shards).
- a class label outside 0..data.num_classes-1 (or negative), anywhere in the data: one line naming the
  sample, its shard, the label and the fix, not an IndexError mid-training.
- hostile members: an image declaring more pixels than PIL.Image.MAX_IMAGE_PIXELS is refused from its
  header; .pth, .npy and pickle members never run code. Each refusal is one line naming sample and shard.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
import webdataset as wds

from conftest import result_of, run_dtrain
from dtrain.cli import main
from dtrain.data import DataError
from dtrain.data.samples import FieldMap

# ---- shards -----------------------------------------------------------------------------------------------


def write_split(root: Path, split: str, samples: list[dict]) -> Path:
    """One TarWriter shard of `samples`, counted by `dtrain index` as a user would. -> its descriptor."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / f"{split}-0.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    assert main(["index", str(root / f"{split}-0.tar"), "--out", str(root / f"{split}.json")]) == 0
    return root / f"{split}.json"


def vector(rng, label) -> np.ndarray:
    x = rng.normal(size=4).astype(np.float32)
    x[0] += label  # something an MLP learns
    return x


def class_samples(n: int, prefix: str, bad: dict[int, int] = {}, seed: int = 0) -> list[dict]:
    """npy + cls samples of classes 0..2; bad: {position: the label written there instead}."""
    rng = np.random.default_rng(seed)
    return [{"__key__": f"{prefix}{i:04d}", "npy": vector(rng, i % 3), "cls": bad.get(i, i % 3)} for i in range(n)]


def train_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        "train",
        f"run.dir={tmp_path / 'runs'}",
        "log.progress=false",
        "run.doctor=false",
        "model.factory=mlp",
        "data.batch_size=8",
        "data.shuffle_buffer=16",
        "train.max_steps=16",
        "train.val_every=8",
        *overrides,
    ]


def error_line(proc) -> str:
    """The run's one error line (exit 2, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("dtrain: error: ") and not any("Traceback" in l for l in lines), proc.stderr[
        -3000:
    ]
    return lines[-1]


# ---- the task, from the labels (#32.3) ------------------------------------------------------------------
@pytest.mark.parametrize("task", [None, "regression"])
def test_float_targets_train_as_a_regression_without_a_made_up_baseline(tmp_path, task):
    """npy + json float targets (mean ~7.5, far from 0) with data.task left out trained with a cross-entropy
    and failed on its float targets (with a loss of one's own: logged test/acc); with data.task=regression,
    mae_predict_mean was the error of predicting 0. Now: a regression, and no baseline dtrain can't know."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        samples = []
        for i in range(n):
            x = rng.normal(size=4).astype(np.float32)
            samples.append({"__key__": f"{split}{i:04d}", "npy": x, "json": float(2 * x.sum() + 7.5)})
        splits[split] = write_split(tmp_path / "shards", split, samples)
    args = train_args(
        tmp_path,
        *(f"data.{s}={d}" for s, d in splits.items()),
        "data.sample={x: npy, y: json}",
        *([f"data.task={task}"] if task else []),
    )
    proc = run_dtrain(args, tmp_path)
    result = result_of(proc)
    assert {"test/mae", "test/mse"} <= set(result) and "test/acc" not in result, result
    said = "data: task regression: the first training samples' labels (field y) are floating-point; set data.task"
    assert (said in proc.stdout + proc.stderr) == (task is None), proc.stderr
    assert "test/mae_predict_mean" not in result, result  # the training mean of foreign shards is unknown


def test_the_baseline_of_dtrains_own_shards_predicts_the_training_mean(tmp_path):
    """The count data set's descriptor holds the training mean: mae_predict_mean is the error of predicting it."""
    args = [
        "train",
        f"run.dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'data'}",
        "log.progress=false",
        "run.doctor=false",
        "data.dataset=count",
        "data.count_samples=300",
        "model.factory=mlp",
        "data.batch_size=16",
        "train.max_steps=2",
    ]
    result = result_of(run_dtrain(args, tmp_path))
    from dtrain.data import read_index
    from dtrain.data.pipeline import ShardStream

    index = read_index(tmp_path / "data" / "count")
    y = {
        s: torch.cat([b[1] for b in ShardStream(index, s, batch_size=64, rank=0, world_size=1).epoch(0)])
        for s in ("train", "test")
    }
    assert result["test/mae_predict_mean"] == pytest.approx(
        (y["test"] - y["train"].mean()).abs().mean().item(), rel=1e-5
    )


def test_labels_that_say_no_task_name_data_task(tmp_path):
    samples = [{"__key__": f"t{i:04d}", "npy": np.zeros(4, np.float32), "txt": "cat"} for i in range(16)]
    train = write_split(tmp_path / "shards", "train", samples)
    line = error_line(
        run_dtrain(train_args(tmp_path, f"data.train={train}", "data.sample={x: npy, y: txt}"), tmp_path, check=False)
    )
    assert "cannot tell the task" in line and "train-0.tar" in line and "data.task=" in line, line


# ---- class labels outside data.num_classes (#32) ------------------------------------------------------------
@pytest.mark.parametrize("label, workers, memory", [(7, 0, False), (7, 1, False), (-1, 0, True)])
def test_a_class_label_outside_num_classes_is_one_line(tmp_path, label, workers, memory):
    """The bad label is sample 45 of 64, past the first batches the start-up reads: it is found as training
    reads it, in the DataLoader worker or the in-memory split, not by cross-entropy's IndexError (on a GPU,
    a device-side assert)."""
    train = write_split(tmp_path / "shards", "train", class_samples(64, "c", bad={45: label}))
    val = write_split(tmp_path / "shards", "val", class_samples(16, "v", seed=1))
    proc = run_dtrain(
        train_args(
            tmp_path,
            f"data.train={train}",
            f"data.val={val}",
            "data.sample={x: npy, y: cls}",
            "data.num_classes=3",
            f"data.num_workers={workers}",
            f"data.in_memory={memory}",
        ),
        tmp_path,
        check=False,
    )
    line = error_line(proc)
    assert "sample 'c0045'" in line and "train-0.tar" in line and f"class label {label}" in line, line
    assert (
        ("data.num_classes is 3" in line and "set data.num_classes" in line) if label > 0 else "fix the label" in line
    ), line


def test_class_labels_of_dtrains_own_shards_and_of_every_kind_are_checked(tmp_path):
    from dtrain.data.shards import write_shards
    from dtrain.data.pipeline import ShardStream
    from dtrain.data.samples import ClassLabels, DtrainFormat

    x = np.zeros((20, 1, 2, 2), np.uint8)
    y = np.arange(20) % 4  # classes 0..3: a descriptor saying 3 is wrong
    index = write_shards(
        tmp_path / "own",
        {"train": (x, y)},
        {"task": "classification", "num_classes": 3, "input_shape": [1, 2, 2], "x_scale": 1.0},
        8,
    )
    stream = ShardStream(
        index,
        "train",
        batch_size=4,
        rank=0,
        world_size=1,
        sample_format=DtrainFormat("classification", 1.0, ClassLabels(3)),
    )
    with pytest.raises(
        DataError,
        match=r"sample 'train-0000003' of .*train-000000.tar has the class label 3, but "
        r"data.num_classes is 3",
    ):
        list(stream.epoch(0))

    check = ClassLabels(5)
    for fine in (
        4,
        np.int64(0),
        torch.tensor([0, 4]),
        np.array([[1, 2]], np.uint8),
        True,
        "cat",
        torch.zeros(0, dtype=torch.long),
    ):
        check(fine, "k", "s.tar")
    for bad, said in (
        (torch.tensor([1, 5]), "label 5"),
        (np.array([-3, 2]), "label -3"),
        (np.int32(9), "label 9"),
        (2.5, "label 2.5, not a class index"),
        (torch.ones(2), "float32 array, not a class"),
    ):
        with pytest.raises(DataError, match=said):
            check(bad, "k", "s.tar")
    ClassLabels(5, floats=False)(2.5, "k", "s.tar")  # a collate hook makes classes of them


# ---- decompression bombs (#33) -----------------------------------------------------------------------------
def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels (its data: a few rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 2, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )


def png(size: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [30000, 10000])  # above PIL's hard limit; between its warning and its error
def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(side, monkeypatch):
    """PIL raises above twice MAX_IMAGE_PIXELS (89,478,485) but only warns between it and that, then decodes:
    a 10000 x 10000 image became a 1.2 GB float tensor. Refused before PIL allocates its pixels (load)."""
    loads = []
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: loads.append(self) or pytest.fail("decoded"))
    data = png_declaring(side, side)
    assert len(data) < 2000
    with pytest.raises(DataError) as e:
        FieldMap({"x": "png"})({"__key__": "bomb", "__url__": "/data/evil-0.tar", "png": data})
    line = str(e.value)
    assert len(line.splitlines()) == 1 and "bomb.png of /data/evil-0.tar" in line, line
    assert f"declares {side * side:,} pixels, more than PIL.Image.MAX_IMAGE_PIXELS (89,478,485)" in line, line
    assert not loads


def test_a_decompression_bomb_in_a_training_run_is_one_line(tmp_path, monkeypatch):
    """Real images under a lowered PIL.Image.MAX_IMAGE_PIXELS (PIL's own setting, honoured as it is), one of
    them past it (and under twice it: PIL alone would decode it with a warning)."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 200)
    samples = [{"__key__": f"i{i:04d}", "png": png(12 if i != 21 else 16), "cls": i % 2} for i in range(32)]
    train = write_split(tmp_path / "shards", "train", samples)  # 144 pixels each; i0021: 256
    line = error_line(
        run_dtrain(
            train_args(
                tmp_path,
                f"data.train={train}",
                "data.sample={x: png, y: cls}",
                "data.num_classes=2",
                "data.shuffle_buffer=0",
            ),
            tmp_path,
            check=False,
        )
    )
    assert "i0021.png of" in line and "train-0.tar" in line and "declares 256 pixels" in line, line


def test_a_gz_member_inflating_past_the_limit_is_refused(monkeypatch):
    """webdataset's gzfilter inflated a .gz member whatever its size (1 MB of gzip holds 1 GB of zeros); here
    zlib inflates at most GZ_LIMIT bytes (lowered to 1 MB for the test) and the member is refused."""
    import gzip

    from dtrain.data import samples

    monkeypatch.setattr(samples, "GZ_LIMIT", 2**20)
    bomb = gzip.compress(bytes(2**21))
    assert len(bomb) < 5000
    with pytest.raises(
        DataError,
        match=r"cannot decode evil.npy.gz of /data/evil-0.tar \(ValueError: it inflates to "
        r"more than 1,048,576 bytes",
    ):
        FieldMap({"x": "npy.gz"})({"__key__": "evil", "__url__": "/data/evil-0.tar", "npy.gz": bomb})
    arr = io.BytesIO()
    np.save(arr, np.arange(6))
    half = len(arr.getvalue()) // 2  # two gzip members, then zero padding: what gzip itself reads
    data = gzip.compress(arr.getvalue()[:half]) + gzip.compress(arr.getvalue()[half:]) + bytes(8)
    fields = FieldMap({"x": "npy.gz", "y": "json.gz"})(
        {"__key__": "k", "__url__": "u", "npy.gz": data, "json.gz": gzip.compress(b"[2.5]")}
    )
    assert fields["x"].tolist() == list(range(6)) and fields["y"] == [2.5]


# ---- pickles: no member runs code (#33) ------------------------------------------------------------------
class Planted:
    """Unpickled, it creates the file `path` (builtins.open): proof that loading ran code from the data."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def hostile(ext: str, marker: Path) -> bytes:
    buf = io.BytesIO()
    if ext == "pth":
        torch.save({"weights": torch.zeros(2), "extra": Planted(marker)}, buf)
    elif ext == "npy":
        np.save(buf, np.array([Planted(marker)], dtype=object), allow_pickle=True)
    else:
        import pickle

        return pickle.dumps(Planted(marker))
    return buf.getvalue()


@pytest.mark.parametrize("ext", ["pth", "npy", "pyd", "pkl", "pickle", "pth.gz"])
def test_a_member_that_would_run_code_is_refused(tmp_path, ext):
    """.pth through torch.load(weights_only=True) and .npy through np.load(allow_pickle=False) were already
    safe (the marker pins it; the .pth refusal was torch's page-long message, the .npy one numpy's words);
    webdataset's default decoders unpickled .pyd/.pkl/.pickle members, which ran the code."""
    marker = tmp_path / "ran"
    data = hostile(ext.removesuffix(".gz"), marker)
    if ext.endswith(".gz"):
        import gzip

        data = gzip.compress(data)
    with pytest.raises(DataError) as e:
        FieldMap({"x": ext})({"__key__": "evil", "__url__": "/data/evil-0.tar", ext: data})
    line = str(e.value)
    assert len(line.splitlines()) == 1 and f"evil.{ext} of /data/evil-0.tar" in line, line
    assert "never unpickles" in line, line
    assert not marker.exists()


def test_plain_tensors_and_arrays_still_decode():
    buf = io.BytesIO()
    torch.save({"w": torch.arange(3)}, buf)
    arr = io.BytesIO()
    np.save(arr, np.arange(4, dtype=np.int16))
    fields = FieldMap({"a": "pth", "b": "npy", "c": "json", "d": "cls"})(
        {"__key__": "k", "__url__": "u", "pth": buf.getvalue(), "npy": arr.getvalue(), "json": b"[1.5]", "cls": b"2"}
    )
    assert torch.equal(fields["a"]["w"], torch.arange(3)) and fields["b"].dtype == np.int16
    assert fields["c"] == [1.5] and fields["d"] == 2


@pytest.mark.parametrize("ext", ["pth", "npy", "pyd"])
def test_a_hostile_member_in_a_training_run_runs_no_code(tmp_path, ext):
    """Sample 37 of 48 carries the hostile member in place of a plain one: the run ends in one line naming
    it and its shard; nothing was run (each sample's input is a .pth tensor, a .npy array, or for .pyd the
    first member already is a pickle)."""
    marker = tmp_path / "ran"
    rng = np.random.default_rng(0)

    def plain(i):
        x = vector(rng, i % 3)
        if ext == "npy":
            return x
        buf = io.BytesIO()
        torch.save(torch.from_numpy(x), buf)
        return buf.getvalue()

    samples = [
        {"__key__": f"s{i:04d}", ext: hostile(ext, marker) if i == 37 or ext == "pyd" else plain(i), "cls": i % 3}
        for i in range(48)
    ]
    train = write_split(tmp_path / "shards", "train", samples)
    line = error_line(
        run_dtrain(
            train_args(
                tmp_path,
                f"data.train={train}",
                f"data.sample={{x: {ext}, y: cls}}",
                "data.num_classes=3",
                "data.num_workers=1",
            ),
            tmp_path,
            check=False,
        )
    )
    key = "s0000" if ext == "pyd" else "s0037"
    assert f"{key}.{ext} of" in line and "train-0.tar" in line, line
    assert not marker.exists()


def test_the_labels_a_sample_function_returns_are_checked():
    """The label check applies to fields a data.sample function returns, and only to y."""
    from dtrain.data.samples import ClassLabels, MappedFormat

    fmt = MappedFormat(lambda s: {"x": 0, "y": int(s["cls"]), "other": -5}, labels=ClassLabels(2))
    assert fmt.decode({"__key__": "a", "__url__": "u.tar", "cls": b"1"})["y"] == 1
    with pytest.raises(DataError, match="sample 'b' of u.tar has the class label 2, but data.num_classes is 2"):
        fmt.decode({"__key__": "b", "__url__": "u.tar", "cls": b"2"})
