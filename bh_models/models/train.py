"""The training loop shared by harmonix-F, harmonix-S and the Harmonizer.

One process or ``torchrun`` (DDP, read from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``);
bf16 autocast on CUDA, fp32 on CPU; AdamW with warm-up + cosine (peak rate
scaled with the global batch on request); gradient clipping and accumulation;
optional activation checkpointing and ``torch.compile``; a data loader with
worker processes, pinned memory and prefetching; checkpoints every N steps
with exact resume.

Exact resume
    Everything a step depends on is either saved or a pure function of the step
    number: the model (incl. the EMA target encoder), optimiser and scheduler
    states and the global RNG states (torch, CUDA, numpy, python) are saved;
    the data order is a pure function of (seed, epoch) and the number of
    micro-batches consumed, so the loader restarts mid-epoch at the right batch;
    and every random draw inside a step (masks) comes from a generator seeded by
    (seed, micro-step, rank). On CPU, with deterministic algorithms on, a run
    stopped at any point and resumed from its last checkpoint ends with weights
    bit-identical to an uninterrupted run. Only rank 0 logs and writes files.

A run writes ``<checkpoint stem>.resume.pt`` beside its final checkpoint every
``checkpoint_every`` steps; a re-run with the same configuration (e.g. after
``scancel`` or a crash) continues from it, and it is removed once the final
checkpoint is written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.jsonio import dumps
from bh_models.models.lr_schedule import warmup_cosine_lr

__desc__ = (
    "Models were trained with AdamW, a linear warm-up then cosine decay of the learning rate, bf16 "
    "mixed precision on GPU and a fixed seed."
)


def describe_methods(*, config: Any) -> str:
    """The optimisation sentence with each model's effective settings under ``config`` (schema defaults filled)."""
    from bh_models.core.config import apply_defaults, load_schema

    config = apply_defaults(copy.deepcopy(dict(config)), load_schema())
    pretrain = config["pretrain"]
    world = max(1, pretrain["gpus"])
    parts = []
    for section, name in (("fmri", "harmonix-F"), ("t1", "harmonix-S"), ("harmonizer", "the Harmonizer")):
        settings = pretrain[section]
        train = TrainConfig(seed=config["seed"], **settings)
        scaled = (f" ({settings['lr']:g} x global batch / {LR_REFERENCE_BATCH})"
                  if settings["lr_scaling"] == "linear" else "")
        clip = f"gradient norm clipped at {settings['grad_clip']:g}" if settings["grad_clip"] > 0 else "no clipping"
        parts.append(
            f"{name} for {settings['steps']} steps of {train.global_batch(world)} samples ({settings['batch_size']} "
            f"per process x {settings['grad_accum']} accumulation x {world} process(es)), peak learning rate "
            f"{train.peak_lr(world):.3g}{scaled} after {train.warmup} warm-up steps, decaying to {settings['min_lr']:g}, "
            f"weight decay {settings['weight_decay']:g} (not on biases and norms), {clip}")
    return (f"Models were trained with AdamW (betas 0.9, 0.95), a linear warm-up then cosine decay of the learning "
            f"rate, bf16 mixed precision on GPU and a fixed seed ({config['seed']}): " + "; ".join(parts) + ".")


LOG = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
LossFn = Callable[[nn.Module, dict, torch.Generator], tuple[Tensor, dict[str, float]]]


