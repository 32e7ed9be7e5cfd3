"""Fine-tuning the Harmonizer on downstream tasks: a models-stage job, on the job's GPU when it has one.

The evaluation stage writes the folds (:mod:`bh_models.core.finetuneformat`: per
task and repeat, every subject's outer fold and label, the probes' folds); this
job fine-tunes :class:`~bh_models.models.nn.hub_classifier.HubClassifier` (the
pretrained Harmonizer's encoder, ``fc_norm`` and a linear head on the mean hub
token) once per task, repeat and fold, on the other folds' subjects, and writes
every held-out subject's score; the evaluation stage turns them into the
``fused_finetuned`` row beside the probes.

Recipe (the paper's, ``run_finetune.sh`` of the release; every value a config key)
    50 epochs; AdamW (betas 0.9, 0.999), lr 5e-4 (absolute), weight decay 0.05
    (none on 1-D parameters and the class token); layer-wise lr decay 0.65 over
    the release's layer ids (class token 0, block ``i`` ``i + 1``, the rest last:
    ``lr x 0.65 ** (13 - id)`` at ViT-B depth); per-iteration linear warm-up over 5
    epochs then cosine to 1e-6; stochastic depth 0.1; cross-entropy with label
    smoothing 0.1 (regression: mean squared error on the z-scored target);
    batch 16; bf16 autocast on a GPU. The release selects its checkpoint on the
    split it reports; here the model after the last epoch scores the held-out
    fold, which took no part in training.

Data
    Rows stream from the latent stores (:mod:`bh_models.models.latents`, bf16 token
    arrays): each batch is read with one ``preadv`` per row straight into one
    buffer, copied to the device as bf16 and widened there; the evaluation of the
    held-out rows runs in batches too. Nothing holds all rows: memory does not grow
    with the number of rows (``benchmarks/bench_finetune.py`` measures 2,000 rows
    against the memory the rule requests, :func:`finetune_resources`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bh_models.core.errors import BHConfigError, BHInputError
from bh_models.core.finetuneformat import read_folds, write_predictions
from bh_models.core.jsonio import read_json, sidecar_path, write_json
from bh_models.models.data import NpyRows
from bh_models.models.latents import MASK_FILE, TOKENS_FILE, LatentStore, check_same_layout, pack_rows
from bh_models.models.lr_schedule import warmup_cosine_lr

__desc__ = (
    "Fine-tuning followed the authors' recipe: the pretrained Harmonizer encoder with a LayerNorm and a "
    "linear head on the mean hub token was trained end to end for {epochs} epochs with AdamW (lr {lr}, "
    "layer-wise decay {layer_decay}, weight decay {weight_decay}, warm-up {warmup_epochs} epochs then "
    "cosine decay to {min_lr}, stochastic depth {drop_path}, label smoothing {label_smoothing}, batch "
    "{batch_size}) on the training folds of the linear probes' cross-validation, and scored the held-out "
    "fold after the last epoch."
)


def describe_methods(*, config: Any) -> str:
    """The methods sentence with the configured recipe (schema defaults filled); empty when fine-tuning is off."""
    from bh_models.core.config import apply_defaults, load_schema

    settings = apply_defaults(copy.deepcopy(dict(config)), load_schema())["evaluate"]["finetune"]
    if not settings.get("enabled"):
        return ""
    return __desc__.format(**{key: value for key, value in settings.items() if key != "enabled"})


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fine-tuning settings (``evaluate.finetune.*``); defaults are the paper's recipe."""

    epochs: int = 50
    lr: float = 5e-4
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    batch_size: int = 16
    eval_batch_size: int = 64
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise BHConfigError(f"evaluate.finetune.{key}", f"must be >= 1, got {getattr(self, key)}",
                                    "set a positive integer")
        if not 0 < self.layer_decay <= 1:
            raise BHConfigError("evaluate.finetune.layer_decay", f"{self.layer_decay} is not in (0, 1]",
                                "use e.g. 0.65 (the paper) or 1 for no decay")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise BHConfigError("evaluate.finetune.warmup_epochs", f"{self.warmup_epochs} is not in [0, epochs)",
                                "use fewer warm-up epochs than epochs")


# ----------------------------------------------------------------------------- optimiser


