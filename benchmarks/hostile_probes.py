"""Hostile and broken inputs against the `dtrain` command, each in a fresh directory, classified as a review
would: `clean` (what should happen: one `dtrain: error:` line and exit 2, or a right result), `noisy` (refused,
but with a traceback or without the one line), `wrong` (exit 0 with a wrong result, or code run / a secret
written), `hang` (no exit within the probe's limit), `data loss` (a file that existed is destroyed).

    python benchmarks/hostile_probes.py [--only NAME] [--json OUT]

Run it on two checkouts to compare: DTRAIN_SRC=/path/to/checkout probes that one's dtrain. No network: shards are
written here with webdataset's TarWriter; nothing outside the probe's directory is touched (a character device
for `--out` is made with mknod inside it, as root only).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

SECRET = "sk-probe-4f9c2b7e1d"
ENV_SECRET = "hf_probeTOKEN0123456789"
QUICK = ["train.max_steps=3", "log.progress=false", "run.doctor=false", "train.val_every=3"]


class Probe:
    def __init__(self, root: Path):
        self.root = root
        self.last: subprocess.CompletedProcess | None = None  # the last command, for -v

    def said(self) -> str:
        """The last command's exit code and the last line of its stderr."""
        if self.last is None:
            return ""
        lines = [l for l in self.last.stderr.splitlines() if l.strip()]
        return f"exit {self.last.returncode}: {lines[-1][:300] if lines else ''}"

    def run(self, *args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        # DTRAIN_SRC: a checkout to probe instead of the installed dtrain (e.g. a `git worktree` of an older commit)
        path = os.pathsep.join(filter(None, [os.environ.get("DTRAIN_SRC"), str(self.root)]))
        full = {**os.environ, "PYTHONPATH": path, "HF_TOKEN": ENV_SECRET, **(env or {})}
        try:
            self.last = subprocess.run(
                [sys.executable, "-m", "dtrain", *args],
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=full,
                stdin=subprocess.DEVNULL,
            )
            return self.last
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(args, None, "", "")


def refused(p: subprocess.CompletedProcess) -> str:
    """How a refusal went: clean (exit 2, one error line, no traceback), noisy, wrong (exit 0), hang."""
    if p.returncode is None:
        return "hang"
    if p.returncode == 0:
        return "wrong"
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("dtrain: error:")]
    if p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr and lines[-1] == errors[0]:
        return "clean"  # one line, the last: no continuation lines of a multi-line message
    return "noisy"


def tar_of(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def descriptor(path: Path, shards: list[tuple[str, int]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "__kind__": "wids-shard-index-v1",
                "wids_version": 1,
                "shardlist": [{"url": u, "nsamples": n} for u, n in shards],
            }
        )
    )
    return path


def npy(a) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


def tabular_shard(path: Path, n: int, label=lambda i: str(i % 3).encode(), start: int = 0) -> Path:
    import numpy as np

    rng = np.random.default_rng(start)
    return tar_of(
        path,
        [
            m
            for i in range(start, start + n)
            for m in ((f"s{i:05d}.x.npy", npy(rng.normal(size=8).astype("float32"))), (f"s{i:05d}.cls", label(i)))
        ],
    )


def trained_run(p: Probe, name: str = "r") -> Path:
    p.run("train", f"data.root={p.root}/data", f"run.name={name}", *QUICK, timeout=300)
    return p.root / "runs" / name


# ---- the probes: each returns (class, detail) ----


def lr_inf(p):
    return refused(p.run("train", f"data.root={p.root}/data", "optim.lr=inf", *QUICK)), "optim.lr=inf"


def lr_nan(p):
    return refused(p.run("train", f"data.root={p.root}/data", "optim.lr=nan", *QUICK)), "optim.lr=nan"


def momentum_out_of_range(p):
    return refused(p.run("train", "optim.name=sgd", "optim.momentum=3", *QUICK)), "optim.momentum=3"


def two_configs(p):
    (p.root / "a.yaml").write_text("optim: {lr: 0.123}\n")
    (p.root / "b.yaml").write_text("train: {epochs: 2}\n")
    out = p.run("config", "--config", "a.yaml", "--config", "b.yaml")
    if out.returncode == 2 and "dtrain: error:" in out.stderr:
        return "clean", "refused"
    return ("clean" if "lr: 0.123" in out.stdout and "epochs: 2" in out.stdout else "wrong"), "a.yaml's lr kept"


def binary_config(p):
    (p.root / "c.yaml").write_bytes(bytes(range(256)) * 4)
    return refused(p.run("config", "--config", "c.yaml")), "binary file"


