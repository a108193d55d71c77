"""PyTorch FSDP2 (`fully_shard`) behind the same interface as DDP, with torch.distributed.checkpoint (DCP).

- sharding: `fully_shard` on each block (the children of `fsdp.blocks`, or of the model's largest
  nn.ModuleList), then on the root, which holds the rest. Parameters become DTensors sharded on dim 0
  over the ranks; the optimizer is built after that, over the shards, so its state is sharded too.
- accumulation: `set_requires_gradient_sync(False)` on non-final micro-batches (FSDP2's own `no_sync`):
  gradients accumulate unsharded and are reduce-scattered once, on the last micro-batch.
- clipping: each rank holds a shard of every gradient; `clip_grad_norm_` on DTensors sums the squared
  norms over the ranks, so every rank clips with (and reports) the norm of the whole gradient, and makes
  the same NaN decision without another collective.
- checkpoints: every rank writes its own shards of model and optimizer with DCP (`dcp.save`, or
  `dcp.async_save` with checkpoint.async_save) into `<checkpoint>/fsdp/`; rank 0's state.pt holds the
  schedule. dtrain's Checkpointer checksums and publishes the directory as for DDP. DCP records each
  shard's place in the whole tensor, so a checkpoint loads on any number of ranks (it reshards).
- safety: DCP reads its `.metadata` with plain `pickle` and its non-tensor values with
  `torch.load(weights_only=False)`; here both go through loaders that accept plain data only.
- evaluation: dtrain's ranks evaluate uneven numbers of batches (each reads its own shards), while
  FSDP's forward all-gathers each block from every rank; `evaluating()` gathers the parameters once
  so evaluation needs no collective per batch.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

# Private, kept: torch has no public composable activation checkpointing (hooks on the module, parameter names
# unchanged; torch.utils.checkpoint would wrap forward, checkpoint_wrapper renames parameters and is private
# too). test_fsdp_by_block_follows_ddp_without_accumulation_or_clipping runs it and fails if it goes or changes.
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..config import ConfigError
from .. import capabilities
from ..optim import config_hyperparameters
from .single import SingleEngine

TAG = "fsdp"  # the sub-directory of a dtrain checkpoint that holds DCP's files


def find_blocks(model: nn.Module, names: list[str]) -> tuple[list[nn.Module], str]:
    """(the modules to shard one by one, where they were found). `names`: module lists whose children are the
    blocks; none given: the children of the nn.ModuleList holding the most parameters, if the model has one."""
    modules = dict(model.named_modules())
    if names:
        blocks = []
        for name in names:
            found = modules.get(name)
            if not isinstance(found, (nn.ModuleList, nn.Sequential)):
                lists = [n for n, m in modules.items() if n and isinstance(m, (nn.ModuleList, nn.Sequential))]
                what = "no module" if found is None else f"a {type(found).__name__}, not a module list"
                raise ConfigError(
                    f"config: fsdp.blocks: '{name}' is {what} in {type(model).__name__}; module lists "
                    f"there: {', '.join(lists[:8]) or 'none'}"
                )
            blocks += list(found)
        return blocks, ", ".join(names)
    lists = [(sum(p.numel() for p in m.parameters()), n) for n, m in modules.items() if isinstance(m, nn.ModuleList)]
    if not lists:
        return [], ""
    _, name = max(lists, key=lambda t: t[0])  # the first of equals: max keeps the first maximum
    return list(modules[name]), name


class FSDPEngine(SingleEngine):
    unsupported = staticmethod(capabilities.fsdp)

    def __init__(
        self,
        model,
        make_optimizer,
        make_scheduler,
        train_cfg,
        dist_info,
        fsdp_cfg,
        channels_last: bool = False,
        log=print,
    ):
        name = type(model).__name__  # (fully_shard renames the class FSDP<name>)
        blocks, where = find_blocks(model, fsdp_cfg.blocks)
        if fsdp_cfg.activation_checkpointing and not blocks:
            raise ConfigError(
                f"config: fsdp.activation_checkpointing needs blocks, and {name} has no "
                "nn.ModuleList; name its module lists in fsdp.blocks"
            )
        if not torch.distributed.is_initialized():
            # one process: FSDP needs a process group; a world of one in this process, no rendezvous
            backend = "cpu:gloo,cuda:nccl" if dist_info.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        self._layout = (name, blocks, where, fsdp_cfg, log if dist_info.is_global_zero else None)  # for place()
        # FSDP shards contiguous parameters only: no channels-last weights (model.channels_last=true is
        # refused by the config; `auto` means off here). fp16 is refused too: the scaler stays disabled.
        super().__init__(model, make_optimizer, make_scheduler, train_cfg, dist_info, channels_last=False)

    def place(self, model: nn.Module) -> nn.Module:
        """The model on the device, sharded: each block, then the root. The optimizer built on it steps the
        DTensor shards, so its state is sharded too."""
        name, blocks, where, fsdp_cfg, log = self._layout
        self.module = model.to(self.device)
        param_dtype = {
            "fp32": None,
            "bf16": torch.bfloat16,
            "auto": self.amp_dtype if self.amp_dtype == torch.bfloat16 else None,
        }[fsdp_cfg.param_dtype]
        self.reshard_blocks = fsdp_cfg.reshard_after_forward
        self.fsdp_units = self._shard(blocks, fsdp_cfg, param_dtype)
        if log is not None:
            layout = (
                f"{len(blocks)} blocks of {where} one by one, then the rest at the root"
                if blocks
                else f"at the root as one unit ({name} has no nn.ModuleList of blocks; name its module lists "
                "in fsdp.blocks to shard it block by block)"
            )
            world = torch.distributed.get_world_size()
            log(
                f"fsdp: sharding {layout} over {world} rank{'s' * (world > 1)}; params "
                f"{'bf16' if param_dtype else 'fp32'}, reduce {fsdp_cfg.reduce_dtype}"
                + ", CPU offload" * fsdp_cfg.cpu_offload
                + ", activation checkpointing" * fsdp_cfg.activation_checkpointing
                + (
                    ("; blocks compiled" if blocks else "; not compiled (train.compile applies per block)")
                    if self.compile
                    else ""
                )
            )
        return self.module

    def compiled(self, model: nn.Module) -> nn.Module:
        return model  # forward runs on the sharded module itself (blocks compiled in place by _shard)

    def _shard(self, blocks: list[nn.Module], fsdp_cfg, param_dtype) -> list[nn.Module]:
        """fully_shard each block, then the root (bottom-up, as FSDP requires) -> the sharded units."""
        reduce_dtype = torch.bfloat16 if fsdp_cfg.reduce_dtype == "bf16" else torch.float32
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if fsdp_cfg.cpu_offload else OffloadPolicy()
        mesh = init_device_mesh(self.device.type, (torch.distributed.get_world_size(),))
        for block in blocks:
            if fsdp_cfg.activation_checkpointing:
                checkpoint(block)  # composable: hooks, so parameter names (and checkpoints) are unchanged
            if self.compile:
                block.compile()  # in place, per block (as torchtitan does): the FSDP hooks stay outside the graphs
            fully_shard(
                block,
                mesh=mesh,
                reshard_after_forward=self.reshard_blocks,
                offload_policy=offload,
                mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
            )
        # the root is needed first in backward: keep it gathered after forward. Its output (the model's) in
        # fp32, so the loss is computed in fp32 whatever the parameters compute in.
        fully_shard(
            self.module,
            mesh=mesh,
            reshard_after_forward=False,
            offload_policy=offload,
            mp_policy=MixedPrecisionPolicy(
                param_dtype=param_dtype, reduce_dtype=reduce_dtype, output_dtype=torch.float32 if param_dtype else None
            ),
        )
        return [*blocks, self.module]

    def no_backward_sync(self, is_last_micro_step: bool):
        # FSDP2's own mechanism: on non-final micro-steps gradients accumulate unsharded on each rank and
        # are not reduce-scattered; the last backward reduce-scatters the sum (the equivalent of DDP's no_sync)
        self.module.set_requires_gradient_sync(is_last_micro_step)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        # gradients are DTensor shards: their norm is a DTensor still partial over the ranks. Reduce it once
        # (full_tensor) and clip with that; clip_grad_norm_ would reduce it for the clip coefficient and
        # again for the norm it returns (torchtitan splits the call the same way)
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), max_norm, norm)
        return norm

    def trainable_changed(self) -> None:
        raise ConfigError(capabilities.FSDP_UNFREEZE)

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluate without a collective per batch: ranks evaluate uneven numbers of batches, and a forward
        that all-gathers a block would wait for ranks that have finished. Collective: every rank gathers
        all parameters here (memory: the whole model in the compute dtype, for the evaluation only) and
        keeps them gathered through every forward; they are sharded again afterwards."""
        # the gathered parameters are reused by training: allocate them outside inference mode
        with torch.inference_mode(False), torch.no_grad():
            for unit in self.fsdp_units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
        try:
            yield
        finally:
            for unit in self.fsdp_units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_blocks and unit is not self.module, recurse=False)

    # ---- checkpoints: DCP's files inside dtrain's atomic directory ----------------------------------
    def state_dict(self) -> dict:
        """What rank 0 puts in state.pt: the schedule; model and optimizer are in every rank's DCP shards."""
        return {"fsdp": {"tag": TAG}, "scheduler": self.scheduler.state_dict()}

    def _sharded_state(self) -> dict:
        """Model and optimizer as DTensor shards under canonical parameter names (no rank gathers anything)."""
        model, optimizer = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save_to(self, directory: Path, background: bool = False, group=None):
        """Collective: every rank writes its shards under directory/fsdp/ (coordinated on `group`). With
        `background`, the state is copied to CPU memory now and written by DCP's thread: returns its future."""
        # no fsync here: the Checkpointer fsyncs every file and directory before it writes the manifest
        writer = dcp.FileSystemWriter(directory / TAG, sync_files=False)
        if background:
            return _Written(dcp.async_save(self._sharded_state(), storage_writer=writer, process_group=group))
        try:
            dcp.save(self._sharded_state(), storage_writer=writer, process_group=group)
        except CheckpointException as e:
            raise _as_write_error(e) from None
        return None

    def load_from(self, directory: Path, state: dict) -> None:
        """Collective: model, optimizer and schedule, resharded onto this run's ranks by DCP."""
        from .formats import check_engine

        check_engine(directory, state, "fsdp")
        loaded = self._sharded_state()
        _dcp_load(directory, loaded)
        with config_hyperparameters(self.optimizer, self.scheduler):  # the checkpoint's state, this config's LR
            set_state_dict(
                self.module, self.optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"]
            )
            self.scheduler.load_state_dict(state["scheduler"])

    def load_weights(self, directory: Path, state: dict) -> None:
        """The weights only (test() on the best checkpoint), each rank reading its own shards."""
        from .formats import check_engine

        check_engine(directory, state, "fsdp")
        loaded = {"model": get_model_state_dict(self.module)}
        _dcp_load(directory, loaded)
        set_model_state_dict(self.module, loaded["model"])