def model_layers(model: nn.Module) -> list[list[nn.Parameter]]:
    """Trainable parameters grouped by depth, input first, head last (``model.layer_groups()``
    when defined, else the top-level children with the model's own parameters in the first)."""
    if hasattr(model, "layer_groups"):
        groups = [list(group) for group in model.layer_groups()]
    else:
        own = [p for _, p in model.named_parameters(recurse=False)]
        groups = [list(child.parameters()) for child in model.children()]
        groups = [own + groups[0], *groups[1:]] if groups else [own]
    groups = [[p for p in group if p.requires_grad] for group in groups]
    groups = [group for group in groups if group]
    listed = sorted(id(p) for group in groups for p in group)
    if listed != sorted(id(p) for p in model.parameters() if p.requires_grad):
        raise ValueError("layer groups must list every trainable parameter exactly once")
    return groups


def layer_decay_param_groups(model: nn.Module, *, layer_decay: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay: group ``i`` of ``L`` has ``lr_scale = decay ** (L - 1 - i)``.

    No weight decay on 1-D parameters (biases, norms) and on class tokens and fixed
    positions (the release's ``no_weight_decay``).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    layers = model_layers(model)
    groups = []
    for index, params in enumerate(layers):
        scale = layer_decay ** (len(layers) - 1 - index)
        exempt = [p for p in params if p.ndim < 2 or names[id(p)].endswith(("cls_token", "pos_embed"))]
        decayed = [p for p in params if all(p is not q for q in exempt)]
        for members, decay in ((decayed, weight_decay), (exempt, 0.0)):
            if members:
                groups.append({"params": members, "lr_scale": scale, "weight_decay": decay, "layer": index})
    return groups


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# ----------------------------------------------------------------------------- data


class LatentRows:
    """Rows of one or more latent stores (one token layout), read in batches.

    ``batch(positions)`` reads the rows with one ``preadv`` each straight into one
    ``(B, N, D)`` bf16 buffer (:class:`bh_models.models.data.NpyRows`: no page faults
    through a memory map, no stacking copy) and returns it with the ``(B, N)`` token
    mask; ``dataset`` and ``subject`` give every row's owner.
    """

    def __init__(self, folders: Sequence[Path]) -> None:
        self.stores = [LatentStore(Path(folder)) for folder in folders]
        if not self.stores:
            raise BHInputError("latents", "no latent store given", "run the extract_latents rule")
        self.layout = check_same_layout(self.stores)
        self.dataset = np.concatenate([store.datasets for store in self.stores])
        self.subject = np.concatenate([store.subjects for store in self.stores])
        self._store = np.concatenate([np.full(len(s), i) for i, s in enumerate(self.stores)])
        self._row = np.concatenate([s.index["row"].to_numpy() for s in self.stores]).astype(np.int64)
        self._masks = [np.load(s.folder / MASK_FILE, mmap_mode="r") for s in self.stores]
        self._tokens = [str(s.folder / TOKENS_FILE) for s in self.stores]
        self._reader = NpyRows()

    def __len__(self) -> int:
        return len(self._row)

    def batch(self, positions: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens`` bf16 ``(B, N, D)`` and ``mask`` bool ``(B, N)`` of rows ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        stores, rows = self._store[positions], self._row[positions]
        tokens = self._reader.read([(self._tokens[s], r) for s, r in zip(stores, rows)], dtype=torch.bfloat16)
        mask = np.stack([self._masks[s][r] for s, r in zip(stores, rows)])
        return tokens, torch.from_numpy(mask)


def _inputs(rows: LatentRows, positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """Packed model inputs (:func:`bh_models.models.latents.pack_rows`) of rows ``positions`` on ``device``."""
    tokens, mask = rows.batch(positions)
    tokens = tokens.to(device, non_blocking=True).float()  # bf16 over the bus, widened on the device
    return pack_rows(tokens, mask.to(device, non_blocking=True))


# ----------------------------------------------------------------------------- one fold


class _Objective:
    """Label-smoothed cross-entropy (classification) or MSE on the z-scored target (regression)."""

    def __init__(self, *, task_type: str, train_labels: np.ndarray, label_smoothing: float) -> None:
        self.task_type = task_type
        self.label_smoothing = label_smoothing
        self.mean, self.scale = 0.0, 1.0
        if task_type == "regression":
            self.mean = float(np.mean(train_labels))
            self.scale = float(np.std(train_labels)) or 1.0

    @property
    def n_outputs(self) -> int:
        return 2 if self.task_type == "classification" else 1

    def target(self, labels: np.ndarray, device: torch.device) -> torch.Tensor:
        if self.task_type == "classification":
            return torch.as_tensor(labels, dtype=torch.int64, device=device)
        return torch.as_tensor((labels - self.mean) / self.scale, dtype=torch.float32, device=device)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task_type == "classification":
            return F.cross_entropy(output.float(), target, label_smoothing=self.label_smoothing)
        return F.mse_loss(output.float()[:, 0], target)

    def scores(self, output: torch.Tensor) -> np.ndarray:
        """Positive-class probability, or the prediction in the target's units."""
        if self.task_type == "classification":
            return torch.softmax(output.float(), dim=1)[:, 1].cpu().numpy().astype(float)
        return output.float()[:, 0].cpu().numpy().astype(float) * self.scale + self.mean


def train_and_predict(*, factory, rows: LatentRows, train_positions: np.ndarray, train_labels: np.ndarray,
                      test_positions: np.ndarray, task_type: str, recipe: FinetuneRecipe, seed: int,
                      device: torch.device) -> tuple[np.ndarray, dict[str, Any]]:
    """Fine-tune a fresh model on the training rows and score the test rows.

    Parameters
    ----------
    factory : callable
        ``factory(n_outputs, drop_path)``: a fresh model with the pretrained weights.
    rows : LatentRows
    train_positions, train_labels : numpy.ndarray
        Training rows and their labels (a subject's label on each of its rows).
    test_positions : numpy.ndarray
        Held-out rows, scored in batches of ``recipe.eval_batch_size``.
    task_type : str
    recipe : FinetuneRecipe
    seed : int
        Initialisation (the head), stochastic depth and batch order.
    device : torch.device

    Returns
    -------
    scores : numpy.ndarray, shape (n_test_rows,)
    info : dict
        ``first_loss``, ``final_loss`` (mean training loss of the first and last epoch), ``steps``.
    """
    objective = _Objective(task_type=task_type, train_labels=train_labels, label_smoothing=recipe.label_smoothing)
    use_bf16 = device.type == "cuda"
    # fork_rng: the seeded initialisation and stochastic depth leave the caller's global RNG alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = factory(objective.n_outputs, recipe.drop_path).to(device)
        optimizer = torch.optim.AdamW(
            layer_decay_param_groups(model, layer_decay=recipe.layer_decay, weight_decay=recipe.weight_decay),
            lr=recipe.lr, betas=recipe.betas)
        per_epoch = math.ceil(len(train_positions) / recipe.batch_size)
        total, warmup = recipe.epochs * per_epoch, int(round(recipe.warmup_epochs * per_epoch))
        order_generator = torch.Generator().manual_seed(seed)
        epoch_losses, step = [], 0
        for _ in range(recipe.epochs):
            model.train()
            losses = []
            for batch in torch.randperm(len(train_positions), generator=order_generator).split(recipe.batch_size):
                index = batch.numpy()
                _set_lr(optimizer, warmup_cosine_lr(step=step, base_lr=recipe.lr, warmup_steps=warmup,
                                                    total_steps=total, min_lr=recipe.min_lr))
                inputs = _inputs(rows, train_positions[index], device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    output = model(inputs)
                loss = objective.loss(output, objective.target(train_labels[index], device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                step += 1
            epoch_losses.append(float(np.mean(losses)))
        model.eval()
        scores = []
        with torch.no_grad():
            for start in range(0, len(test_positions), recipe.eval_batch_size):
                inputs = _inputs(rows, test_positions[start: start + recipe.eval_batch_size], device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    scores.append(objective.scores(model(inputs)))
    info = {"first_loss": epoch_losses[0], "final_loss": epoch_losses[-1], "steps": step}
    return np.concatenate(scores) if scores else np.zeros(0), info


# ----------------------------------------------------------------------------- the job


def _row_positions(rows: LatentRows, folds: pd.DataFrame, source: Path) -> dict[tuple[str, str], np.ndarray]:
    """Row positions of every (dataset, subject) in the folds; a subject without rows is an error."""
    owners: dict[tuple[str, str], list[int]] = {}
    for position, key in enumerate(zip(rows.dataset, rows.subject)):
        owners.setdefault(key, []).append(position)
    wanted = set(zip(folds["dataset"], folds["subject"]))
    missing = sorted(wanted - set(owners))
    if missing:
        raise BHInputError(source, f"{len(missing)} subject(s) of the folds have no latent rows, e.g. "
                           f"{missing[0][0]}/sub-{missing[0][1]}", "rerun extract_latents for that dataset")
    return {key: np.asarray(owners[key], dtype=np.int64) for key in wanted}


def _split_seed(seed: int, task: int, repeat: int, fold: int) -> int:
    return int(np.random.SeedSequence([seed, 19, task, repeat, fold]).generate_state(1)[0])


def finetune_harmonizer(
    *,
    latents: Sequence[Path],
    harmonizer_checkpoint: Path,
    folds: Path,
    out_predictions: Path,
    epochs: int = 50,
    lr: float = 5e-4,
    layer_decay: float = 0.65,
    weight_decay: float = 0.05,
    drop_path: float = 0.1,
    label_smoothing: float = 0.1,
    warmup_epochs: float = 5.0,
    min_lr: float = 1e-6,
    batch_size: int = 16,
    eval_batch_size: int = 64,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Step function: fine-tune the Harmonizer on every task, repeat and outer fold of ``folds``.

    Parameters
    ----------
    latents : sequence of Path
        Latent stores of the evaluated dataset(s) (rule ``extract_latents``).
    harmonizer_checkpoint : Path
        The pretrained Harmonizer (the model bundle's).
    folds : Path
        Folds table of the evaluation stage (:func:`bh_models.core.finetuneformat.read_folds`).
    out_predictions : Path
        Out-of-fold scores (:func:`bh_models.core.finetuneformat.write_predictions`) + JSON
        sidecar with the recipe and each split's training losses.
    epochs, lr, layer_decay, weight_decay, drop_path, label_smoothing, warmup_epochs, min_lr, batch_size, eval_batch_size
        The recipe (:class:`FinetuneRecipe`; the paper's by default).
    seed : int
        Seeds of initialisation, stochastic depth and batch order (per task, repeat and fold).
    threads : int
        CPU threads for torch.

    Returns
    -------
    dict
        ``n_rows``, ``n_trainings``, ``device``, ``seconds``.
    """
    from bh_models.models.nn.hub_classifier import HubClassifier
    from bh_models.models.pretrain import load_pretrained

    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    recipe = FinetuneRecipe(epochs=epochs, lr=lr, layer_decay=layer_decay, weight_decay=weight_decay,
                            drop_path=drop_path, label_smoothing=label_smoothing, warmup_epochs=warmup_epochs,
                            min_lr=min_lr, batch_size=batch_size, eval_batch_size=eval_batch_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    table = read_folds(Path(folds))
    rows = LatentRows([Path(p) for p in latents])
    positions = _row_positions(rows, table, Path(folds))
    harmonizer = load_pretrained(checkpoint=Path(harmonizer_checkpoint), kind="harmonizer")

    def factory(n_outputs: int, path_rate: float) -> HubClassifier:
        return HubClassifier(harmonizer, n_outputs, drop_path=path_rate)

    predictions, trainings = [], []
    for task_index, (task, task_table) in enumerate(table.groupby("task", sort=False)):
        task_type = task_table["task_type"].iloc[0]
        for repeat, repeat_table in task_table.groupby("repeat", sort=True):
            for fold in sorted(repeat_table["fold"].unique()):
                train = repeat_table[repeat_table["fold"] != fold]
                test = repeat_table[repeat_table["fold"] == fold]
                train_rows = [positions[k] for k in zip(train["dataset"], train["subject"])]
                train_positions = np.concatenate(train_rows)
                train_labels = np.repeat(train["label"].to_numpy(), [len(r) for r in train_rows])
                test_rows = [positions[k] for k in zip(test["dataset"], test["subject"])]
                scores, info = train_and_predict(
                    factory=factory, rows=rows, train_positions=train_positions, train_labels=train_labels,
                    test_positions=np.concatenate(test_rows), task_type=task_type, recipe=recipe,
                    seed=_split_seed(seed, task_index, int(repeat), int(fold)), device=device)
                bounds = np.cumsum([0, *[len(r) for r in test_rows]])
                for (dataset, subject), lo, hi in zip(zip(test["dataset"], test["subject"]), bounds[:-1], bounds[1:]):
                    predictions.append({"task": task, "repeat": int(repeat), "fold": int(fold), "dataset": dataset,
                                        "subject": subject, "score": float(np.mean(scores[lo:hi]))})
                trainings.append({"task": task, "repeat": int(repeat), "fold": int(fold),
                                  "train_subjects": len(train), "train_rows": int(len(train_positions)), **info})
    with torch.random.fork_rng(devices=[]):
        n_parameters = sum(p.numel() for p in factory(2, recipe.drop_path).parameters() if p.requires_grad)
    frame = pd.DataFrame(predictions).sort_values(["task", "repeat", "subject", "dataset"], kind="stable")
    write_predictions(frame, Path(out_predictions))
    write_json(sidecar_path(Path(out_predictions)), {
        "Description": "Out-of-fold scores of the fine-tuned Harmonizer (HubClassifier), one model per task, "
                       "repeat and outer fold of the evaluation stage's folds",
        "Recipe": asdict(recipe), "Seed": seed, "LatentStores": [Path(p).name for p in latents],
        "TrainableParameters": int(n_parameters),
        "Trainings": trainings,
        "Columns": {"score": "positive-class probability (classification) or predicted value (regression), "
                             "mean over the subject's rows"},
    })
    return {"n_rows": len(rows), "n_trainings": len(trainings), "device": device.type,
            "seconds": round(time.perf_counter() - started, 1)}


# ----------------------------------------------------------------------------- resources


def finetune_resources(*, latents: Sequence[Path], harmonizer_checkpoint: Path | None = None, batch_size: int = 16,
                       eval_batch_size: int = 64, epochs: int = 50, n_trainings: int = 50, gpu: bool = False,
                       threads: int = 2) -> dict[str, int]:
    """Memory (MB) and run time (minutes) a fine-tuning job requests, from its data and model sizes.

    Host memory is what the process holds, none of it growing with the number of rows:

    * the interpreter with torch and pandas (600 MB, measured);
    * the model: the checkpoint as loaded plus the fine-tuned copy with its gradients
      and AdamW states, 6 x 4 bytes per parameter on a CPU job (2 x 4 with a GPU);
    * the largest batch in flight, read as bf16 and packed in float32 (2 + 4 + 4 bytes
      per token channel, twice for the next batch);
    * on a CPU job, the activations of a training batch in float32: 60 bytes per token,
      channel and block (``bench_memory.py`` measures about 40 under bf16), plus the
      decoder-free attention workspace;

    with a 25 % margin. Run time: training FLOPs (3x forward, ``bh_models.models.flops``)
    of every training and scoring pass at 40 % MFU of an H100, or 2 GFLOP/s per thread
    on a CPU (``benchmarks/bench_finetune.py`` measured 2 GFLOP/s on 2 busy cores with the
    tiny model), doubled, at least 30 minutes.
    """
    from bh_models.models.flops import H100_BF16_DENSE_PEAK, transformer_forward_flops

    metas = [read_json(Path(folder) / "latents.json") for folder in latents]
    n_rows = sum(int(m["n_rows"]) for m in metas)
    n_tokens, dim = int(metas[0]["n_tokens"]), int(metas[0]["dim"])
    model = _model_size(harmonizer_checkpoint, dim=dim)
    width, depth, n_hub = model["embed_dim"], model["depth"], model["n_hub"]
    parameters = model["parameters"]
    sequence = 1 + n_tokens + n_hub
    largest = max(batch_size, eval_batch_size)
    batch_bytes = 2 * largest * n_tokens * (dim + 1) * (2 + 4 + 4)
    model_bytes = parameters * 4 * (2 if gpu else 6)
    activation_bytes = 0 if gpu else batch_size * sequence * width * depth * 60
    mem_mb = int(1.25 * (600 * 2**20 + model_bytes + batch_bytes + activation_bytes) / 2**20)
    forward = transformer_forward_flops(tokens=sequence, width=width, depth=depth)
    flops = n_trainings * (epochs * n_rows * 3 * forward + n_rows * forward)  # every row trains ~ (k-1)/k of the time
    rate = 0.4 * H100_BF16_DENSE_PEAK if gpu else 2e9 * max(1, threads)
    runtime = max(30, int(math.ceil(2 * flops / rate / 60)))
    return {"mem_mb": mem_mb, "runtime": runtime}


def _model_size(checkpoint: Path | None, *, dim: int) -> dict[str, int]:
    """Width, depth, hub tokens and parameter count of the Harmonizer encoder (from the checkpoint's
    sidecar when it exists; the base size otherwise)."""
    config = {"embed_dim": 768, "depth": 12, "n_hub": 128, "mlp_ratio": 4.0}
    sidecar = sidecar_path(Path(checkpoint)) if checkpoint is not None else None
    if sidecar is not None and sidecar.is_file():
        config.update({k: v for k, v in read_json(sidecar).get("ModelConfig", {}).items() if k in config})
    width, depth = int(config["embed_dim"]), int(config["depth"])
    block = 4 * width**2 + 2 * int(config["mlp_ratio"]) * width**2 + 10 * width
    parameters = depth * block + (dim * width if dim != width else 0) + 2 * int(config["n_hub"]) * width
    return {"embed_dim": width, "depth": depth, "n_hub": int(config["n_hub"]), "parameters": parameters}
