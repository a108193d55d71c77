"""Random access to the samples of local tar shards: a replica group of `dtrain launch --ft` reads only its
own share of each step's batch, not the whole training split (data.in_memory).

`index(url)` lists where each sample of a shard lies: its members' (name, offset of the data, size), found by
reading tar headers and seeking over the data (tario.py's reader, with all its safety rules: checksums,
absolute or `..` names refused, declared sizes held against the file's, links skipped), the members grouped
into samples by webdataset's own `group_by_keys`. Sample p of the index is the p-th sample the streams read
from that shard: the (shard, position) of `elastic.Item`.

`indexed_fetch(stream)` is then a `fetch(items, epoch) -> batch` for dtrain.ft's StepRunner that gives exactly
what `dtrain.ft.memory_fetch(stream)` gives for the same items: each member's bytes read by one `pread` (no
seek), the raw sample decoded (and transformed: data.augment) by the stream's own format as the streams do,
the samples batched by it. Indexes are built on a shard's first use and kept (~200 bytes a sample); the
data is not kept.

Only local, uncompressed shards can be read a sample at a time: a gzip/bzip2/xz stream has no offsets to seek
to, a `pipe:` or http(s) shard no file. Those are refused in one line that names the fix.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import io
import os
import stat
import tarfile
from typing import Any, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset import tariterators

from ..config import ConfigError
from .elastic import Item
from .errors import DataError
from .pipeline import ShardStream, _decode, _miscounted
from .samples import Columns
from .sources import has_scheme
from .tario import _DECOMPRESS, open_shard, tar_file_iterator

_NOT_MEMBERS = ("__key__", "__url__")  # what group_by_keys adds to a sample's members
OPEN_FILES = 8  # shards a fetch keeps open (least recently used closed first)


@dataclasses.dataclass(frozen=True)
class TarIndex:
    """The samples of one shard, in the order the streams read them, and the file they were found in (its
    size and modification time: a fetch refuses a shard that changed since). Kept compact, 186 bytes a
    digits sample (two members, a key of 13 characters; 631 as a dict of tuples a sample, more than its 193
    bytes of data): flat arrays of offsets and sizes, one tuple of extensions shared by the samples alike."""

    url: str
    path: str
    size: int
    mtime_ns: int
    keys: list[str]  # each sample's __key__
    exts: list[tuple[str, ...]]  # each sample's member extensions (lower case, as webdataset groups them)
    first: array.array  # each sample's first member in `spans`
    spans: array.array  # (offset of the data in the file, size) of each member, sample after sample

    def members(self, position: int) -> list[tuple[str, int, int]]:
        """(extension, offset, size) of each member of sample `position`."""
        at = self.first[position]
        return [(ext, self.spans[2 * i], self.spans[2 * i + 1]) for i, ext in enumerate(self.exts[position], at)]


def local_path(url: str) -> str:
    """The file of a local shard (a path or a file:// URL); ConfigError for a streamed one."""
    if not has_scheme(url):
        return url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    raise ConfigError(
        f"data: {url} is streamed (pipe: or a URL), and replica groups (dtrain launch --ft) read a step's "
        "samples by seeking in local shard files: set data.in_memory=true, or copy the shards to local disk"
    )


def _compression(head: bytes) -> str | None:
    """The compression tario.py would undo (its offsets are then the uncompressed stream's, not the file's)."""
    names = {b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed", b"\xfd7zXZ": "xz-compressed"}
    return next((names.get(magic, "compressed") for magic, _ in _DECOMPRESS if head.startswith(magic)), None)


def _refuse_compressed(url: str, head: bytes) -> None:
    kind = _compression(head)
    if kind is not None:
        raise DataError(
            f"data: {url} is a {kind} shard, which has no offsets to seek to, and replica groups (dtrain "
            "launch --ft) read a step's samples by seeking: write the shards uncompressed (.tar), or set "
            "data.in_memory=true"
        )


def _unreadable(url: str, e: Exception) -> DataError:
    """pipeline.py's words for a shard its reader can't read."""
    detail = e.strerror if isinstance(e, OSError) and e.strerror else e.args[0] if e.args else ""
    return DataError(f"data: cannot read {url} ({type(e).__name__}: {detail})")


def index(url: str) -> TarIndex:
    """Where each sample of the local shard at `url` lies, from its tar headers (the data is seeked over)."""
    path = local_path(url)
    try:
        stream = open_shard(path)  # refuses a fifo, a device, a directory
        try:
            _refuse_compressed(url, stream.peek(6)[:6])
            st = os.fstat(stream.fileno())
            members = (
                {**m, "data": (m["offset"], m["size"]), "__url__": url}
                for m in tar_file_iterator(stream, payloads=False)
            )
            keys, exts, first, spans = [], [], array.array("q"), array.array("q")
            shared: dict[tuple, tuple] = {}
            for sample in tariterators.group_by_keys(members):  # webdataset's grouping: the streams' samples
                found = [(ext, where) for ext, where in sample.items() if ext not in _NOT_MEMBERS]
                keys.append(sample["__key__"])
                ext = tuple(ext for ext, _ in found)
                exts.append(shared.setdefault(ext, ext))
                first.append(len(spans) // 2)
                for _, where in found:
                    spans.extend(where)
        finally:
            stream.close()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise _unreadable(url, e) from None
    return TarIndex(url, path, st.st_size, st.st_mtime_ns, keys, exts, first, spans)


class IndexedFetch:
    """`fetch(items) -> batch` of a training ShardStream's local shards (`indexed_fetch`): the raw samples
    (webdataset's dicts of member bytes) read by (shard, position), decoded and batched by the stream's
    format. Indexes are kept; the data is not."""

    def __init__(self, stream: ShardStream):
        self.format = stream.format
        self.listed = stream.listed  # url -> samples its descriptor lists: a shard holding another number is refused
        self.indexes: dict[str, TarIndex] = {}
        # the OPEN_FILES shards used last, kept open: 64 random samples of digits' 6 shards a batch took
        # 0.83-0.85 ms, 0.89-0.93 ms when each batch opened (and fstat-ed) its shards again (best of 5 x 200)
        self.files: collections.OrderedDict[str, io.FileIO] = collections.OrderedDict()
        self.transform = stream.transform
        for url in stream.urls:  # refused before training rather than at a shard's first use, mid-run
            try:
                with open_shard(local_path(url)) as f:  # refuses a fifo, a device, a directory
                    _refuse_compressed(url, f.read(6))
            except (tarfile.TarError, OSError) as e:
                raise _unreadable(url, e) from None

    def __call__(self, items: Sequence[Item], epoch: int = 0) -> tuple:
        """The batch of `items` of `epoch`, decoded and transformed as the streams do (pipeline._decode: a
        transform is a function of the sample, its key, the epoch and its pass, 0 here)."""
        fmt = self.format
        return fmt.batch(Columns.of([_decode(self.raw(url, p), fmt, self.transform, epoch) for url, p in items]))

    def index(self, url: str) -> TarIndex:
        found = self.indexes.get(url)
        if found is None:
            found = index(url)
            n = len(found.keys)
            if n != self.listed.get(url, n):  # as the streams refuse it: not a silently different epoch
                raise _miscounted(url, n, self.listed[url])
            self.indexes[url] = found
        return found

    def raw(self, url: str, position: int) -> dict:
        """Sample `position` of shard `url` as the streams hand it to the format's decode (pipeline.py: the
        grouped members, then `__index__` and `__pass__`)."""
        shard = self.index(url)
        if not 0 <= position < len(shard.keys):
            raise DataError(f"data: {url} has no sample at position {position} (it holds {len(shard.keys)})")
        fd, spans = self._file(shard).fileno(), shard.spans
        sample: dict[str, Any] = {"__key__": shard.keys[position], "__url__": url}
        for i, ext in enumerate(shard.exts[position], shard.first[position]):
            data = os.pread(fd, spans[2 * i + 1], spans[2 * i])  # one call, no seek
            if len(data) != spans[2 * i + 1]:
                raise _changed(url)
            sample[ext] = data
        sample["__index__"], sample["__pass__"] = position, 0
        return sample

    def _file(self, shard: TarIndex) -> io.FileIO:
        f = self.files.get(shard.url)
        if f is not None:
            self.files.move_to_end(shard.url)
            return f
        if len(self.files) >= OPEN_FILES:
            self.files.popitem(last=False)[1].close()
        try:
            f = io.FileIO(shard.path, "r")
        except OSError as e:
            raise _unreadable(shard.url, e) from None
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (shard.size, shard.mtime_ns):
            f.close()
            raise _changed(shard.url)
        self.files[shard.url] = f
        return f

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()

    def __del__(self) -> None:  # its files closed, not left to the garbage collector (a ResourceWarning each)
        self.close()


def _changed(url: str) -> DataError:
    return DataError(
        f"data: {url} changed since its samples were indexed (its size or modification time): shards must not "
        "change while a run reads them; restart the run"
    )


def indexed_fetch(stream: ShardStream) -> IndexedFetch:
    """A `fetch` for dtrain.ft's StepRunner from a training ShardStream of local, uncompressed tar shards not
    read into memory: the batch of (shard, position) items, decoded as the stream's own batches are ((x, y,
    keys) for dtrain's shards), the same as `dtrain.ft.memory_fetch` gives. Every shard's first bytes are
    checked here (a compressed or streamed shard is refused before training); a shard's index is built on its
    first use."""
    return IndexedFetch(stream)
