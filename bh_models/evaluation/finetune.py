"""Optional fine-tuning with layer-wise learning-rate decay, selected without the test fold.

The authors' release fine-tunes the whole network and keeps the checkpoint that
scores best on the split it then reports. Here, on the probe's outer folds:

1. for every (learning rate, layer decay) pair, a fresh model is trained on each
   inner fit fold and scored on its inner validation fold after every epoch;
2. the pair and the epoch count with the lowest mean validation loss are chosen;
3. a fresh model is trained on the whole outer training fold with that choice and
   scores the held-out fold, which took no part in 1-2.

Layer-wise learning-rate decay (BEiT/MAE style): layer ``i`` of ``L`` groups (input
first, head last) learns at ``lr * decay ** (L - 1 - i)``. The layers are
``model.layer_groups()`` when the model defines it (a list of parameter lists,
input to head), otherwise the model's top-level children in registration order;
parameters registered on the model itself (tokens, embeddings) join the first
group. Biases and other 1-d parameters get no weight decay.

The module knows nothing about the Harmonizer: it takes a model factory
``factory(n_outputs) -> torch.nn.Module`` mapping a batch of inputs to
``(batch, n_outputs)`` (2 logits for classification, 1 value for regression).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from bh_models.evaluation.probe import Split, derived_seed, rows_of_subjects, subject_means

__desc__ = (
    "Optionally, models were fine-tuned end to end with AdamW and layer-wise learning-rate "
    "decay; the learning rate, decay factor and number of epochs were selected on inner "
    "validation folds only, and performance was reported on the held-out outer folds."
)


@dataclass(frozen=True)
class FinetuneSettings:
    """Search space and optimisation settings of fine-tuning.

    Attributes
    ----------
    learning_rates : tuple of float
        Base (head) learning rates tried.
    layer_decays : tuple of float
        Layer-wise decay factors tried (1.0 = no decay).
    max_epochs : int
        Epochs of every inner run; the selected count is at most this.
    batch_size : int
    weight_decay : float
        AdamW weight decay of the weight matrices.
    """

    learning_rates: tuple[float, ...] = (1e-3, 1e-4)
    layer_decays: tuple[float, ...] = (0.65, 0.75)
    max_epochs: int = 30
    batch_size: int = 32
    weight_decay: float = 0.05


@dataclass(frozen=True)
class FinetuneResult:
    """Held-out scores of fine-tuned models.

    Attributes
    ----------
    scores : numpy.ndarray, shape (n_repeats, n_subjects)
        Positive-class probability or predicted value, averaged over a subject's rows.
    selected : list of dict
        Per outer split: ``learning_rate``, ``layer_decay``, ``epochs``,
        ``validation_loss``, ``repeat``, ``fold``.
    n_trainable_parameters : int
    """

    scores: np.ndarray
    selected: list[dict] = field(default_factory=list)
    n_trainable_parameters: int = 0


def count_trainable_parameters(*, model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_layers(*, model: nn.Module) -> list[list[nn.Parameter]]:
    """Trainable parameters grouped by depth, input first, head last.

    Parameters
    ----------
    model : torch.nn.Module
        Uses ``model.layer_groups()`` if defined, else the top-level children.

    Returns
    -------
    list of list of torch.nn.Parameter
        Every trainable parameter exactly once; empty groups dropped.
    """
    if hasattr(model, "layer_groups"):
        groups = [list(group) for group in model.layer_groups()]
    else:
        own = [p for _, p in model.named_parameters(recurse=False)]
        groups = [list(child.parameters()) for child in model.children()]
        groups = [own + groups[0], *groups[1:]] if groups else [own]
    groups = [[p for p in group if p.requires_grad] for group in groups]
    groups = [group for group in groups if group]
    listed = [id(p) for group in groups for p in group]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    if sorted(listed) != sorted(trainable):
        raise ValueError("layer groups must list every trainable parameter exactly once")
    return groups


def layer_decay_param_groups(*, model: nn.Module, base_lr: float, layer_decay: float,
                             weight_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay.

    Parameters
    ----------
    model : torch.nn.Module
    base_lr : float
        Learning rate of the last group (the head).
    layer_decay : float
        Group ``i`` of ``L`` gets ``base_lr * layer_decay ** (L - 1 - i)``.
    weight_decay : float
        Applied to parameters with 2 or more dimensions only.

    Returns
    -------
    list of dict
        Optimizer groups with ``params``, ``lr``, ``weight_decay`` and ``layer``.
    """
    layers = model_layers(model=model)
    groups = []
    for index, params in enumerate(layers):
        lr = base_lr * layer_decay ** (len(layers) - 1 - index)
        decayed = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        if decayed:
            groups.append({"params": decayed, "lr": lr, "weight_decay": weight_decay,
                           "layer": index})
        if plain:
            groups.append({"params": plain, "lr": lr, "weight_decay": 0.0, "layer": index})
    return groups


