"""GPU memory of a training step: a tensor-level tracker, the measured per-sample table, and the fit check.

Measurement (``benchmarks/bench_memory.py``)
    :class:`TensorMemoryTracker` counts the bytes of every tensor storage alive
    during a training step (parameters, gradients, AdamW states, saved
    activations, temporaries), as ``torch.cuda.max_memory_allocated`` does on a
    GPU, but on any device. The benchmark runs each *base* model's training step
    (forward, backward, AdamW step; bf16 autocast) on CPU at batch 1 and 2 and
    at two depths of each of its two Transformer stacks, with and without
    activation checkpointing, solves ``peak = fixed + B * per_sample`` (each
    linear in the depths) and extrapolates to the full depths. The result is
    stored beside this module in ``memory_table.json``.

Fit check (``bh check-config``)
    ``predicted = fixed + batch * per_sample`` (per-sample bytes scaled by the
    configured token count over the measured one when they differ: attention
    runs in fused kernels, so activations grow linearly with tokens). A batch
    *fits* when ``predicted <= usable(gpu_memory_gb)``, which keeps
    :data:`CUDA_RESERVED_GB` for the CUDA context, cuBLAS/NCCL workspaces and
    the loader's pinned buffers, and :data:`ALLOCATOR_MARGIN` of the rest for
    allocator fragmentation.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bh_models.core.errors import BHInputError
from bh_models.core.jsonio import read_json

MEMORY_TABLE = Path(__file__).with_name("memory_table.json")
#: GiB held back on every GPU for the CUDA context, cuBLAS and NCCL workspaces and pinned buffers.
CUDA_RESERVED_GB = 4.0
#: Fraction of the remaining memory held back for the caching allocator's fragmentation.
ALLOCATOR_MARGIN = 0.10
GIB = 2**30


class TensorMemoryTracker(TorchDispatchMode):
    """Live bytes of tensor storages, and their peak, while the mode is active.

    Every output of every operator is counted once per storage (views share
    their base's storage) until the storage is freed; tensors created before the
    mode (the model, its inputs) are added with :meth:`register`. Peaks are
    exact at operator granularity, like the CUDA caching allocator's
    ``max_memory_allocated`` (without its rounding to 512-byte blocks).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage id -> bytes

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = id(storage)  # storages keep their Python object while alive, so ids are stable
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def register(self, *objects: Any) -> None:
        """Count tensors that exist already: modules (parameters, buffers), tensors, nested containers."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                for tensor in [*obj.parameters(), *obj.buffers()]:
                    self._track(tensor)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    self.register(*state.values())
            else:
                for leaf in tree_flatten(obj)[0]:
                    self._track(leaf)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            self._track(leaf)
        return out


# ----------------------------------------------------------------------------- the measured table


@dataclass(frozen=True)
class MemoryModel:
    """Measured memory of one base model's training step at its full depths.

    ``fixed_bytes``: parameters, gradients, AdamW states and bf16 weight copies;
    ``per_sample_bytes``: keyed by activation checkpointing on/off; ``tokens``:
    the token count the per-sample figures were measured at.
    """

    model: str
    fixed_bytes: float
    per_sample_bytes: dict[bool, float]
    tokens: int

    def predicted_bytes(self, *, batch_size: int, checkpointing: bool, tokens: int | None = None) -> float:
        scale = 1.0 if tokens is None else tokens / self.tokens
        return self.fixed_bytes + batch_size * self.per_sample_bytes[checkpointing] * scale

    def max_batch(self, *, gpu_memory_gb: float, checkpointing: bool, tokens: int | None = None) -> int:
        """Largest per-GPU batch whose predicted peak fits :func:`usable_bytes`."""
        scale = 1.0 if tokens is None else tokens / self.tokens
        room = usable_bytes(gpu_memory_gb) - self.fixed_bytes
        return max(0, math.floor(room / (self.per_sample_bytes[checkpointing] * scale)))


def usable_bytes(gpu_memory_gb: float) -> float:
    """Bytes a training step may use on a GPU of ``gpu_memory_gb`` GiB."""
    return (gpu_memory_gb - CUDA_RESERVED_GB) * (1 - ALLOCATOR_MARGIN) * GIB


def load_memory_table(path: Path = MEMORY_TABLE) -> dict[str, MemoryModel]:
    """The measured memory models, keyed by model name (``harmonix_f``, ``harmonix_s``, ``harmonizer``)."""
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "memory table not found", "run benchmarks/bench_memory.py --write")
    table = read_json(path)
    return {
        name: MemoryModel(model=name, fixed_bytes=float(entry["fixed_bytes"]),
                          per_sample_bytes={False: float(entry["per_sample_bytes"]["checkpointing_off"]),
                                            True: float(entry["per_sample_bytes"]["checkpointing_on"])},
                          tokens=int(entry["tokens"]))
        for name, entry in table["models"].items()
    }


def model_tokens(*, model: str, n_rois: int, max_patches: int, t1_grid: tuple[int, int, int],
                 patch_size: int = 16) -> int:
    """Input tokens of one sample of ``model`` (the unit the per-sample bytes scale with)."""
    n_f = n_rois * max_patches
    n_s = math.prod(side // patch_size for side in t1_grid)
    return {"harmonix_f": n_f, "harmonix_s": n_s, "harmonizer": n_f + n_s}[model]


def fit_report(*, training: Mapping[str, Mapping[str, Any]], gpu_memory_gb: float, tokens: Mapping[str, int],
               table: Mapping[str, MemoryModel] | None = None) -> list[dict[str, Any]]:
    """Memory fit of each model's configured per-GPU batch.

    Parameters
    ----------
    training : mapping
        Model name -> its ``pretrain.<model>`` settings (``batch_size``, ``activation_checkpointing``).
    gpu_memory_gb : float
        Memory of one GPU (``pretrain.gpu_memory_gb``).
    tokens : mapping
        Model name -> input tokens per sample under this config (:func:`model_tokens`).
    table : mapping, optional
        :func:`load_memory_table` (read when omitted).

    Returns
    -------
    list of dict
        Per model: ``model``, ``batch_size``, ``checkpointing``, ``predicted_gb``, ``usable_gb``,
        ``fits``, ``max_batch`` (this checkpointing setting), ``max_batch_other`` (the other one).
    """
    table = load_memory_table() if table is None else table
    rows = []
    for name, settings in training.items():
        memory = table[name]
        checkpointing = bool(settings["activation_checkpointing"])
        predicted = memory.predicted_bytes(batch_size=settings["batch_size"], checkpointing=checkpointing,
                                           tokens=tokens[name])
        rows.append({
            "model": name, "batch_size": int(settings["batch_size"]), "checkpointing": checkpointing,
            "predicted_gb": predicted / GIB, "usable_gb": usable_bytes(gpu_memory_gb) / GIB,
            "fits": predicted <= usable_bytes(gpu_memory_gb),
            "max_batch": memory.max_batch(gpu_memory_gb=gpu_memory_gb, checkpointing=checkpointing,
                                          tokens=tokens[name]),
            "max_batch_other": memory.max_batch(gpu_memory_gb=gpu_memory_gb, checkpointing=not checkpointing,
                                                tokens=tokens[name]),
        })
    return rows