class _Written:
    """DCP's future of an asynchronous save, whose failure is re-raised as the Checkpointer expects: the
    first rank's error (DCP raises a CheckpointException, a BaseException, on every rank)."""

    def __init__(self, future):
        self.future = future

    def result(self):
        try:
            return self.future.result()
        except CheckpointException as e:
            raise _as_write_error(e) from None


def _first_failure(e: BaseException) -> BaseException:
    """DCP raises a CheckpointException (a BaseException) on every rank, holding each failed rank's error
    with its traceback: the first of those."""
    if not isinstance(e, CheckpointException) or not e.failures:
        return e
    failure = next(iter(e.failures.values()))
    return failure[0] if isinstance(failure, tuple) else failure


def _as_write_error(e: CheckpointException) -> Exception:
    """What the Checkpointer reports as a failed write: an OSError (e.g. a full disk) or a RuntimeError."""
    failure = _first_failure(e)
    return (
        failure
        if isinstance(failure, (OSError, RuntimeError))
        else RuntimeError(f"{type(failure).__name__}: {failure}")
    )


def consolidated_state_dict(directory: Path, state: dict) -> dict:
    """A plain state dict of the whole model from a dtrain FSDP checkpoint, read in this one process
    (no process group: `dtrain export`, `dtrain eval`, model.init_from)."""
    # What format_utils.dcp_to_torch_save does, through public API only and plain data only (that function
    # unpickles .metadata and non-tensor values with pickle, and would read the optimizer too): whole
    # tensors of the shapes and dtypes the metadata records, which dcp.load fills in place.
    model: dict = {}
    metadata = _dcp_load(directory, None)
    for fqn, item in metadata.state_dict_metadata.items():
        path = (metadata.planner_data or {}).get(fqn, (fqn,))
        if path[0] == "model" and len(path) == 2:
            model[path[1]] = (
                torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
            )  # bytes: replaced by load_bytes
    _dcp_load(directory, {"model": model}, no_dist=True)
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in model.items()}


