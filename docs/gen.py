"""Writes the generated docs pages: configuration.md from the config schema (dtrain/config.py), and index.md
from the README (its links pointed inside the site). `python docs/gen.py`; tests/test_docs.py fails when
either is stale."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pydantic import BaseModel

DOCS = Path(__file__).parent


def configuration() -> str:
    from dtrain.config import Config

    out = ["# Configuration reference", "",
           "Every key, its default and what it does, generated from `dtrain/config.py` by `python docs/gen.py`",
           "(a test fails when this page is stale). Set keys in a YAML file (`--config FILE`, given again to compose",
           "files, the later one's settings winning) or as `key.sub=value` overrides, which win over files;",
           "`dtrain config [--config FILE] [key=value ...]` prints the resolved config.", ""]
    for name, field in Config.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        out += [f"## {name}", "", "| key | default | what it does |", "|---|---|---|", *_rows(section, f"{name}."), ""]
    return "\n".join(out)


def _rows(section: type[BaseModel], prefix: str) -> list[str]:
    """A row per key; a nested section (augment.crop) as its keys."""
    rows = []
    for key, f in section.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            rows += _rows(f.annotation, f"{prefix}{key}.")
            continue
        doc = " ".join((f.description or "").split()).replace("|", "\\|")
        default = repr(f.default).replace("|", "\\|")
        rows.append(f"| `{prefix}{key}` | `{default}` | {doc} |")
    return rows


def index() -> str:
    """The README as the site's first page: `docs/x.md` links become `x.md`."""
    readme = (DOCS.parent / "README.md").read_text()
    return re.sub(r"\]\(docs/", "](", readme)


PAGES = {"configuration.md": configuration, "index.md": index}

if __name__ == "__main__":
    for name, render in PAGES.items():
        (DOCS / name).write_text(render())
        sys.stdout.write(f"wrote {DOCS / name}\n")
