"""Shards and descriptors are data (issues #32.4, #33): a descriptor runs no command unless the user says so,
`dtrain index` counts a shard whole or not at all and writes only a regular file, and a crafted tar (names
that climb out, links, a header declaring 2^50 bytes, a negative size, a looping pax record) is one error
line or skipped, never written to disk, followed, allocated or looped on. Every hostile shard is built here
with Python's tarfile, on disk, and read through `dtrain index` and a training run (in this process)."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_dtrain
from dtrain.data import tario
from test_sources import image_sample, train_args, write_tar


def shard(path: Path, n: int = 8, extra=(), at: int = 0) -> Path:
    """A shard of `n` jpg+cls+json samples as any tool writes it, with `extra` members ((TarInfo, data),
    from `member`) after the first `at` samples."""
    samples = [image_sample(i, np.random.default_rng(i)) for i in range(n)]
    members = [member(f"{s['__key__']}.{ext}", s[ext]) for s in samples for ext in ("jpg", "cls", "json")]
    members[3 * at : 3 * at] = extra
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return path


def member(name: str, data: bytes = b"", kind=tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data), linkname
    return info, data


def patch_header(path: Path, name: str, field: slice, value: bytes) -> None:
    """Overwrite `field` of the header of member `name` and fix its checksum: what a crafted tar holds."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(name).offset
    data = bytearray(path.read_bytes())
    header = data[offset : offset + 512]
    header[field] = value.ljust(field.stop - field.start, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[offset : offset + 512] = header
    path.write_bytes(bytes(data))


def names(path: Path) -> list[str]:
    """The members dtrain's reader yields from a shard."""
    with open(path, "rb") as f:
        return [m["fname"] for m in tario.tar_file_iterator(f)]


def dtrain(tmp_path: Path, *args: str):
    return run_dtrain(list(args), tmp_path, check=False)


def error_of(proc) -> str:
    """The run's one error line (exit 2, no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("dtrain: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


def index(tmp_path: Path, *shards: Path, out: str = "d.json"):
    return dtrain(tmp_path, "index", *map(str, shards), "--out", str(tmp_path / out))


def train(tmp_path: Path, *overrides: str):
    return dtrain(tmp_path, *train_args(tmp_path, "train.max_steps=1", "data.num_workers=0", *overrides))


# ---- a descriptor's pipe: URLs run only when the user says so --------------------------------------------------
def pipe_descriptor(tmp_path: Path, good: Path, marker: Path, name: str = "d.json") -> Path:
    d = {"shardlist": [{"url": good.name, "nsamples": 8}, {"url": f"pipe:touch {marker}; cat {good}", "nsamples": 8}]}
    (tmp_path / name).write_text(json.dumps(d))
    return tmp_path / name


@pytest.mark.parametrize("where", ["train", "val", "folder"])
def test_a_descriptor_pipe_runs_only_with_trust_descriptor_pipes(tmp_path, where):
    good, marker, plain = shard(tmp_path / "good.tar"), tmp_path / "ran", tmp_path / "plain.json"
    assert index(tmp_path, good, out="plain.json").returncode == 0
    if where == "folder":  # a directory of descriptors: train.json is the hostile one
        (tmp_path / "dir").mkdir()
        good = shard(tmp_path / "dir" / "good.tar")
        hostile = pipe_descriptor(tmp_path / "dir", good, marker, "train.json")
        split = [f"data.dataset=folder:{tmp_path / 'dir'}"]
    else:
        hostile = pipe_descriptor(tmp_path, good, marker)
        split = [f"data.train={hostile}"] if where == "train" else [f"data.train={plain}", f"data.val={hostile}"]
    line = error_of(train(tmp_path, *split))
    assert f"{hostile}: shardlist[1] is a shell command ('pipe:touch {marker}" in line
    assert "data.trust_descriptor_pipes=true" in line and not marker.exists()
    # the user's say-so: it runs
    assert train(tmp_path, *split, "data.trust_descriptor_pipes=true", "run.name=trusted").returncode == 0
    assert marker.exists()


@pytest.mark.parametrize("url", ["PIPE:touch {m}", " pipe:touch {m}", "Pipe:touch {m}"])
def test_a_pipe_in_any_spelling_gopen_runs_is_refused(tmp_path, url):
    """webdataset's gopen picks its handler by the scheme as urlparse reads it (case-insensitive, leading
    blanks stripped): every URL it would hand to its pipe handler is refused, not only "pipe:" as typed."""
    from dtrain.data import DataError
    from dtrain.data.sources import Descriptor

    (tmp_path / "d.json").write_text(
        json.dumps({"shardlist": [{"url": url.format(m=tmp_path / "ran"), "nsamples": 1}]})
    )
    with pytest.raises(DataError, match=r"shardlist\[0\] is a shell command"):
        Descriptor.read(str(tmp_path / "d.json"))


def test_a_counts_descriptor_is_only_looked_up(tmp_path):
    """data.counts' URLs are keys for the patterns the user wrote: a pipe: key no pattern names runs nothing,
    and a pipe: pattern the user wrote runs with its count from the file `dtrain index` wrote for it."""
    good, marker = shard(tmp_path / "good.tar"), tmp_path / "ran"
    counts = pipe_descriptor(tmp_path, good, marker)
    assert train(tmp_path, f"data.train={good}", f"data.counts={counts}").returncode == 0
    assert not marker.exists()
    user_pipe = f"pipe:cat {good}"
    assert dtrain(tmp_path, "index", user_pipe, "--out", str(tmp_path / "p.json")).returncode == 0
    assert (
        train(tmp_path, f"data.train={user_pipe}", f"data.counts={tmp_path / 'p.json'}", "run.name=piped").returncode
        == 0
    )
    # the same file as data.train is a descriptor whose pipe would run: refused
    assert "shardlist[0] is a shell command" in error_of(train(tmp_path, f"data.train={tmp_path / 'p.json'}"))


def test_eval_of_a_run_whose_descriptor_became_a_pipe(tmp_path):
    good, marker = shard(tmp_path / "good.tar"), tmp_path / "ran"
    assert index(tmp_path, good, out="val.json").returncode == 0
    assert index(tmp_path, good, out="train.json").returncode == 0
    assert (
        train(
            tmp_path, f"data.train={tmp_path / 'train.json'}", f"data.val={tmp_path / 'val.json'}", "run.name=r"
        ).returncode
        == 0
    )
    pipe_descriptor(tmp_path, good, marker, "val.json")  # replaced after the run: eval reads it again
    line = error_of(dtrain(tmp_path, "eval", "--checkpoint", str(tmp_path / "runs" / "r"), "--split", "val"))
    assert "val.json: shardlist[1] is a shell command" in line and not marker.exists()


def test_relative_urls_resolve_against_the_descriptor_and_may_climb_out(tmp_path):
    """A descriptor may list ../shards/x.tar (shards beside the descriptors' directory): reading a file as a
    shard runs nothing and writes nothing; a file that is no shard is a read error naming it."""
    for sub in ("shards", "meta"):
        (tmp_path / sub).mkdir()
    good = shard(tmp_path / "shards" / "good.tar")
    (tmp_path / "meta" / "d.json").write_text(json.dumps({"shardlist": [{"url": "../shards/good.tar", "nsamples": 8}]}))
    assert train(tmp_path, f"data.train={tmp_path / 'meta' / 'd.json'}").returncode == 0
    (tmp_path / "not-a-shard").write_bytes(b"secret\n" * 200)
    (tmp_path / "meta" / "e.json").write_text(
        json.dumps(
            {"shardlist": [{"url": "../shards/good.tar", "nsamples": 8}, {"url": "../not-a-shard", "nsamples": 8}]}
        )
    )
    line = error_of(
        train(
            tmp_path,
            f"data.train={tmp_path / 'meta' / 'e.json'}",
            "run.name=e",
            "data.shuffle_buffer=0",
            "train.max_steps=4",
        )
    )
    assert f"cannot read {tmp_path / 'not-a-shard'}" in line and good.exists()


def test_a_shard_that_is_a_fifo_or_a_device_is_refused_before_it_is_opened(tmp_path):
    """A fifo (or /dev/stdin) listed as a shard would block the reader forever, /dev/zero read as an empty tar."""
    shard(tmp_path / "good.tar")
    os.mkfifo(tmp_path / "fifo")
    for bad in (tmp_path / "fifo", Path("/dev/zero")):
        (tmp_path / "d.json").write_text(
            json.dumps({"shardlist": [{"url": "good.tar", "nsamples": 8}, {"url": str(bad), "nsamples": 8}]})
        )
        line = error_of(
            train(
                tmp_path,
                f"data.train={tmp_path / 'd.json'}",
                "data.shuffle_buffer=0",
                "train.max_steps=4",
                f"run.name={bad.name}",
            )
        )
        assert f"cannot read {bad}" in line and "not a regular file" in line
        assert f"{bad} is not a regular file" in error_of(index(tmp_path, bad))


# ---- dtrain index: whole shards or an error; a regular file or nothing ------------------------------------------
def test_index_of_a_corrupt_gzip_shard_is_an_error(tmp_path):
    raw = shard(tmp_path / "s.tar", n=64).read_bytes()
    at = raw.index(b'{"i": 40}')
    changed = raw[:at] + b'{"i": 41}' + raw[at + 9 :]  # a member no mapping decodes: only the CRC tells
    # the gzip of the changed tar with the original's CRC and length: what a flipped bit on disk leaves
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(changed, mtime=0)[:-8] + gzip.compress(raw, mtime=0)[-8:])
    line = error_of(index(tmp_path, tmp_path / "s.tar.gz"))
    assert f"cannot read {tmp_path / 's.tar.gz'}" in line and "CRC check failed" in line
    assert not (tmp_path / "d.json").exists()
    # and a training read of it (the descriptor from the intact one): the same error, not a shorter shard
    (tmp_path / "t.json").write_text(json.dumps({"shardlist": [{"url": "s.tar.gz", "nsamples": 64}]}))
    assert "CRC check failed" in error_of(train(tmp_path, f"data.train={tmp_path / 't.json'}", "train.max_steps=8"))
    # an intact one reads whole
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(raw, mtime=0))
    assert index(tmp_path, tmp_path / "s.tar.gz").returncode == 0
    assert json.loads((tmp_path / "d.json").read_text())["shardlist"][0]["nsamples"] == 64


def test_index_warns_of_an_empty_shard(tmp_path):
    good = shard(tmp_path / "good.tar")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    proc = index(tmp_path, good, tmp_path / "empty.tar")
    assert proc.returncode == 0
    assert f"index: {tmp_path / 'empty.tar'} holds no samples" in proc.stderr
    assert [s["nsamples"] for s in json.loads((tmp_path / "d.json").read_text())["shardlist"]] == [8, 0]


def special_files(tmp_path: Path) -> list[Path]:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    found = [tmp_path / "fifo", tmp_path / "dir"]
    try:  # a character device like /dev/full (1, 7), where this test may make one (root)
        os.mknod(tmp_path / "full", stat.S_IFCHR | 0o666, os.makedev(1, 7))
        found.append(tmp_path / "full")
    except (PermissionError, OSError):
        pass
    return found


def test_index_writes_only_a_regular_file(tmp_path):
    good = shard(tmp_path / "good.tar")
    for path in special_files(tmp_path):
        before = path.lstat()
        line = error_of(index(tmp_path, good, out=path.name))
        assert f"cannot write the descriptor {path}: it is a" in line and "not a regular file" in line
        assert (path.lstat().st_mode, path.lstat().st_ino) == (before.st_mode, before.st_ino)
    # nor the shard it counts
    assert "it is one of the shards it lists" in error_of(index(tmp_path, good, out="good.tar"))
    assert tarfile.is_tarfile(good)
    # a regular file is replaced whole, through a temp file that does not stay behind
    (tmp_path / "d.json").write_text("old")
    assert index(tmp_path, good).returncode == 0
    assert json.loads((tmp_path / "d.json").read_text())["shardlist"][0]["nsamples"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---- hostile tar members --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../hostile-x.cls", "{tmp}/abs/hostile-x.cls", "s00001/../s00002.cls"])
def test_a_member_that_climbs_out_refuses_the_shard(tmp_path, name):
    name = name.format(tmp=tmp_path)
    bad = shard(tmp_path / "bad.tar", extra=[member(name, b"1")], at=4)
    where = [tmp_path.parent.parent / "hostile-x.cls", tmp_path / "abs" / "hostile-x.cls"]
    line = error_of(index(tmp_path, bad))
    assert f"cannot read {bad}" in line and f"member {name!r} has an absolute or '..' name" in line
    # a training read (its count from a descriptor that hides it)
    (tmp_path / "d.json").write_text(json.dumps({"shardlist": [{"url": "bad.tar", "nsamples": 9}]}))
    line = error_of(train(tmp_path, f"data.train={tmp_path / 'd.json'}", "data.shuffle_buffer=0", "train.max_steps=3"))
    assert f"member {name!r} has an absolute or '..' name" in line
    assert not any(p.exists() for p in where)  # nothing was extracted anywhere
    # "./key.ext" (tar -C dir .) is a plain name: read as it is
    ok = tmp_path / "dot.tar"
    write_tar(
        ok,
        [{**s, "__key__": "./" + s["__key__"]} for s in (image_sample(i, np.random.default_rng(i)) for i in range(3))],
    )
    assert index(tmp_path, ok, out="dot.json").returncode == 0


def test_links_are_skipped_never_followed(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the model")
    links = [
        member("s00002.txt", kind=tarfile.SYMTYPE, linkname=str(secret)),
        member("s00003.txt", kind=tarfile.LNKTYPE, linkname="s00000.cls"),
        member("s00009.jpg", kind=tarfile.SYMTYPE, linkname=str(secret)),
    ]  # a sample of links alone
    path = shard(tmp_path / "links.tar", extra=links, at=4)
    assert [name for name in names(path) if "txt" in name or name.startswith("s00009")] == []
    assert index(tmp_path, path).returncode == 0
    assert json.loads((tmp_path / "d.json").read_text())["shardlist"][0]["nsamples"] == 8  # s00009: no sample
    assert (
        train(tmp_path, f"data.train={tmp_path / 'd.json'}", "data.shuffle_buffer=0", "train.max_steps=1").returncode
        == 0
    )


def test_a_link_header_that_declares_data_reads_as_tarfile_reads_it(tmp_path):
    """No data follows a link's header whatever size it declares (tarfile, and so webdataset, read none): a
    reader that skipped that many bytes would see other members than they do."""
    path = shard(tmp_path / "l.tar", n=3, extra=[member("s00000.txt", kind=tarfile.SYMTYPE, linkname="x")], at=1)
    patch_header(path, "s00000.txt", slice(124, 136), b"%011o" % 512)  # hides s00001.jpg's header as "data"
    with tarfile.open(path) as tar:
        expected = [m.name for m in tar if m.isreg()]
    assert names(path) == expected
    assert index(tmp_path, path).returncode == 0
    assert json.loads((tmp_path / "d.json").read_text())["shardlist"][0]["nsamples"] == 3


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])  # base-256 size field; pax "size"
def test_a_header_declaring_2_to_the_50_bytes_is_one_line(tmp_path, fmt):
    info = tarfile.TarInfo("s00002.big")
    info.size = 2**50
    path = tmp_path / "big.tar"
    write_tar(path, [image_sample(i, np.random.default_rng(i)) for i in range(2)])
    with tarfile.open(path, "a", format=fmt) as tar:
        tar.addfile(info)  # the header alone
    says = "member 's00002.big' declares 1125899906842624 bytes, more than the file holds"
    for source in (path, f"pipe:cat {path}"):  # seeked over in a file, read in bounded chunks from a pipe
        line = error_of(index(tmp_path, source))
        assert f"cannot read {source}" in line and says in line
    (tmp_path / "d.json").write_text(json.dumps({"shardlist": [{"url": "big.tar", "nsamples": 3}]}))
    line = error_of(
        train(
            tmp_path,
            f"data.train={tmp_path / 'd.json'}",
            "data.shuffle_buffer=0",
            "train.max_steps=3",
            "data.batch_size=1",
        )
    )
    assert f"cannot read {path}" in line and says in line


class Bounded(io.BufferedReader):
    """A local shard whose reads and seeks are counted: a reader that loops on a header fails, not hangs."""

    def __init__(self, path):
        super().__init__(io.FileIO(path))
        self.calls = 0

    def _count(self):
        self.calls += 1
        if self.calls > 1000:
            raise AssertionError("the reader loops")

    def read(self, n=-1):
        self._count()
        return super().read(n)

    def seek(self, *a):
        self._count()
        return super().seek(*a)


@pytest.mark.parametrize("case", ["negative size", "pax record of length 0"])
def test_a_header_that_would_loop_the_reader_is_an_error(tmp_path, case):
    path = tmp_path / "loop.tar"
    write_tar(path, [image_sample(i, np.random.default_rng(i)) for i in range(2)])
    if case == "negative size":  # GNU base-256, negative: -512 would seek back onto this same header
        patch_header(path, "s00001.cls", slice(124, 136), b"\xff" * 10 + (-512).to_bytes(2, "big", signed=True))
        says = "member 's00001.cls' declares a negative size"
    else:
        with tarfile.open(path, "a", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("s00002.cls")
            info.pax_headers = {"comment": "x"}
            tar.addfile(info)
        data = bytearray(path.read_bytes())
        at = data.index(b" comment=x\n") - 2  # "18 comment=x\n" -> "00 comment=x\n"
        data[at : at + 2] = b"00"
        path.write_bytes(bytes(data))  # a pax header's checksum covers its header block, not its records
        says = "malformed pax header"
    for payloads in (False, True):
        with pytest.raises(tarfile.ReadError, match=says):
            list(tario.tar_file_iterator(Bounded(path), payloads=payloads))
    assert says in error_of(index(tmp_path, path))


# ---- dtrain shard --out: a directory of shards is replaced whole, nothing else is --------------------------------
def test_shard_out_replaces_only_a_directory_dtrain_wrote(tmp_path):
    from PIL import Image

    shard_digits = ["shard", "--dataset", "digits", "--shard-size", "2000", "--out"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    line = error_of(dtrain(tmp_path, *shard_digits, "home"))
    assert "home holds thesis.tex, which dtrain did not write there" in line and "new directory" in line
    assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    assert "file exists and is not a directory" in error_of(dtrain(tmp_path, *shard_digits, "file"))
    # the folder it shards, as its own output: refused before anything is read or written
    for i in range(4):
        (tmp_path / "photos" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "photos" / f"c{i % 2}" / f"{i}.png")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "photos").rglob("*"))
    assert "photos holds c0" in error_of(dtrain(tmp_path, "shard", "--from-folder", "photos", "--out", "photos"))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "photos").rglob("*")) == before
    # shards dtrain wrote are replaced by new ones
    for _ in range(2):
        assert dtrain(tmp_path, *shard_digits, "home/digits").returncode == 0
    assert (tmp_path / "home" / "digits" / "train.json").is_file()


def test_shard_out_keeps_shards_of_the_users_named_as_dtrains(tmp_path):
    """docs/your-data.md's block, run in order: the user's train-000000.tar... counted by `dtrain index` into
    shards/train.json, then `dtrain shard --from-folder photos/ --out shards/` deleted them (exit 0)."""
    import webdataset as wds
    from PIL import Image

    (tmp_path / "shards").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"train-{s:06d}.tar")) as w:
            w.write({"__key__": f"k{s}", "cls": 0})
    (tmp_path / "photos" / "c0").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "c0" / "0.png")
    shard = ["shard", "--from-folder", "photos", "--out", "shards"]
    assert "shards holds train-000000.tar, which dtrain did not write" in error_of(dtrain(tmp_path, *shard))
    assert dtrain(tmp_path, "index", "shards/train-{000000..000001}.tar", "--out", "shards/train.json").returncode == 0
    assert "shards holds train.json, which dtrain did not write" in error_of(dtrain(tmp_path, *shard))
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
        "train.json",
    ]
