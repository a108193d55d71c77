"""data.sample's rules that need no torch: a mapping {field: "ext1;ext2" | "json#/pointer"} read into
extensions and JSON pointers, and the one-line errors of a sample that lacks a field's member or pointer.
samples.FieldMap decodes the workers' samples with them; `check_first_sample` holds a mapping against the
first training sample's member names before any worker starts, from tar headers alone (`dtrain train`,
`dtrain launch`: the workers' own line in a second, not after they imported torch and built their streams).
"""

from __future__ import annotations

import difflib
import json
import re
import tarfile
import zlib

from ..config import ConfigError
from .errors import DataError

# webdataset's base_plus_ext (group_by_keys' `keys`): KEY.EXT, the key up to the first dot of the base name
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's meta files, skipped as tario.py skips them
JSON_READ_LIMIT = 1 << 20  # a pointer's JSON member is read only up to this size here (the workers read any)


def parse(fields: dict) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({field: its extensions, lower case}, {field: its JSON pointer's tokens}) of data.sample's mapping."""
    extensions, pointers = {}, {}
    for name, spec in fields.items():
        exts, _, pointer = spec.partition("#") if isinstance(spec, str) else ("", "", "")
        if name.startswith("__") or not exts or not all(exts.split(";")):
            raise ConfigError(
                f"config: data.sample.{name}: {spec!r} is not a field name and member extensions "
                "like x: 'jpg;png' (or a number in a JSON member, y: 'json#/count')"
            )
        if "#" in spec and not pointer.startswith("/"):
            raise ConfigError(
                f"config: data.sample.{name}: {spec!r}: after '#' comes a JSON pointer starting "
                f"with '/', e.g. y: '{exts}#/{pointer or 'count'}'"
            )
        extensions[name] = [e.lower() for e in exts.split(";")]
        if pointer:  # "/labels/0" -> ["labels", "0"]; ~1 and ~0 are RFC 6901's escapes of / and ~
            pointers[name] = [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]
    return extensions, pointers


def no_member(key: str, url: str, name: str, extensions: list[str], members) -> DataError:
    """The error of sample `key` of shard `url`, whose `members` (extensions) hold none of field `name`'s."""
    has = ", ".join(sorted(m for m in members if not m.startswith("__")))
    return DataError(
        f"data: sample {key!r} of {url} has no {' or '.join('.' + e for e in extensions)} member "
        f"for data.sample.{name} (it has {has or 'none'})"
    )


def pointed(value, tokens: list[str], name: str, ext: str, key: str, url: str):
    """The number at the JSON pointer `tokens` in a decoded JSON member, else one DataError line."""
    where = f"sample {key!r} of {url}"
    field = f"/{'/'.join(t.replace('~', '~0').replace('/', '~1') for t in tokens)}"
    for token in tokens:
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            has = (
                f"keys {', '.join(map(str, value)) or 'none'}"
                if isinstance(value, dict)
                else f"a list of {len(value)}"
                if isinstance(value, list)
                else f"a {type(value).__name__}"
            )
            near = difflib.get_close_matches(token, list(map(str, value)), 1) if isinstance(value, dict) else []
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise DataError(
                f"data: {where}: its .{ext} member has no {field} for data.sample.{name} (at "
                f"'{token}' it has {has}{hint})"
            )
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # bool: an int to Python, not a count
        raise DataError(
            f"data: {where}: {field} of its .{ext} member (data.sample.{name}) is "
            f"{json.dumps(value)[:60]}, not a number"
        )
    return value


# ---- before any worker starts (data/__init__.py's check_first_sample) -------------------------------------
def check_first_sample(mapping: dict, url: str) -> None:
    """data.sample's `mapping` held against the first sample of the local shard `url`, read from its tar
    headers (nothing decoded but a pointer's JSON member): the workers' line for a field that no member has,
    or a pointer its JSON lacks. A shard it cannot read as the workers would is left to them."""
    extensions, pointers = parse(mapping)
    sample = _first_sample(url)
    if sample is None:
        return
    key, members = sample
    for name, exts in extensions.items():  # in the workers' order: their first missing field is said
        ext = next((e for e in exts if e in members), None)
        if ext is None:
            raise no_member(key, url, name, exts, members)
        if name in pointers:
            value = _json(url, members[ext], ext)
            if value is _UNREAD:
                return
            pointed(value, pointers[name], name, ext, key, url)


def _first_sample(url: str) -> tuple[str, dict[str, tarfile.TarInfo]] | None:
    """(key, {extension: member}) of the shard's first sample, grouped as webdataset groups members (the
    same key, one after another; extensions in lower case), from headers only; None where tario.py's reader
    would refuse the shard or the shard has no sample (the workers' error, not this one's)."""
    key, members = None, {}
    try:
        with tarfile.open(url, "r:*") as tar:  # seeks over payloads; nothing is extracted
            for info in tar:
                if not info.isreg() or info.name.endswith("/") or _META.match(info.name):
                    continue
                if info.name[:1] == "/" or ".." in info.name.split("/"):
                    return None  # tario.py refuses the shard
                found = _KEY_EXT.match(info.name)
                if found is None:
                    continue
                if key is not None and found[1] != key:
                    break
                key, ext = found[1], found[2].lower()
                if ext in members:  # webdataset's duplicate file name
                    return None
                members[ext] = info
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        return None
    return (key, members) if key is not None else None


_UNREAD = object()


def _json(url: str, info: tarfile.TarInfo, ext: str):
    """A pointer field's member decoded as the workers decode a .json member (json.loads); _UNREAD where it
    is no JSON member, too large to read here, or does not decode (the workers' own line)."""
    if ext.rsplit(".", 1)[-1] not in ("json", "jsn") or info.size > JSON_READ_LIMIT:
        return _UNREAD
    try:
        with tarfile.open(url, "r:*") as tar:
            member = tar.extractfile(info)
            return json.loads(member.read(JSON_READ_LIMIT)) if member is not None else _UNREAD
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error):
        return _UNREAD