def latin1_config(p):
    (p.root / "c.yaml").write_bytes("run: {name: caf\xe9}\n".encode("latin-1"))
    return refused(p.run("config", "--config", "c.yaml")), "Latin-1 file"


def deep_yaml(p):
    (p.root / "c.yaml").write_text("run: " + "[" * 50000 + "]" * 50000 + "\n")
    return refused(p.run("config", "--config", "c.yaml")), "nested 50,000 deep"


def alias_bomb(p):
    lines = ["model:", "  kwargs:", "    a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (p.root / "c.yaml").write_text("\n".join(lines) + "\n")
    return refused(p.run("config", "--config", "c.yaml", timeout=60)), "10^10-node alias bomb"


def yaml_python_tag(p):
    (p.root / "c.yaml").write_text("run: !!python/object/apply:os.system ['touch PWNED']\n")
    out = p.run("config", "--config", "c.yaml")
    return ("wrong" if (p.root / "PWNED").exists() else refused(out)), "!!python tag"


def override_alias_bomb(p):
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    return refused(p.run("config", f"model.kwargs.x=[{', '.join(levels)}]", timeout=60)), "10^9-value alias override"


def pipe_in_descriptor(p):
    tabular_shard(p.root / "train-0.tar", 20)
    marker = p.root / "PWNED"
    descriptor(p.root / "train.json", [(f"pipe:touch {marker}; cat {p.root}/train-0.tar", 20)])
    out = p.run(
        "train",
        "data.train=train.json",
        "data.sample={x: x.npy, y: cls}",
        "data.num_classes=3",
        "data.batch_size=4",
        *QUICK,
    )
    return ("wrong" if marker.exists() else refused(out)), "pipe: in a descriptor"


def empty_shard_listed(p):
    tabular_shard(p.root / "a.tar", 64)
    (p.root / "b.tar").write_bytes(b"")
    descriptor(p.root / "train.json", [("a.tar", 64), ("b.tar", 64)])
    return refused(
        p.run("train", "data.train=train.json", "data.sample={x: x.npy, y: cls}", "data.num_classes=3", *QUICK)
    ), "0-byte shard listed with 64"


def corrupt_tgz_index(p):
    tar_of(p.root / "a.tar", [(f"s{i:03d}.cls", b"1") for i in range(64)])
    raw = gzip.compress((p.root / "a.tar").read_bytes())
    cut = bytearray(raw)
    cut[len(cut) // 2] ^= 0xFF  # a flipped byte: the CRC (or the stream) fails
    (p.root / "a.tar.gz").write_bytes(bytes(cut))
    return refused(p.run("index", "a.tar.gz", "--out", "a.json")), "corrupt .tar.gz"


def index_out_device(p):
    if os.geteuid() != 0:
        return "clean", "skipped (needs root for mknod)"
    tabular_shard(p.root / "a.tar", 4)
    dev = p.root / "full"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    out = p.run("index", "a.tar", "--out", str(dev))
    if not stat.S_ISCHR(dev.lstat().st_mode):
        return "data loss", "the device became a file"
    return refused(out), "--out a character device"


def huge_tar_header(p):
    data = bytearray(tar_of(p.root / "t.tar", [("s00000.cls", b"1")]).read_bytes())
    size = oct(2**50)[2:].zfill(11).encode() + b"\0"
    data[124:136] = size
    data[148:156] = b" " * 8
    data[148:156] = f"{sum(data[:512]):06o}\0 ".encode()
    (p.root / "t.tar").write_bytes(bytes(data))
    descriptor(p.root / "t.json", [("t.tar", 1)])
    index = refused(p.run("index", "t.tar", "--out", "i.json"))
    train = refused(
        p.run("train", "data.train=t.json", "data.sample={y: cls}", "data.num_classes=2", "data.batch_size=1", *QUICK)
    )
    return (index if index != "clean" else train), "a header declaring 2^50 bytes (index, train)"


def dotdot_member(p):
    tar_of(p.root / "t.tar", [("../../escaped.cls", b"1"), ("s0.cls", b"1")])
    p.run("index", "t.tar", "--out", "t.json")
    escaped = [d / "escaped.cls" for d in (p.root.parent, p.root.parent.parent)]
    return ("wrong" if any(e.exists() for e in escaped) else "clean"), "a ../ member is never written"


def decompression_bomb(p):
    import zlib
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    w = h = 30000
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\0" * (w + 1) * 64, 9)) + chunk(b"IEND", b"")
    tar_of(p.root / "t.tar", [m for i in range(4) for m in ((f"s{i}.png", png), (f"s{i}.cls", b"1"))])
    descriptor(p.root / "t.json", [("t.tar", 4)])
    return refused(
        p.run(
            "train",
            "data.train=t.json",
            "data.sample={x: png, y: cls}",
            "data.num_classes=2",
            "data.batch_size=2",
            *QUICK,
            timeout=120,
        )
    ), "a 30000x30000 PNG"


def pickle_pth_member(p):
    import pickle

    marker = p.root / "PWNED"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    payload = pickle.dumps(Evil())
    tar_of(p.root / "t.tar", [m for i in range(4) for m in ((f"s{i}.x.pth", payload), (f"s{i}.cls", b"1"))])
    descriptor(p.root / "t.json", [("t.tar", 4)])
    out = p.run(
        "train",
        "data.train=t.json",
        "data.sample={x: x.pth, y: cls}",
        "data.num_classes=2",
        "data.batch_size=2",
        *QUICK,
    )
    return ("wrong" if marker.exists() else refused(out)), "a pickle in a .pth member"


def object_npy_member(p):
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    tar_of(p.root / "t.tar", [m for i in range(4) for m in ((f"s{i}.x.npy", buf.getvalue()), (f"s{i}.cls", b"1"))])
    descriptor(p.root / "t.json", [("t.tar", 4)])
    return refused(
        p.run(
            "train",
            "data.train=t.json",
            "data.sample={x: x.npy, y: cls}",
            "data.num_classes=2",
            "data.batch_size=2",
            *QUICK,
        )
    ), "an object-dtype .npy member"


def cls_out_of_range(p):
    tabular_shard(p.root / "t.tar", 64, label=lambda i: b"12" if i == 40 else b"1")
    descriptor(p.root / "t.json", [("t.tar", 64)])
    return refused(
        p.run(
            "train",
            "data.train=t.json",
            "data.sample={x: x.npy, y: cls}",
            "data.num_classes=3",
            "data.batch_size=8",
            "log.progress=false",
            "run.doctor=false",
            "train.epochs=1",
        )
    ), ".cls 12 with data.num_classes=3"


def ten_outputs_scalar_target(p):
    (p.root / "tenout.py").write_text(
        textwrap.dedent("""
        import torch
        def build(**_):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10))
    """)
    )
    return refused(
        p.run(
            "train",
            f"data.root={p.root}/data",
            "data.dataset=count",
            "data.count_samples=200",
            "model.factory=tenout:build",
            *QUICK,
        )
    ), "10 outputs for a scalar target"


def token_ids_over_vocab(p):
    tar_of(
        p.root / "t.tar",
        [
            m
            for i in range(8)
            for m in ((f"s{i}.x.npy", npy(list(range(300, 316)))), (f"s{i}.y.npy", npy(list(range(301, 317)))))
        ],
    )
    descriptor(p.root / "t.json", [("t.tar", 8)])
    return refused(
        p.run(
            "train",
            "data.train=t.json",
            "data.sample={x: x.npy, y: y.npy}",
            "model.factory=gpt",
            "model.kwargs={num_outputs: 256, n_layer: 1, n_head: 1, n_embd: 8}",
            "loss.name=cross_entropy",
            "data.batch_size=4",
            *QUICK,
        )
    ), "token id 315 >= vocabulary 256"


def sys_exit_factory(p):
    (p.root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    return refused(
        p.run("train", f"data.root={p.root}/data", "model.factory=exits:build", *QUICK)
    ), "a factory module that calls sys.exit(3)"


def regression_without_task(p):
    import numpy as np

    rng = np.random.default_rng(0)
    members = []
    for i in range(96):
        x = rng.normal(size=8).astype("float32")
        members += [(f"s{i:04d}.x.npy", npy(x)), (f"s{i:04d}.y.npy", npy(np.float32(x.sum() * 3 + 10)))]
    tar_of(p.root / "t.tar", members)
    descriptor(p.root / "t.json", [("t.tar", 96)])
    out = p.run(
        "train",
        "data.train=t.json",
        "data.val=t.json",
        "data.test=t.json",
        "data.sample={x: x.npy, y: y.npy}",
        "model.kwargs={num_outputs: 1}",
        "log.progress=false",
        "run.doctor=false",
        "train.epochs=1",
        "data.batch_size=16",
    )
    if out.returncode != 0:
        return refused(out), "float labels, data.task left out"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return ("wrong" if "test/acc" in result else "clean"), "float labels scored as " + (
        "classification" if "test/acc" in result else "regression"
    )


def evil_exported_factory(p):
    import torch

    marker = p.root / "PWNED"
    cfg = {
        "data": {"root": str(p.root / "data")},  # the rest: defaults (a saved config may hold fewer keys)
        "model": {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}},
    }
    torch.save({"model": {}, "config": cfg, "step": 1}, p.root / "evil.pt")
    out = p.run("eval", "--checkpoint", "evil.pt")
    return ("wrong" if marker.exists() else refused(out)), "model.factory os:system in an exported file"


def export_over_its_own_state(p):
    run = trained_run(p)
    ckpt = (run / "checkpoints" / "latest").resolve()
    state = ckpt / "state.pt"
    before = state.read_bytes() if state.exists() else b""
    out = p.run("export", "--checkpoint", str(ckpt), "--out", str(state))
    if state.exists() and state.read_bytes() != before:
        return "data loss", "state.pt overwritten by its own export"
    return refused(out), "--out the state.pt being read"


def export_out_directory(p):
    run = trained_run(p)
    (p.root / "d").mkdir()
    return refused(p.run("export", "--checkpoint", str(run), "--out", "d")), "--out an existing directory"


def pointer_to_another_run(p):
    a, b = trained_run(p, "a"), trained_run(p, "b")
    latest = b / "checkpoints" / "latest"
    best = b / "checkpoints" / "best"
    target = os.path.relpath((a / "checkpoints" / "latest").resolve(), latest.parent)
    for pointer in (latest, best):
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(target)
    out = p.run("eval", "--checkpoint", str(b))
    if out.returncode == 0:
        used = str((a / "checkpoints").resolve())
        return ("clean" if used in out.stdout else "wrong"), "a pointer into another run"
    return refused(out), "a pointer into another run"


def secrets_written(p):
    (p.root / "keyed.py").write_text(
        textwrap.dedent("""
        import torch
        def build(input_shape, num_outputs, api_key=None):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_outputs))
    """)
    )
    (p.root / "c.yaml").write_text(f"model: {{factory: keyed:build, kwargs: {{api_key: {SECRET}}}}}\n")
    p.run(
        "train", "--config", "c.yaml", f"data.root={p.root}/data", "run.name=s", "wandb.project=x", *QUICK, timeout=300
    )
    leaked = [
        str(f.relative_to(p.root))
        for f in (p.root / "runs").rglob("*")
        if f.is_file() and any(s.encode() in f.read_bytes() for s in (SECRET, ENV_SECRET))
    ]
    return ("wrong" if leaked else "clean"), f"secret in {leaked[:3]}" if leaked else "no secret in any file"


PROBES = [
    lr_inf,
    lr_nan,
    momentum_out_of_range,
    two_configs,
    binary_config,
    latin1_config,
    deep_yaml,
    alias_bomb,
    yaml_python_tag,
    override_alias_bomb,
    pipe_in_descriptor,
    empty_shard_listed,
    corrupt_tgz_index,
    index_out_device,
    huge_tar_header,
    dotdot_member,
    decompression_bomb,
    pickle_pth_member,
    object_npy_member,
    cls_out_of_range,
    ten_outputs_scalar_target,
    token_ids_over_vocab,
    sys_exit_factory,
    regression_without_task,
    evil_exported_factory,
    export_over_its_own_state,
    export_out_directory,
    pointer_to_another_run,
    secrets_written,
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("-v", "--verbose", action="store_true", help="the last command's exit code and stderr line")
    args = ap.parse_args()
    results = {}
    for probe in PROBES:
        if args.only and probe.__name__ not in args.only:
            continue
        with tempfile.TemporaryDirectory() as d:
            start = time.monotonic()
            (Path(d) / "work").mkdir()
            p = Probe(Path(d) / "work")
            try:
                kind, detail = probe(p)
            except Exception as e:  # the probe itself failed: report, don't hide
                kind, detail = "probe error", f"{type(e).__name__}: {e}"
            results[probe.__name__] = {
                "class": kind,
                "detail": detail,
                "s": round(time.monotonic() - start, 1),
                "said": p.said(),
            }
            print(f"{kind:<11} {probe.__name__:<28} {detail}  ({results[probe.__name__]['s']} s)", flush=True)
            if args.verbose:
                print(f"{'':<11} {p.said()}", flush=True)
    counts = {}
    for r in results.values():
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    print(f"{len(results)} probes: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
