"""A number inside a sample's JSON member as a field, from the config alone: data.sample={x: png, y: json#/count}
(a JSON pointer after `#`, which no member extension holds). Shards written with webdataset's own TarWriter."""

import io
import json

import numpy as np
import pytest

from dtrain.config import ConfigError, DataConfig
from dtrain.data import build_streams
from dtrain.data.samples import FieldMap
from dtrain.data.shards import DataError


def write_counts(root, labels, n=48, per_shard=24):
    """8x8 grey PNGs holding `count` white pixels, with {"count": count, "boxes": [...]} in a json member;
    `labels(count)` is the value stored (an int or a float). -> the train descriptor, counted by dtrain index."""
    import webdataset as wds
    from PIL import Image

    from dtrain.cli import main

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(n // per_shard):
        shards.append(root / f"train-{s}.tar")
        with wds.TarWriter(str(shards[-1])) as sink:
            for i in range(per_shard):
                count = int(rng.integers(0, 10))
                image = np.zeros(64, np.uint8)
                image[rng.choice(64, count, replace=False)] = 255
                png = io.BytesIO()
                Image.fromarray(image.reshape(8, 8)).save(png, format="PNG")
                meta = {"count": labels(count), "boxes": [[count, 1]], "a/b": count}
                sink.write({"__key__": f"s{s}-{i:03d}", "png": png.getvalue(), "json": json.dumps(meta).encode()})
    assert main(["index", *map(str, shards), "--out", str(root / "train.json")]) == 0
    return root / "train.json"


def streams(descriptor, y="json#/count", **data):
    cfg = DataConfig(train=str(descriptor), sample={"x": "png", "y": y}, image="l", batch_size=8, num_workers=0, **data)
    return build_streams(cfg, seed=0, rank=0, world_size=1)


def first_labels(s):
    batch = next(iter(s.train.epoch(0)))
    count = (batch["x"] > 0.5).flatten(1).sum(1)  # the white pixels the image holds
    return batch["y"], count


def test_a_number_in_a_json_member_is_the_target_and_its_type_says_the_task(tmp_path):
    """Integer counts are classes, unless data.task says regression; float values a regression (the task
    from the labels, as for a cls member). The value is the json's, sample by sample."""
    ints = write_counts(tmp_path / "ints", int)
    s = streams(ints)
    y, count = first_labels(s)
    assert s.task == "classification" and y.dtype.is_floating_point is False and y.tolist() == count.tolist()
    assert s.notes == [
        "data: task classification: the first training samples' labels (field y) are integers; set data.task to choose"
    ]
    s = streams(ints, task="regression")
    assert s.task == "regression" and s.notes == [] and first_labels(s)[0].tolist() == first_labels(s)[1].tolist()
    floats = write_counts(tmp_path / "floats", lambda c: c / 2)
    s = streams(floats)
    y, count = first_labels(s)
    assert s.task == "regression" and y.is_floating_point() and (y * 2).tolist() == count.tolist()
    # nested: list items by index, and RFC 6901's ~1 for a / inside a key
    y, count = first_labels(streams(ints, y="json#/boxes/0/0"))
    assert y.tolist() == count.tolist()
    assert first_labels(streams(ints, y="json#/a~1b"))[0].tolist() == count.tolist()


def test_a_count_regression_trains_from_the_config_alone(tmp_path, capsys):
    """dtrain train on TarWriter shards (png + json): data.sample={x: png, y: json#/count}, data.task=regression;
    the validation error falls, and validation reports the regression's metrics."""
    from dtrain.cli import main

    train = write_counts(tmp_path / "data", int, n=96)
    assert (
        main(
            [
                "train",
                f"data.train={train}",
                f"data.val={train}",
                "data.sample={x: png, y: json#/count}",
                "data.image=l",
                "data.task=regression",
                "data.batch_size=16",
                "model.factory=mlp",
                "model.kwargs.hidden=[32]",
                "optim.lr=0.01",
                "train.epochs=6",
                f"run.dir={tmp_path / 'runs'}",
                "run.name=count",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (tmp_path / "runs/count/metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if "val/mae" in r]
    assert len(vals) == 6 and "val/acc" not in vals[-1] and vals[-1]["val/mse"] < vals[0]["val/mse"] / 4, vals
    assert vals[-1]["val/mae"] < 2.5  # counts are 0..9: predicting their mean is off by 2.5 on average


def sample(meta, key="k1", url="shard-7.tar"):
    return {"__key__": key, "__url__": url, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize(
    "meta, message",
    [
        (
            {"n": 3},
            "data: sample 'k1' of shard-7.tar: its .json member has no /count for data.sample.y (at 'count' it "
            "has keys n)",
        ),
        (
            {"count": "7"},
            "data: sample 'k1' of shard-7.tar: /count of its .json member (data.sample.y) is \"7\", not a number",
        ),
        (
            {"count": None},
            "data: sample 'k1' of shard-7.tar: /count of its .json member (data.sample.y) is null, not a number",
        ),
        (
            {"count": True},
            "data: sample 'k1' of shard-7.tar: /count of its .json member (data.sample.y) is true, not a number",
        ),
        (
            [1, 2],
            "data: sample 'k1' of shard-7.tar: its .json member has no /count for data.sample.y (at 'count' it "
            "has a list of 2)",
        ),
        (
            {"cuont": 3, "n": 1},
            "data: sample 'k1' of shard-7.tar: its .json member has no /count for data.sample.y "
            "(at 'count' it has keys cuont, n; did you mean 'cuont'?)",
        ),
    ],
)
def test_a_missing_or_non_number_field_is_one_line_naming_sample_shard_and_field(meta, message):
    with pytest.raises(DataError) as e:
        FieldMap({"y": "json#/count"})(sample(meta))
    assert str(e.value) == message


def test_a_missing_field_ends_training_in_one_line(tmp_path, capsys):
    from dtrain.cli import main

    train = write_counts(tmp_path / "data", int)
    assert (
        main(
            [
                "train",
                f"data.train={train}",
                "data.sample={x: png, y: json#/total}",
                "data.image=l",
                "data.task=regression",
                "data.batch_size=8",
                "model.factory=mlp",
                "train.max_steps=2",
                f"run.dir={tmp_path / 'runs'}",
                "log.progress=false",
                "run.doctor=false",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"dtrain: error: data: sample 's0-000' of {tmp_path / 'data/train-0.tar'}: its .json "
        "member has no /total for data.sample.y (at 'total' it has keys count, boxes, a/b)"
    ), err


def test_the_syntax_cannot_be_taken_for_extensions():
    """`;` alternatives and dotted extensions (seg.png) are unchanged; a `#` without a pointer is refused."""
    fields = FieldMap({"x": "jpg;seg.png", "y": "json;json.gz#/labels/0"})
    assert fields.fields == {"x": ["jpg", "seg.png"], "y": ["json", "json.gz"]}
    assert fields.pointers == {"y": ["labels", "0"]}
    assert FieldMap({"y": "json"})({"__key__": "k", "json": b'{"count": 7}'}) == {"y": {"count": 7}}
    with pytest.raises(
        ConfigError,
        match=r"^config: data.sample.y: 'json#count': after '#' comes a JSON pointer "
        r"starting with '/', e.g. y: 'json#/count'$",
    ):
        FieldMap({"y": "json#count"})
