"""Where a split's shards are and how many samples each holds.

A split is given (`data.train`, `data.val`, `data.test`) as a shard descriptor file, a brace pattern
(`data/train-{000000..000099}.tar`, `pipe:curl -s https://host/train-{0..9}.tar`: webdataset's own
`expand_urls`), or a list of those. Shards are local paths, `pipe:` commands or URLs, read through
webdataset's `gopen`.

A descriptor has the shape of the webdataset project's `wids` shard index, so one written by
`widsindex create` reads here and one written by `dtrain index` reads there:

  {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "train",
   "shardlist": [{"url": "train-000000.tar", "nsamples": 250, "filesize": 20480}, ...],
   "dtrain": {...}}

`dtrain` (a key wids ignores) is written only by `dtrain shard`: task, classes, input shape, scale,
generation params, label mean, default sample mapping. A relative shard URL is resolved against the
descriptor's `base` if it has one, else against the descriptor's own location, so a directory of shards
moves with its descriptor.

A descriptor is data (it may come from anyone): its URLs are only read, never run. A `pipe:` URL runs a
shell command, so one in a descriptor that lists the shards to read is refused unless the user says
otherwise (`data.trust_descriptor_pipes`); a `pipe:` URL the user wrote (data.train/val/test/counts, the
command line) runs. Relative URLs may climb out of the descriptor's directory (`../shards/x.tar`) and
absolute paths and http(s) URLs are allowed: reading a file as a shard runs nothing and writes nothing.

The sample counts are what give every rank the epoch's length before it reads a byte; a shard named by
a pattern gets its count from a descriptor in `data.counts`. Without counts there is no exact epoch, and
dtrain refuses rather than guesses.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urljoin, urlparse

from .errors import DataError

# webdataset (gopen, expand_urls) and the tar reader are imported where used: webdataset imports torch, and
# a local descriptor is read without it (`dtrain launch`'s check of data.sample, data/fields.py)

KIND = "wids-shard-index-v1"
Spec = Union[str, list, None]


def has_scheme(url: str) -> bool:
    """A `pipe:` command or a URL, not a local path."""
    return len(urlparse(url).scheme) > 1  # one letter: a Windows drive


class Descriptor:
    """A shard descriptor read from `source`: resolved shard URLs, their counts, dtrain's extra key."""

    def __init__(self, source: str, urls: list[str], counts: list[int], meta: dict):
        self.source, self.urls, self.counts, self.meta = source, urls, counts, meta

    @staticmethod
    def read(source: str, trust_pipes: bool = False) -> "Descriptor":
        """`trust_pipes`: let the descriptor's `pipe:` URLs run (data.trust_descriptor_pipes); else a descriptor
        that lists one is refused."""
        try:
            if has_scheme(source):
                from webdataset.gopen import gopen

                with gopen(source) as f:
                    text = f.read()
            else:
                text = Path(source).read_bytes()
            d = json.loads(text)
        except (OSError, ValueError) as e:
            raise DataError(f"data: cannot read shard descriptor {source} ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("shardlist"), list) or not d["shardlist"]:
            hint = (
                "; its wids 'datasets' components are not supported: list the shards in 'shardlist'"
                if isinstance(d, dict) and "datasets" in d
                else ""
            )
            raise DataError(
                f"data: {source} is not a shard descriptor (a JSON object with a non-empty "
                f'\'shardlist\' of {{"url", "nsamples"}}){hint}'
            )
        base = d.get("base")
        if base is None:
            base = source.rsplit("/", 1)[0] if has_scheme(source) else os.path.dirname(os.path.abspath(source))
        urls, counts = [], []
        for i, shard in enumerate(d["shardlist"]):
            url = shard.get("url") if isinstance(shard, dict) else None
            if not isinstance(url, str):
                raise DataError(f"data: {source}: shardlist entry {shard!r} has no 'url'")
            if not trust_pipes and is_pipe(resolve_url(url, base)):
                raise DataError(
                    f"data: {source}: shardlist[{i}] is a shell command ({url!r}), which a descriptor "
                    "may not run (it is data); set data.trust_descriptor_pipes=true if you trust the "
                    "file, or put the pipe: pattern in data.train and the file in data.counts"
                )
            n = shard.get("nsamples")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise DataError(
                    f"data: {source}: shard {url} has no sample count ('nsamples'); count the shards "
                    f"with `dtrain index SHARDS --out {source}`"
                )
            urls.append(resolve_url(url, base))
            counts.append(n)
        meta = d.get("dtrain") if isinstance(d.get("dtrain"), dict) else {}
        return Descriptor(source, urls, counts, meta)


def expand_urls(pattern: str) -> list[str]:
    """The URLs of a pattern as webdataset reads it: its own expand_urls, which splits at `::`, substitutes
    ${VAR} from $WDS_VAR, then expands braces with braceexpand. A pattern without `${` is split and
    brace-expanded here, as it would be, without importing webdataset (and so torch)."""
    if "${" in pattern:
        from webdataset.shardlists import expand_urls as expand

        return expand(pattern)
    from braceexpand import braceexpand

    return [url for part in pattern.split("::") for url in braceexpand(part)]


def is_pipe(url: str) -> bool:
    """A URL webdataset's `gopen` runs as a shell command (its scheme as urlparse reads it: `PIPE:`, ` pipe:`)."""
    return urlparse(url).scheme == "pipe"


def resolve_url(url: str, base: str) -> str:
    """`url` as listed in a descriptor: with a scheme as it is, else relative to `base` (a directory or URL)."""
    if has_scheme(url):
        return url
    if has_scheme(base):
        return urljoin(base.rstrip("/") + "/", url)
    return os.path.abspath(os.path.join(base, url))


def descriptor(
    shards: list[tuple[str, int]], out: str | Path, meta: Optional[dict] = None, name: Optional[str] = None
) -> dict:
    """The descriptor of `shards` ((url, count), in order) as written to `out`: local shards under its
    directory by relative path (the directory can move), others as they are."""
    where = os.path.dirname(os.path.abspath(out))
    entries = []
    for url, n in shards:
        entry = {"url": url, "nsamples": n}
        if not has_scheme(url):
            path = os.path.abspath(url)
            entry["url"] = os.path.relpath(path, where) if path.startswith(where + os.sep) else path
            if os.path.isfile(path):
                entry["filesize"] = os.path.getsize(path)
        entries.append(entry)
    d = {"__kind__": KIND, "wids_version": 1, "name": name or Path(out).stem, "shardlist": entries}
    if meta:
        d["dtrain"] = meta
    return d


def write_descriptor(d: dict, out: str | Path) -> None:
    """`d` as the regular file `out`, atomically: a temp file in the same directory, fsynced, renamed over
    `out`, so a half-written descriptor never looks complete. Something at `out` that is not a regular file
    (a directory, a device, a fifo) is refused: the rename would replace it (as root, /dev/full); so is
    one of the shards `d` lists (`dtrain index x.tar --out x.tar`)."""
    out = Path(out)
    if out.exists() and not out.is_file():
        kind = _KINDS.get(stat.S_IFMT(out.stat().st_mode), "special file")
        raise DataError(
            f"data: cannot write the descriptor {out}: it is a {kind}, not a regular file; name a file instead"
        )
    where = os.path.dirname(os.path.abspath(out))
    if any(resolve_url(e["url"], where) == os.path.abspath(out) for e in d.get("shardlist", [])):
        raise DataError(f"data: cannot write the descriptor {out}: it is one of the shards it lists; name another file")
    # a name of its own (two writers never share one), created new (O_EXCL: not through a link planted
    # there), with the umask's permissions as any file the user writes
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(json.dumps(d, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        dir_fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself, on disk
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise DataError(f"data: cannot write the descriptor {out} ({type(e).__name__}: {e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


# ---- a split from config ------------------------------------------------------------------------------------
def is_descriptor(spec: str) -> bool:
    return urlparse(spec).path.endswith(".json") and not spec.startswith("pipe:")


def resolve_split(
    spec: Spec, key: str, counts: Spec = None, trust_pipes: bool = False
) -> tuple[list[str], list[int], dict]:
    """(shard URLs, their sample counts, dtrain's extra key of the first descriptor) of a split given as
    a descriptor, a pattern or a list of them; counts of pattern shards from the descriptors `counts`.
    `trust_pipes`: data.trust_descriptor_pipes (a descriptor's `pipe:` shards may run)."""
    known: Optional[dict[str, int]] = None
    urls, nums, meta = [], [], None
    for item in [spec] if isinstance(spec, str) else list(spec or []):
        if is_descriptor(item):
            d = Descriptor.read(item, trust_pipes)
            urls += d.urls
            nums += d.counts
            meta = d.meta if meta is None else meta
            continue
        if known is None:  # read data.counts once, at the first pattern
            known = {}
            for source in [counts] if isinstance(counts, str) else counts or []:
                # a counts file's URLs are only looked up: what runs is the pattern the user wrote
                d = Descriptor.read(source, trust_pipes=True)
                known.update(zip(d.urls, d.counts))
        for url in expand_urls(item):
            if is_pipe(url) and not url.startswith("pipe:"):  # webdataset's gopen asserts on any other spelling
                raise DataError(
                    f"data: {key}: {url[:60]!r} is a pipe: command spelled otherwise; write it as "
                    "'pipe:COMMAND' (lower case, at the start)"
                )
            url = url if has_scheme(url) else os.path.abspath(url)
            if url not in known:
                raise DataError(
                    f"data: no sample count for {url} ({key}); count the shards once with "
                    f"`dtrain index '{item}' --out FILE` and set {key}=FILE (or data.counts=FILE)"
                )
            urls.append(url)
            nums.append(known[url])
    if not urls:
        raise DataError(f"data: {key} names no shards")
    if len(set(urls)) != len(urls):
        dup = next(u for u in urls if urls.count(u) > 1)
        raise DataError(f"data: {key} lists {dup} twice")
    return urls, nums, meta or {}


# ---- `dtrain index` -----------------------------------------------------------------------------------------
def count_shards(patterns: list[str], jobs: int = 8, progress: bool = False) -> list[tuple[str, int]]:
    """(url, samples) of every shard the patterns name, in order, counted from tar headers only (a
    thread per shard up to `jobs`: reading headers waits on the disk or the network, not the CPU).
    `progress`: a bar over the shards on a terminal (`dtrain index`). A shard that can't be read entirely
    (truncated, corrupt, a CRC error) is a DataError naming it; an empty one is counted (0) and warned of."""
    from ..logging import progress_bar
    from .tario import sample_count

    urls = [u for p in patterns for u in expand_urls(p)]
    if not urls:
        raise DataError("data: the patterns name no shards")

    def count(url: str) -> int:
        if not has_scheme(url) and os.path.exists(url) and not os.path.isfile(url):
            raise DataError(f"data: {url} is not a regular file (a fifo, a device or a directory is never a shard)")
        if not has_scheme(url) and not os.path.isfile(url):
            glob = any(c in url for c in "*?[")  # a quoted glob reaches us as it is: webdataset expands braces only
            raise DataError(
                f"data: no shard {url}"
                + (
                    " (a glob: leave it unquoted for the shell to expand, or "
                    "write a brace pattern, train-{000000..000099}.tar)"
                    if glob
                    else ""
                )
            )
        try:
            return sample_count(url)
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            raise DataError(
                f"data: cannot read {url} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        counts = list(
            progress_bar(pool.map(count, urls), total=len(urls), desc="index", unit="shard", enabled=progress)
        )
    for url, n in zip(urls, counts):
        if n == 0:  # a valid tar with no samples, e.g. a writer that died before its first: said, then kept
            logging.getLogger("dtrain.data").warning(
                f"index: {url} holds no samples (is it the shard you meant, written completely?)"
            )
    return list(zip(urls, counts))