# ---- DCP reading plain data only ----------------------------------------------------------------------------
def _dcp_load(directory: Path, state, **kwargs):
    """Collective (unless no_dist=True): `state` read from directory/fsdp/, plain data only (state None: the
    metadata alone). -> the checkpoint's metadata."""
    path = Path(directory) / TAG
    reader = PlainDataReader(path)
    try:
        metadata = reader.read_metadata()  # first, alone: DCP would log a refusal as a missing file, with tracebacks
        if state is not None:
            with warnings.catch_warnings():  # no_dist is what we asked for, not news to the user
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(state, storage_reader=reader, planner=PlainDataLoadPlanner(), **kwargs)
    except (pickle.UnpicklingError, CheckpointException, RuntimeError, KeyError, OSError) as e:
        raise _load_error(path, e) from None
    return metadata


def _load_error(path: Path, e: BaseException):
    from ..checkpoint_files import CheckpointError, refusal

    e = _first_failure(e)
    if isinstance(e, pickle.UnpicklingError):
        return refusal(path, e)
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
    return CheckpointError(f"checkpoint: cannot load {path} ({type(e).__name__}: {first[:200]})")


# What DCP pickles into `.metadata` (torch 2.13): its own data classes, sizes, dtypes, layouts and paths.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Python's documented way to restrict unpickling: only these data classes may be built."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name} is not checkpoint metadata")


class PlainDataReader(dcp.FileSystemReader):
    """DCP's reader, but `.metadata` is unpickled by _MetadataUnpickler (FileSystemReader uses pickle.load)."""

    def read_metadata(self, *args, **kwargs):
        metadata = _MetadataUnpickler(io.BytesIO(Path(self.path, ".metadata").read_bytes())).load()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class _PlainBytes:
    """Non-tensor values (the optimizer's hyperparameters) read with torch.load(weights_only=True); DCP's
    planners use weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            _set_path(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class PlainDataLoadPlanner(_PlainBytes, dcp.DefaultLoadPlanner):
    """Loads into a state dict of the right shapes (resume: this run's shards; export: whole tensors)."""


def _set_path(root, path: tuple, value) -> None:
    """root[path[0]][path[1]]... = value: where DCP's flattening found a non-tensor value (the optimizer's
    param_groups nest dicts in lists). DefaultLoadPlanner does this with a private helper of DCP's; the
    containers are already there, since the state dict being loaded has them."""
    for key in path[:-1]:
        root = root[key]
    root[path[-1]] = value