@dataclass(frozen=True)
class _Data:
    """Rows of one training or evaluation set, already on the device."""

    x: torch.Tensor  # (n_rows, ...)
    y: torch.Tensor  # (n_rows,) int64 class or float32 standardised value


class _Objective:
    """Loss of one training fold: class-balanced cross-entropy or MSE on a z-scored target."""

    def __init__(self, *, task_type: str, y_train: np.ndarray) -> None:
        self.task_type = task_type
        if task_type == "classification":
            counts = np.bincount(y_train.astype(np.int64), minlength=2).astype(float)
            weight = len(y_train) / (2.0 * np.maximum(counts, 1.0))  # sklearn's "balanced"
            self.loss = nn.CrossEntropyLoss(weight=torch.tensor(weight, dtype=torch.float32))
            self.mean, self.scale = 0.0, 1.0
        else:
            self.loss = nn.MSELoss()
            self.mean = float(np.mean(y_train))
            self.scale = float(np.std(y_train)) or 1.0

    @property
    def n_outputs(self) -> int:
        return 2 if self.task_type == "classification" else 1

    def data(self, x: torch.Tensor, y: np.ndarray, device: str) -> _Data:
        if self.task_type == "classification":
            target = torch.as_tensor(y, dtype=torch.int64)
        else:
            target = torch.as_tensor((y - self.mean) / self.scale, dtype=torch.float32)
        return _Data(x=x.to(device), y=target.to(device))

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task_type == "classification":
            return self.loss(output, target)
        return self.loss(output[:, 0], target)

    def scores(self, output: torch.Tensor) -> np.ndarray:
        """Positive-class probability, or the prediction in the target's units."""
        if self.task_type == "classification":
            return torch.softmax(output, dim=1)[:, 1].cpu().numpy().astype(float)
        return output[:, 0].cpu().numpy().astype(float) * self.scale + self.mean


