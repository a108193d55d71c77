"""`dtrain export`: a checkpoint (DDP, DeepSpeed ZeRO shards or FSDP's DCP shards) as what its users load.

- pt (default): one file `{"model": fp32 state dict, "config": dict, "step": int}`, which loads with
  torch.load(weights_only=True) and `dtrain eval --checkpoint FILE`, without DeepSpeed or torch.distributed.
- safetensors: the state dict as one safetensors file (safetensors.torch.load_file). A tensor tied to
  another (GPT-2's lm_head and wte share one matrix) is stored once, under its first name; the metadata maps
  each name left out to the one kept, as safetensors.torch.save_model writes it (so load_model restores it).
- hf: the directory Hugging Face's `from_pretrained` loads, written by the model's own `save_pretrained`.
  This builds the model, so its factory runs: the code the checkpoint's stored config names is run only
  where the user names it too, or trusts the file (dtrain.trust, as `dtrain eval`).

Each is written under a temporary name beside --out and renamed onto it, so --out is whole or untouched;
never over anything but a regular file (a new or empty directory for hf), nor inside a checkpoint.
Parameters are counted once per tensor storage: tied weights once.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .checkpoint import MANIFEST
from .config import ConfigError

FORMATS = ("pt", "safetensors", "hf")


def export(
    checkpoint: str,
    out: Path,
    fmt: str = "pt",
    *,
    config: Optional[Sequence[str]] = None,
    overrides: Sequence[str] = (),
    defaults: Optional[dict] = None,
    hooks=None,
    trusted: bool = False,
) -> int:
    """Write `checkpoint` (a checkpoints/step-N directory, a run directory, or an exported .pt file) to `out`
    in `fmt`; `config`, `overrides`, `defaults`, `hooks`, `trusted`: as `dtrain eval` takes them, for the
    model that --format hf builds. Prints one line: what was written, its parameters, step and source."""
    from .load import read_checkpoint

    path, state = read_checkpoint(checkpoint)
    weights, step = state["engine"]["model"], state["trainer"]["step"]
    if fmt == "hf":
        out = target(out, path, directory=True)
        model = _hf_model(lambda: _rebuild(checkpoint, config, overrides, defaults, hooks, trusted))
        weights = model.state_dict()
        _write_dir(out, model.save_pretrained)
    else:
        out = target(out, path)
        shown = state["config"].get("log", {}).get("progress", True)
        _write_file(out, lambda f: _save_pt(f, state, shown) if fmt == "pt" else _save_safetensors(f, weights, step))
    n = sum(t.numel() for t in unique(weights).values())
    print(f"wrote {out} ({n} parameters, step {step}) from {path.resolve()}")
    return 0


def tied(weights: dict) -> dict[str, str]:
    """{name: the earlier name it is tied to} for each tensor of the state dict that is a view of one listed
    before it: a state dict lists a tied matrix (GPT-2's lm_head and wte) under each of its names."""
    first, out = {}, {}
    for name, t in weights.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def unique(weights: dict) -> dict:
    """The state dict less its tied repeats: each matrix once, under its first name."""
    repeats = tied(weights)
    return {n: t for n, t in weights.items() if n not in repeats}


def _save_pt(f, state: dict, shown: bool) -> None:
    from tqdm.utils import CallbackIOWrapper

    from .logging import progress_bar

    weights = state["engine"]["model"]
    size = sum(v.numel() * v.element_size() for v in unique(weights).values())
    with progress_bar(total=size, desc="export", unit="B", unit_scale=True, unit_divisor=1024, enabled=shown) as bar:
        torch.save(
            {"model": weights, "config": state["config"], "step": state["trainer"]["step"]},
            CallbackIOWrapper(bar.update, f, "write"),
        )  # torch.save writes through it: a progress bar


def _save_safetensors(f, weights: dict, step: int) -> None:
    """safetensors refuses tensors that share memory: each tied group once, under its first name."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise ConfigError(
            "export: --format safetensors needs the safetensors package: pip install 'dtrain[hf]' (or safetensors)"
        ) from None

    # the names left out map to the one kept, as safetensors.torch.save_model records them
    metadata = {"format": "pt", "dtrain.step": str(step), **tied(weights)}
    f.write(save({n: t.detach().contiguous() for n, t in unique(weights).items()}, metadata=metadata))


def _hf_model(rebuild: Callable):
    model = rebuild()
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise ConfigError(
            f"export: --format hf writes a Hugging Face model (a transformers PreTrainedModel), the "
            f"checkpoint's model is a {kind}: use --format safetensors or pt"
        )
    return model


def _rebuild(checkpoint, config, overrides, defaults, hooks, trusted):
    from .load import rebuild

    return rebuild(checkpoint, hooks, config, overrides, defaults, trusted).model


def _write_file(out: Path, write: Callable) -> None:
    """write(f) into a new temporary file of our own (O_EXCL) beside `out`, fsynced, renamed over `out`:
    nothing is written through what is there, and `out` is whole or as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_dir(out: Path, save: Callable[[str], None]) -> None:
    """save(folder) into a new temporary directory beside `out`, each file fsynced, renamed onto `out` (a
    new path, or an empty directory)."""
    import shutil

    tmp = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it (mkdtemp's is 0700)
        save(tmp)
        for p in Path(tmp).rglob("*"):
            if p.is_file():
                os.chmod(p, 0o666 & ~_umask())  # safetensors makes its file 0600
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def target(out: Path, source: Path, directory: bool = False) -> Path:
    """`out`, where export may write: a regular file (or, `directory`, a new or empty directory), not over
    anything else (a device, a link, a directory of files), not over the file it reads, nor into a checkpoint
    directory (its manifest would no longer match, and the run would resume from an older one). Its folder
    is made. -> out; a ConfigError in one line otherwise."""
    what = "a new or empty directory" if directory else "a new or regular file"

    def refuse(why: str):
        return ConfigError(f"export: --out {out} {why}; give the path of {what} outside the run's checkpoints")

    if out.is_symlink():
        raise refuse("is a symbolic link")
    if directory and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise refuse("is a directory that holds files" if out.is_dir() else "exists")
    if not directory and out.exists() and not out.is_file():
        raise refuse(f"is {'a directory' if out.is_dir() else 'not a regular file'}")
    if out.exists() and source.is_file() and out.samefile(source):
        raise refuse("is the file being exported")
    folder = out.parent.resolve()  # before it is made: nothing is made inside a checkpoint either
    if (
        any((d / MANIFEST).is_file() for d in (folder, *folder.parents))
        or source.is_dir()
        and folder.is_relative_to(source.resolve())
    ):
        raise refuse("is inside a checkpoint directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise refuse(f"cannot be made ({e.strerror})") from None
    return out
