"""Read back an offline W&B run (`wandb/offline-run-*/run-<id>.wandb`) for the tests.

Newer wandb releases no longer ship a Python reader (`wandb.sdk.internal.datastore` is gone), so this
reads the file format directly: a 7-byte header (":W&B", magic 0xBEE1, version), then leveldb-log
records in 32 KiB blocks (https://github.com/google/leveldb/blob/main/doc/log_format.md), each a
protobuf `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            yield parts + chunk


def read_run(path: Path) -> dict:
    """{"id", "project", "config": {key: value}, "history": [row...], "summary": {key: value}, "artifacts":
    [{"name", "type", "aliases", "metadata", "files": {path: reference or ""}}]}."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = {"id": None, "project": None, "config": {}, "history": [], "summary": {}, "artifacts": []}
    for blob in raw_records(path):
        record = pb.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["project"] = record.run.run_id, record.run.project
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "artifact":
            a = record.artifact
            run["artifacts"].append(
                {
                    "name": a.name,
                    "type": a.type,
                    "aliases": list(a.aliases),
                    "metadata": json.loads(a.metadata or "{}"),
                    "files": {e.path: e.ref for e in a.manifest.contents},
                }
            )
        elif kind == "summary":
            run["summary"].update(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update}
            )
    return run