def _train(*, model_factory: Callable[[int], nn.Module], objective: _Objective, train: _Data,
           validation: _Data | None, learning_rate: float, layer_decay: float, epochs: int,
           settings: FinetuneSettings, seed: int, device: str) -> tuple[nn.Module, list[float]]:
    """Train a fresh model; validation loss after every epoch (empty without validation)."""
    # fork_rng: the seeded initialisation does not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_factory(objective.n_outputs).to(device)
    optimizer = torch.optim.AdamW(layer_decay_param_groups(
        model=model, base_lr=learning_rate, layer_decay=layer_decay,
        weight_decay=settings.weight_decay))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train.y), generator=generator).split(settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            objective(model(train.x[batch]), train.y[batch]).backward()
            optimizer.step()
        if validation is not None:
            model.eval()
            with torch.no_grad():
                losses.append(float(objective(model(validation.x), validation.y)))
    return model, losses


def finetune_cross_validated(*, model_factory: Callable[[int], nn.Module],
                             inputs: torch.Tensor | np.ndarray, row_subject: np.ndarray,
                             labels: np.ndarray, splits: Sequence[Split],
                             task_type: str, settings: FinetuneSettings = FinetuneSettings(),
                             seed: int = 0, device: str = "cpu",
                             progress: str | None = None) -> FinetuneResult:
    """Fine-tune on every outer training fold, selecting on inner validation folds only.

    Parameters
    ----------
    model_factory : callable
        ``factory(n_outputs)`` returns a fresh (e.g. pretrained-weights) model mapping
        ``(batch, ...)`` to ``(batch, n_outputs)``.
    inputs : torch.Tensor or numpy.ndarray, shape (n_rows, ...)
        Model inputs; a subject may own several rows (kept on one side of every split).
    row_subject : numpy.ndarray of int, shape (n_rows,)
        Subject position of every row.
    labels : numpy.ndarray, shape (n_subjects,)
        0/1 classes or continuous values.
    splits : sequence of Split
        The probe's folds (:func:`bh_models.evaluation.probe.make_splits`), so that both are
        compared on the same held-out subjects.
    task_type : str
        ``"classification"`` or ``"regression"``.
    settings : FinetuneSettings
    seed : int
        Initialisation and batch-order seeds derive from it and the split.
    device : str
        Torch device.
    progress : str or None
        tqdm description; None hides the bar.

    Returns
    -------
    FinetuneResult
    """
    x_all = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs,
                            dtype=torch.float32)
    labels = np.asarray(labels)
    row_subject = np.asarray(row_subject)
    row_labels = labels[row_subject]
    n_repeats = max(s.repeat for s in splits) + 1
    scores = np.full((n_repeats, len(labels)), np.nan)
    selected = []
    grid = [(lr, decay) for lr in settings.learning_rates for decay in settings.layer_decays]
    for split in tqdm(splits, desc=progress, disable=None if progress else True, leave=False):
        # Mean inner-validation loss per (grid point, epoch); the test fold is never read here.
        curves = np.zeros((len(grid), settings.max_epochs))
        for inner_index, (fit_subjects, val_subjects) in enumerate(split.inner):
            fit_rows = rows_of_subjects(subjects=fit_subjects, row_subject=row_subject)
            val_rows = rows_of_subjects(subjects=val_subjects, row_subject=row_subject)
            objective = _Objective(task_type=task_type, y_train=row_labels[fit_rows])
            fit = objective.data(x_all[fit_rows], row_labels[fit_rows], device)
            val = objective.data(x_all[val_rows], row_labels[val_rows], device)
            for g, (lr, decay) in enumerate(grid):
                _, losses = _train(model_factory=model_factory, objective=objective, train=fit,
                                   validation=val, learning_rate=lr, layer_decay=decay,
                                   epochs=settings.max_epochs, settings=settings, device=device,
                                   seed=derived_seed(seed=seed, keys=(split.repeat, split.fold,
                                                                      inner_index)))
                curves[g] += np.asarray(losses) / len(split.inner)
        best_grid, best_epoch = np.unravel_index(np.argmin(curves), curves.shape)
        lr, decay = grid[best_grid]
        train_rows = rows_of_subjects(subjects=split.train, row_subject=row_subject)
        test_rows = rows_of_subjects(subjects=split.test, row_subject=row_subject)
        objective = _Objective(task_type=task_type, y_train=row_labels[train_rows])
        model, _ = _train(model_factory=model_factory, objective=objective,
                          train=objective.data(x_all[train_rows], row_labels[train_rows], device),
                          validation=None, learning_rate=lr, layer_decay=decay,
                          epochs=int(best_epoch) + 1, settings=settings, device=device,
                          seed=derived_seed(seed=seed, keys=(split.repeat, split.fold,
                                                             len(split.inner))))
        model.eval()
        with torch.no_grad():
            row_scores = objective.scores(model(x_all[test_rows].to(device)))
        scores[split.repeat, split.test] = subject_means(
            values=row_scores[:, None], row_subject=row_subject[test_rows],
            subjects=split.test)[:, 0]
        selected.append({"repeat": split.repeat, "fold": split.fold, "learning_rate": lr,
                         "layer_decay": decay, "epochs": int(best_epoch) + 1,
                         "validation_loss": float(curves[best_grid, best_epoch])})
    with torch.random.fork_rng(devices=[]):
        n_parameters = count_trainable_parameters(
            model=model_factory(2 if task_type == "classification" else 1))
    return FinetuneResult(scores=scores, selected=selected, n_trainable_parameters=n_parameters)
