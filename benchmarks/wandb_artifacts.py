"""What logging checkpoints as W&B artifacts (wandb.log_checkpoints) costs, against dtrain's own save, in one
run (issue 24 point 2). W&B offline in a temporary directory (its data and cache directories too); no API key
is read or needed.

For each checkpoint size (tensors of random float32, one state.pt), interleaved repetitions of:
  (a) plain      Checkpointer.save, synchronous: torch.save, fsync, sha256 manifest, rename, prune
  (b) full copy  (a) + the artifact as W&B's default: every file hashed (MD5) and copied into W&B's staging
                 directory (<WANDB_DATA_DIR>/artifacts/staging) in the save path, then handed to W&B's process
  (c) file://    (a) + the artifact as file:// references (wandb.checkpoint_references=true): hashed, no copy
  (c') s3://     (a) + an s3:// reference (unchecksummed; only when boto3 is installed; credentials from no
                 source, AWS_EC2_METADATA_DISABLED=true: nothing leaves the machine)
The extra time of each is its save minus (a) of the same repetition; the extra disk is what the staging
directory grew by. Then, with checkpoint.async_save:
  (e) async      save() as the training thread sees it (the CPU snapshot, the thread started), without and
                 with the full-copy artifact, and the background part (write + publish + artifact) per save.

    python benchmarks/wandb_artifacts.py [--sizes 64,256,1024] [--reps 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def make_state(mib: int):
    import torch

    chunk = 16 * MiB // 4  # float32 elements of a 16 MiB tensor
    g = torch.Generator().manual_seed(mib)
    n, rest = divmod(mib * MiB // 4, chunk)
    tensors = {f"p{i}": torch.randn(chunk, generator=g) for i in range(n)}
    if rest:
        tensors["rest"] = torch.randn(rest, generator=g)
    return {"model": tensors}, {"rng": torch.get_rng_state()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,1024", help="checkpoint sizes in MiB, comma separated")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary directory goes")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    # disk: the checkpoint (keep_last=1: two while the next is published) and the staged copies of one size,
    # removed after it; 1 GiB spare
    need = max(sizes) * MiB * (2 + args.reps + 1) + 2**30
    free = shutil.disk_usage(args.dir).free
    if free < need:
        print(
            f"wandb_artifacts: {args.dir} has {free / 2**30:.1f} GiB free, needs {need / 2**30:.1f}; "
            "use --dir or smaller --sizes",
            file=sys.stderr,
        )
        return 2
    top = Path(tempfile.mkdtemp(prefix="dtrain-wandb-bench-", dir=args.dir))
    for key in [k for k in os.environ if k.startswith("WANDB_") or k.startswith("AWS_")]:
        del os.environ[key]  # never an API key, never a user's W&B or AWS settings
    os.environ.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(top / "run"),
        WANDB_DATA_DIR=str(top / "wandb-data"),
        WANDB_CACHE_DIR=str(top / "wandb-cache"),
        WANDB_CONFIG_DIR=str(top / "wandb-config"),
        WANDB_ARTIFACT_DIR=str(top / "wandb-artifacts"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(top / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(top / "none"),
    )
    try:
        return run(sizes, args.reps, top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run(sizes: list[int], reps: int, top: Path) -> int:
    import torch
    import wandb

    from dtrain.callbacks import Callbacks, Reporter
    from dtrain.checkpoint import Checkpointer
    from dtrain.config import WandbConfig
    from dtrain.dist import DistInfo
    from dtrain.logging import WandbRun

    torch.set_num_threads(1)
    logging.getLogger("dtrain").setLevel(logging.WARNING)  # no "logged as artifact" line per save
    single = DistInfo("single", 0, 0, 1, torch.device("cpu"), None)
    has_boto3 = importlib.util.find_spec("boto3") is not None
    cfg = WandbConfig(enabled=True, log_checkpoints="all", project="bench")
    (top / "run").mkdir()
    wb = WandbRun(cfg, top / "run", {"run": {"name": "bench"}}, None)
    staging = top / "wandb-data" / "artifacts" / "staging"
    variants = {"full": False, "file": True, **({"s3": "s3://bench-bucket/checkpoints"} if has_boto3 else {})}
    spent: list[float] = []

    def logged(path, step, best):  # the published callback, timed
        t = time.perf_counter()
        wb.log_checkpoint(path, step, best)
        spent.append(time.perf_counter() - t)

    told = Callbacks([Reporter(logged, print)])  # as the trainer wires W&B: a callback told on_checkpoint

    step = 0
    rows = []
    print(
        f"wandb {wandb.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; W&B offline in {top}",
        flush=True,
    )
    for mib in sizes:
        state, rank_state = make_state(mib)
        root = top / f"ckpt-{mib}"
        sync = Checkpointer(root, keep_last=1, dist_info=single, config_hash="bench")
        sync.save(step := step + 1, state, rank_state)  # untimed warm-up: directory, page cache, allocator
        wb.references = False
        sync.callbacks = told
        sync.save(step := step + 1, state, rank_state)  # W&B's first artifact of the run (its own set-up)
        shutil.rmtree(staging, ignore_errors=True)
        saves = {name: [] for name in ["plain", *variants]}  # the whole save() call
        spent_in = {name: [] for name in variants}  # of which the W&B callback
        staged, parts = [], {"copy": [], "md5": [], "xxh128": []}
        order = ["plain", *variants, "parts"]
        for rep in range(reps):
            for name in order[rep % len(order) :] + order[: rep % len(order)]:  # rotated: drift hits all alike
                # the dirty pages of the last measurement (W&B's staged copy is not fsynced) written out first,
                # untimed: each save starts from a quiet disk, as one minutes after the last does
                os.sync()
                if name == "parts":
                    parts_of(root / "latest" / "state.pt", top / "copy", parts)
                    continue
                sync.callbacks = None if name == "plain" else told
                if name != "plain":
                    wb.references = variants[name]
                before, spent[:] = du(staging), []
                t = time.perf_counter()
                sync.save(step := step + 1, state, rank_state)
                saves[name].append(time.perf_counter() - t)
                if name == "full":
                    staged.append(du(staging) - before)
                if name != "plain":
                    assert len(spent) == 1, "the artifact was not logged"
                    spent_in[name].append(spent[0])
        shutil.rmtree(staging, ignore_errors=True)  # the staged copies of this size (offline: kept until synced)

        # (e) async: what the training thread waits for in save(), then the background part
        asyncs = {}
        for name in ("async plain", "async full"):
            ckpt = Checkpointer(root, keep_last=1, dist_info=single, config_hash="bench", async_save=True)
            ckpt.callbacks = told if name == "async full" else None
            wb.references = False
            ckpt.save(step := step + 1, state, rank_state)  # warm-up: the snapshot's buffers are allocated once
            ckpt.wait()
            blocked, background, in_wandb = [], [], []
            for _ in range(reps):
                os.sync()
                spent[:] = []
                t = time.perf_counter()
                ckpt.save(step := step + 1, state, rank_state)
                t1 = time.perf_counter()
                ckpt.wait()
                blocked.append(t1 - t)
                background.append(time.perf_counter() - t1)
                in_wandb.append(sum(spent))
            asyncs[name] = (statistics.median(blocked), statistics.median(background), statistics.median(in_wandb))
            del ckpt
        shutil.rmtree(staging, ignore_errors=True)

        r = dict(
            mib=mib,
            plain=statistics.median(saves["plain"]),
            staged=statistics.median(staged),
            asyncs=asyncs,
            parts={k: statistics.median(v) for k, v in parts.items()},
        )
        for n in variants:
            r[f"{n}_s"] = statistics.median(spent_in[n])
            r[f"{n}_ratio"] = statistics.median(a / b for a, b in zip(spent_in[n], saves["plain"]))
            r[f"{n}_save"] = statistics.median(saves[n])
        rows.append(r)
        print(
            f"{mib} MiB: plain save {r['plain']:.2f} s; "
            + "; ".join(f"{n}: save {r[n + '_save']:.2f} s of which W&B {r[n + '_s']:.2f} s" for n in variants)
            + f"; staged {r['staged'] / MiB:.0f} MiB; copy {r['parts']['copy']:.2f} s, MD5 {r['parts']['md5']:.2f} s, "
            f"XXH128 {r['parts']['xxh128']:.2f} s; async save() {asyncs['async plain'][0] * 1e3:.0f} / "
            f"{asyncs['async full'][0] * 1e3:.0f} ms, background {asyncs['async plain'][1]:.2f} / "
            f"{asyncs['async full'][1]:.2f} s (W&B {asyncs['async full'][2]:.2f} s)",
            flush=True,
        )
        del state
    wb.close()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    report(rows, variants, reps)
    return 0


def parts_of(path: Path, copy: Path, parts: dict) -> None:
    """What the full-copy artifact does per file, timed apart: W&B copies the file into staging, then hashes
    the copy (MD5 by default; XXH128 is wandb.Artifact(digest_algorithm="XXH128"), wandb >= 0.29)."""
    from wandb.sdk.lib.hashutil import md5_file_b64, xxh128_file_b64

    t = time.perf_counter()
    shutil.copyfile(path, copy)
    parts["copy"].append(time.perf_counter() - t)
    for name, digest in (("md5", md5_file_b64), ("xxh128", xxh128_file_b64)):
        t = time.perf_counter()
        digest(copy)
        parts[name].append(time.perf_counter() - t)
    copy.unlink()


def report(rows: list[dict], variants: dict, reps: int) -> None:
    print(
        f"\nmedians of {reps} interleaved repetitions; W&B s: the time save() spent in the artifact callback; "
        "x plain: the median of the per-repetition (that time / the plain save's)\n"
    )
    head = ["checkpoint", "(a) plain save s", "(b) full copy: W&B s", "x plain", "(c) file://: W&B s", "x plain"]
    if "s3" in variants:
        head += ["(c') s3://: W&B s", "x plain"]
    head += [
        "(d) staged per version MiB",
        "(e) async: save() blocks ms, plain / with artifact",
        "(e) async: background s, plain / with artifact (of which W&B)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" + "---:|" * (len(head) - 1))
    for r in rows:
        cells = [f"{r['mib']} MiB", f"{r['plain']:.2f}"]
        for n in variants:
            cells += [f"{r[n + '_s']:.2f}", f"{r[n + '_ratio']:.2f}"]
        a = r["asyncs"]
        cells += [
            f"{r['staged'] / MiB:.0f}",
            f"{a['async plain'][0] * 1e3:.0f} / {a['async full'][0] * 1e3:.0f}",
            f"{a['async plain'][1]:.2f} / {a['async full'][1]:.2f} ({a['async full'][2]:.2f})",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n| checkpoint | copy into staging s | MD5 of the copy s | XXH128 s |\n|---|---:|---:|---:|")
    for r in rows:
        p = r["parts"]
        print(f"| {r['mib']} MiB | {p['copy']:.2f} | {p['md5']:.2f} | {p['xxh128']:.2f} |")
    big = rows[-1]
    gib = big["mib"] / 1024
    print(
        f"\nper GiB (the {big['mib']} MiB row): plain save {big['plain'] / gib:.2f} s; full-copy artifact "
        f"+{big['full_s'] / gib:.2f} s (copy {big['parts']['copy'] / gib:.2f} + MD5 {big['parts']['md5'] / gib:.2f}) "
        f"and {big['staged'] / 2**30 / gib:.2f} GiB staged per version; file:// +{big['file_s'] / gib:.2f} s"
        + (f"; s3:// +{big['s3_s']:.2f} s whatever the size (the URI only)" if "s3" in variants else "")
    )


if __name__ == "__main__":
    sys.exit(main())
