"""Files a run appends one record per line to and reads back: `metrics.jsonl`, `sample_keys/rank-N.txt`.

Every record is written as one line ending in a newline. A last line without its newline is one the writer
was killed while writing (or a full disk or a lost node cut short): it was never written, so it is dropped.
A line that does not parse elsewhere in the file (a bad disk block, a hand edit) is skipped. Either is
reported in one line naming the file (and line), and neither stops a reader: the checkpoint, not these
logs, is what a resume depends on. Every reader of these files goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, TypeVar

T = TypeVar("T")
Report = Optional[Callable[[str], None]]


def read_records(path: Path, parse: Callable[[str], T], report: Report = None) -> list[tuple[str, T]]:
    """(line, parse(line)) of every complete, well-formed record of `path`, in order; [] when it does not
    exist. `parse` raises ValueError (or KeyError, TypeError, IndexError) for a malformed line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return _parse(Path(path), data, parse, report, "skipped")


def keep_records(path: Path, keep: Callable[[T], bool], parse: Callable[[str], T], report: Report = None) -> None:
    """Rewrite `path` with the records `keep` accepts; incomplete and malformed lines go too. Atomic (a
    kill leaves the old file or the new one), and the file is not touched when nothing would change."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    records = _parse(path, data, parse, report, "removed")
    kept = "".join(line + "\n" for line, value in records if keep(value)).encode()
    if kept == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(kept)
        f.flush()
        os.fsync(f.fileno())  # the rename must not publish a file whose data is still in flight
    os.replace(tmp, path)


def _parse(path: Path, data: bytes, parse, report: Report, verb: str) -> list:
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty when the last record is complete
    if tail:
        _say(report, f"{path}: dropped an incomplete last line ({len(tail)} bytes, cut off while being written)")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode()  # UnicodeDecodeError is a ValueError
            records.append((line, parse(line)))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
            _say(report, f"{path}:{number}: malformed record {verb} ({reason})")
    return records


def _say(report: Report, message: str) -> None:
    if report is not None:
        report(message)