#: Global batch at which ``lr`` is the peak learning rate under ``lr_scaling="linear"`` (MAE, Goyal et al. 2017).
LR_REFERENCE_BATCH = 256
LR_SCALING = ("linear", "none")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-loading settings of one training run (stored in the checkpoint).

    Learning rate: with ``lr_scaling="linear"`` (the MAE convention) ``lr`` is a
    *base* rate per 256 samples and the peak rate is
    ``lr * batch_size * grad_accum * world_size / 256``; with ``"none"`` ``lr`` is
    the peak rate whatever the batch. The schedule warms up linearly to the peak
    and decays by a cosine to ``min_lr`` (:func:`bh_models.models.lr_schedule.warmup_cosine_lr`).
    """

    steps: int
    batch_size: int  # per process and micro-batch
    lr: float
    seed: int
    checkpoint_every: int
    grad_accum: int = 1
    lr_scaling: str = "none"  # "linear": peak = lr * global batch / 256; "none": peak = lr
    warmup_steps: int | None = None  # None: 10 % of the steps
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False  # recompute block activations in the backward pass
    compile: bool = False  # torch.compile the model
    num_workers: int = 0  # data-loader worker processes (0: load in the training process)
    pin_memory: bool = True  # page-locked batches for asynchronous host-to-GPU copies (CUDA only)
    prefetch_factor: int = 2  # batches each worker loads ahead (with num_workers > 0)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "grad_accum", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise BHConfigError(key, f"must be >= 1, got {getattr(self, key)}", f"set {key} to a positive integer")
        if not self.lr > 0:
            raise BHConfigError("lr", f"must be > 0, got {self.lr}", "set a positive learning rate")
        if self.lr_scaling not in LR_SCALING:
            raise BHConfigError("lr_scaling", f"{self.lr_scaling!r} is not one of {LR_SCALING}",
                                "use linear (peak lr = lr x global batch / 256) or none (lr is the peak)")
        if self.num_workers < 0:
            raise BHConfigError("num_workers", "must be >= 0", "use 0 (load in the training process) or more")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise BHConfigError("warmup_steps", f"{self.warmup_steps} is not in [0, steps = {self.steps})",
                                "set fewer warm-up steps than steps, or null for 10 % of the steps")

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    def global_batch(self, world_size: int = 1) -> int:
        """Samples per optimiser step over all processes."""
        return self.batch_size * self.grad_accum * world_size

    def peak_lr(self, world_size: int = 1) -> float:
        """Peak learning rate of a run on ``world_size`` processes (see the class doc)."""
        if self.lr_scaling == "linear":
            return self.lr * self.global_batch(world_size) / LR_REFERENCE_BATCH
        return self.lr

    def lr_at(self, step: int, world_size: int = 1) -> float:
        """Learning rate of optimiser step ``step`` (0-based) on ``world_size`` processes."""
        peak = self.peak_lr(world_size)
        return warmup_cosine_lr(
            step=step, base_lr=peak, warmup_steps=self.warmup, total_steps=self.steps, min_lr=min(self.min_lr, peak)
        )


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> DistContext:
    """Read torchrun's environment (if any), pick the device, start the process group.

    Returns
    -------
    DistContext
        ``cuda:LOCAL_RANK`` when CUDA is available, else CPU (gloo for DDP).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): call before building a model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(*, seed: int, micro_step: int, rank: int, stream: int = 0) -> int:
    """Seed of the generator for one micro-step on one rank (independent streams).

    ``stream`` separates uses: 0 = the model's random draws, 1 = data-loader worker seeds.
    """
    entropy = [seed, stream, micro_step, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class ResumableBatchSampler:
    """Infinite, seeded stream of index batches that can start at any batch.

    Epoch ``e`` visits ``randperm(n, seed + e)``; with DDP the permutation is
    padded to a multiple of ``world_size`` (by wrapping) and rank ``r`` takes
    every ``world_size``-th index from ``r``. Batches are cut from the
    concatenation of the epochs, so batch ``i`` is a pure function of
    ``(seed, rank, world_size, i)`` and resuming needs only ``i``.
    """

    def __init__(
        self, *, n_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.per_rank = -(-n_samples // world_size)

    def _epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_samples, generator=generator).tolist()
        order = (order * (1 + self.per_rank * self.world_size // self.n_samples))[: self.per_rank * self.world_size]
        return order[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_batch * self.batch_size
        epoch, offset = divmod(position, self.per_rank)
        current = self._epoch(epoch)
        while True:
            batch = []
            while len(batch) < self.batch_size:
                if offset == self.per_rank:
                    epoch, offset = epoch + 1, 0
                    current = self._epoch(epoch)
                take = min(self.batch_size - len(batch), self.per_rank - offset)
                batch.extend(current[offset: offset + take])
                offset += take
            yield batch


def rng_state() -> dict[str, Any]:
    """Global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_path(out_checkpoint: Path) -> Path:
    """The periodic checkpoint beside the final one: ``<stem>.resume.pt``."""
    out_checkpoint = Path(out_checkpoint)
    return out_checkpoint.with_name(out_checkpoint.name.removesuffix(".pt") + ".resume.pt")


def canonical(obj: Any) -> Any:
    """A copy whose strings are interned and containers fresh.

    Pickle memoizes by object identity, so equal payloads built differently (a
    resumed run's state comes from unpickled, non-interned strings) would give
    different bytes. Canonical payloads give the same bytes; tensors are kept.
    """
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {canonical(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [canonical(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(canonical(v) for v in obj)
    return obj


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` atomically (a kill mid-write leaves the previous file intact), canonical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(canonical(payload), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`train` onto the CPU (tensors and plain types only)."""
    path = Path(path)
    if not path.is_file():
        raise BHInputError(path, "checkpoint not found", "run the pretraining step that writes it")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise BHInputError(path, f"checkpoint format {payload.get('format')} is not {CHECKPOINT_FORMAT}",
                           "re-run the pretraining step with this version of bh_models")
    return payload


def fingerprint(obj: Any) -> str:
    """Short hash of a JSON-able object: identifies 'the same run' for resuming."""
    return hashlib.sha256(dumps(obj).encode()).hexdigest()[:16]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on ``device``; other values unchanged.

    bf16 tensors (the store's compact T1 volumes and latents) are copied as they
    are, half the bytes of float32, and widened to float32 on ``device``: the
    models take float32 inputs (bf16 autocast then casts the matrix products).
    """
    if isinstance(batch, Tensor):
        moved = batch.to(device, non_blocking=True)
        return moved.float() if moved.dtype == torch.bfloat16 else moved
    if isinstance(batch, dict):
        return {key: move_to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list):
        return [move_to_device(value, device) for value in batch]
    return batch


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases and other 1-D parameters (norms), as all three releases
    (timm's ``add_weight_decay`` in MAE and the Harmonizer, I-JEPA's groups in Brain-JEPA);
    tokens and learned positions, 2-D and more, are decayed like weights."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or name.endswith(".bias")
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    """What a run did; ``model`` is the unwrapped, trained module."""

    model: nn.Module
    metrics: pd.DataFrame
    start_step: int
    end_step: int
    completed: bool


def train(
    *,
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    collate_fn: Callable[[list], Any],
    config: TrainConfig,
    model_config: dict[str, Any],
    out_checkpoint: Path,
    out_metrics: Path,
    out_curve: Path,
    title: str,
    context: DistContext | None = None,
    stop_after: int | None = None,
    data_id: str = "",
) -> TrainResult:
    """Train ``model`` on ``dataset``, resuming from ``resume_path(out_checkpoint)`` if it matches.

    Parameters
    ----------
    model : nn.Module
        Freshly built (seeded) model; if it has ``on_optimizer_step(step=, total_steps=)``
        (the JEPA EMA update) it is called after every optimiser step.
    loss_fn : callable
        ``loss_fn(model, batch, generator) -> (loss, metrics)``; ``model`` may be
        DDP-wrapped, so the loss must come from ``model(...)`` (its ``forward``).
        ``generator`` is a CPU generator seeded per micro-step and rank.
    dataset, collate_fn
        Map-style dataset and its collate function.
    config : TrainConfig
    model_config : dict
        JSON-able architecture description, stored in the checkpoint.
    out_checkpoint : Path
        Final checkpoint: ``{"model", "optimizer", "scheduler", "step", "config", "rng", ...}``.
    out_metrics : Path
        TSV with one row per step: step, loss, lr, samples_per_s, grad_norm, model metrics.
    out_curve : Path
        PNG of the loss curve (and learning rate).
    title : str
        Progress-bar and figure title.
    context : DistContext, optional
        From :func:`distributed_context` (computed when omitted).
    stop_after : int, optional
        Return right after this step without writing anything: simulates a
        killed job in the resume tests.
    data_id : str
        Identity of the training data (see ``bh_models.models.pretrain.data_identity``); a
        resume file written for other data is ignored.

    Returns
    -------
    TrainResult
    """
    context = context or distributed_context()
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise BHInputError(out_checkpoint, "the training split holds no samples", "check the packed store and splits")
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if context.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        return _train(model, loss_fn, dataset, collate_fn, config, model_config, Path(out_checkpoint),
                      Path(out_metrics), Path(out_curve), title, context, stop_after, data_id)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _train(
    model: nn.Module, loss_fn: LossFn, dataset: Dataset, collate_fn: Callable, config: TrainConfig,
    model_config: dict, out_checkpoint: Path, out_metrics: Path, out_curve: Path, title: str,
    context: DistContext, stop_after: int | None, data_id: str = "",
) -> TrainResult:
    run = _setup(model, dataset, config=config, model_config=model_config, context=context, data_id=data_id)
    resume_file = resume_path(out_checkpoint)
    start_step, rows = _resume(run, resume_file, title=title)
    batches = _batches(dataset, collate_fn, config=config, context=context, start_step=start_step)
    progress = tqdm(total=config.steps, initial=start_step, desc=title, disable=None if context.is_main else True)
    hook = getattr(model, "on_optimizer_step", None)
    model.train()
    for step in range(start_step, config.steps):
        rows.append(_train_step(run, batches, step, loss_fn=loss_fn, hook=hook, title=title))
        _show_progress(progress, rows[-1], title=title, config=config, context=context)
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            if context.is_main:
                save_checkpoint(resume_file, _checkpoint_payload(run, step + 1, history=rows))
            _barrier(context.world_size)
        if stop_after is not None and step + 1 >= stop_after:
            progress.close()
            return TrainResult(model, pd.DataFrame(rows), start_step, step + 1, completed=False)
    progress.close()
    metrics = _finish(run, rows, out_checkpoint=out_checkpoint, out_metrics=out_metrics, out_curve=out_curve,
                      resume_file=resume_file, title=title)
    return TrainResult(model, metrics, start_step, config.steps, completed=True)


@dataclass(frozen=True)
class _Run:
    """One training run: model (and its DDP wrapper), optimiser, scheduler, settings and identity."""

    model: nn.Module
    wrapped: nn.Module  # what the loss calls: ``model``, its DDP wrapper, or their torch.compile
    ddp: nn.parallel.DistributedDataParallel | None  # the DDP wrapper (``no_sync``), None on one process
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: TrainConfig
    model_config: dict
    context: DistContext
    run_id: str  # fingerprint of everything a resume must match


#: Settings that change neither the arithmetic nor the data order: a run may resume with other values.
_RESUMABLE_SETTINGS = ("checkpoint_every", "num_workers", "pin_memory", "prefetch_factor", "activation_checkpointing",
                       "compile")


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch activation checkpointing of every Transformer stack of ``model``: modules with a
    ``grad_checkpointing`` flag, or whose ``config`` dataclass has that field. Returns how many
    modules were switched."""
    switched = 0
    for module in model.modules():
        if isinstance(getattr(module, "grad_checkpointing", None), bool):
            module.grad_checkpointing = enabled
            switched += 1
        config = getattr(module, "config", None)
        if dataclasses.is_dataclass(config) and any(f.name == "grad_checkpointing" for f in dataclasses.fields(config)):
            module.config = dataclasses.replace(config, grad_checkpointing=enabled)
            switched += 1
    return switched


def _setup(model: nn.Module, dataset: Dataset, *, config: TrainConfig, model_config: dict, context: DistContext,
           data_id: str) -> _Run:
    """Model on its device (DDP-wrapped with several processes, optionally compiled), AdamW with the
    peak learning rate of this world size, warm-up + cosine, run fingerprint."""
    model.to(context.device)
    set_activation_checkpointing(model, config.activation_checkpointing)
    ddp = None
    wrapped: nn.Module = model
    if context.world_size > 1:
        ddp = wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[context.local_rank] if context.device.type == "cuda" else None
        )
    if config.compile:
        wrapped = torch.compile(wrapped)
    peak = config.peak_lr(context.world_size)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=peak, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: config.lr_at(step, context.world_size) / peak
    )
    run_id = fingerprint({
        # data_id: a resume file from training on other data (a re-packed store) is not resumed.
        "model": model_config, "world_size": context.world_size, "n_samples": len(dataset),  # type: ignore[arg-type]
        "data": data_id,
        "train": {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUMABLE_SETTINGS},
    })
    return _Run(model=model, wrapped=wrapped, ddp=ddp, optimizer=optimizer, scheduler=scheduler, config=config,
                model_config=model_config, context=context, run_id=run_id)


def _resume(run: _Run, resume_file: Path, *, title: str) -> tuple[int, list[dict]]:
    """Restore a matching resume file (model, optimiser, scheduler, RNG states): the start step and metrics rows."""
    start_step, rows = 0, []
    if resume_file.is_file():
        state = load_checkpoint(resume_file)
        if state["fingerprint"] == run.run_id:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            start_step, rows = state["step"], list(state["metrics"])
            if run.context.is_main:
                LOG.warning("%s: resuming at step %d from %s", title, start_step, resume_file)
        elif run.context.is_main:
            LOG.warning("%s: %s belongs to another configuration; starting afresh", title, resume_file)
    return start_step, rows


def _checkpoint_payload(run: _Run, step: int, *, history: list[dict] | None) -> dict[str, Any]:
    """What a checkpoint holds after ``step`` optimiser steps; ``history`` (metrics rows) only in the resume file."""
    data = {
        "format": CHECKPOINT_FORMAT, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "step": step, "rng": rng_state(), "fingerprint": run.run_id,
        "config": {"model": run.model_config, "train": dataclasses.asdict(run.config)},
        "data_position": step * run.config.grad_accum,  # micro-batches consumed per rank
    }
    if history is not None:  # wall-clock throughput lives only in the resume file and the TSV
        data["metrics"] = history
    return data


def _batches(dataset: Dataset, collate_fn: Callable, *, config: TrainConfig, context: DistContext,
             start_step: int) -> Iterator[Any]:
    """The micro-batch stream of this rank, starting at the first micro-batch of ``start_step``."""
    sampler = ResumableBatchSampler(
        n_samples=len(dataset), batch_size=config.batch_size, seed=config.seed,  # type: ignore[arg-type]
        rank=context.rank, world_size=context.world_size, start_batch=start_step * config.grad_accum,
    )
    # A private generator: otherwise creating the loader's iterator draws its worker base
    # seed from the global RNG, which a resumed run would do at a different point.
    loader_generator = torch.Generator().manual_seed(
        step_seed(seed=config.seed, micro_step=start_step * config.grad_accum, rank=context.rank, stream=1)
    )
    workers = config.num_workers
    # Workers open their own memory maps of the store (bh_models.models.data), so they share the page cache.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                        pin_memory=config.pin_memory and context.device.type == "cuda", generator=loader_generator,
                        prefetch_factor=config.prefetch_factor if workers else None, persistent_workers=workers > 0)
    return iter(loader)


def _accumulate_gradients(run: _Run, batches: Iterator[Any], step: int, *,
                          loss_fn: LossFn) -> tuple[list[Tensor], dict[str, float]]:
    """Forward and backward over the step's ``grad_accum`` micro-batches: their losses and mean model metrics."""
    config, context = run.config, run.context
    device = context.device
    losses, extras = [], {}
    for micro in range(config.grad_accum):
        batch = move_to_device(next(batches), device)
        generator = torch.Generator().manual_seed(
            step_seed(seed=config.seed, micro_step=step * config.grad_accum + micro, rank=context.rank)
        )
        # Gradients are all-reduced only on the last micro-batch of a step.
        skip_sync = run.ddp is not None and micro < config.grad_accum - 1
        with run.ddp.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[union-attr]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, metrics = loss_fn(run.wrapped, batch, generator)
            (loss / config.grad_accum).backward()
        losses.append(loss.detach().float())
        for key, value in metrics.items():
            extras[key] = extras.get(key, 0.0) + float(value) / config.grad_accum
    return losses, extras


def _train_step(run: _Run, batches: Iterator[Any], step: int, *, loss_fn: LossFn, hook: Callable | None,
                title: str) -> dict[str, Any]:
    """Optimiser step ``step`` (0-based): gradients, clipping, update, EMA hook; its metrics row."""
    config, world_size = run.config, run.context.world_size
    started = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    losses, extras = _accumulate_gradients(run, batches, step, loss_fn=loss_fn)
    grad_norm = (torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
                 if config.grad_clip > 0 else torch.tensor(float("nan")))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if hook is not None:
        hook(step=step + 1, total_steps=config.steps)
    mean_loss = torch.stack(losses).mean()
    if world_size > 1:
        dist.all_reduce(mean_loss)
        mean_loss /= world_size
    loss_value = float(mean_loss)
    if not math.isfinite(loss_value):
        raise FloatingPointError(
            f"{title}: loss became {loss_value} at step {step + 1}; lower lr or raise warmup_steps"
        )
    elapsed = time.perf_counter() - started
    return {
        "step": step + 1, "loss": loss_value, "lr": lr,
        "samples_per_s": config.batch_size * config.grad_accum * world_size / max(elapsed, 1e-9),
        "grad_norm": float(grad_norm), **extras,
    }


def _show_progress(progress: tqdm, row: dict[str, Any], *, title: str, config: TrainConfig,
                   context: DistContext) -> None:
    """Advance the progress bar; in batch logs (bar off) log every 5 % of the steps."""
    step, loss_value, lr = row["step"], row["loss"], row["lr"]
    progress.update(1)
    progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
    # The bar is off in batch logs (no terminal): log progress there instead.
    if context.is_main and progress.disable and step % max(1, config.steps // 20) == 0:
        LOG.info("%s: step %d/%d loss %.4f lr %.2e %.1f samples/s", title, step, config.steps,
                 loss_value, lr, row["samples_per_s"])


def _finish(run: _Run, rows: list[dict], *, out_checkpoint: Path, out_metrics: Path, out_curve: Path,
            resume_file: Path, title: str) -> pd.DataFrame:
    """Rank 0 writes the final checkpoint, the metrics TSV and the loss curve, then drops the resume file."""
    metrics = pd.DataFrame(rows)
    if run.context.is_main:
        save_checkpoint(out_checkpoint, _checkpoint_payload(run, run.config.steps, history=None))
        write_metrics(metrics, out_metrics)
        plot_loss_curve(metrics, out_curve, title=title)
        resume_file.unlink(missing_ok=True)
    _barrier(run.context.world_size)
    return metrics


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def write_metrics(metrics: pd.DataFrame, path: Path) -> None:
    """Write the per-step metrics TSV atomically (fixed float format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metrics.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    os.replace(tmp, path)


def plot_loss_curve(metrics: pd.DataFrame, path: Path, *, title: str) -> None:
    """Loss (and its components, if logged) per step, with the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(metrics["step"], metrics["loss"], color="black", label="loss")
    for column in ("loss_s", "loss_f"):
        if column in metrics:
            axis.plot(metrics["step"], metrics[column], lw=0.8, label=column)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("training loss")
    if (metrics["loss"] > 0).all():
        axis.set_yscale("log")
    lr_axis = axis.twinx()
    lr_axis.plot(metrics["step"], metrics["lr"], color="tab:grey", ls="--", lw=0.8, label="lr")
    lr_axis.set_ylabel("learning rate")
    handles = axis.get_legend_handles_labels()[0] + lr_axis.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper right", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(figure)
    os.replace(tmp, path)
