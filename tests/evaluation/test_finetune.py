"""Tests of bh_models.evaluation.finetune on tiny models: layer decay, selection without the test fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bh_models.evaluation.finetune import (
    FinetuneSettings,
    count_trainable_parameters,
    finetune_cross_validated,
    layer_decay_param_groups,
    model_layers,
)
from bh_models.evaluation.probe import make_splits, metrics_by_repeat

SMALL = FinetuneSettings(learning_rates=(3e-2, 1e-2), layer_decays=(0.75, 1.0), max_epochs=20,
                         batch_size=8, weight_decay=0.01)


def _mlp(n_outputs: int, n_inputs: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(n_inputs, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, n_outputs))


class _WithTokens(nn.Module):
    """A model with its own parameter and an explicit layer order."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def layer_groups(self):
        return [[self.token], list(self.block.parameters()), list(self.head.parameters())]


def test_linear_head_on_768_d_has_1538_parameters():
    assert count_trainable_parameters(model=nn.Linear(768, 2)) == 1538


def test_layer_decay_scales_learning_rate_by_depth():
    groups = layer_decay_param_groups(model=_mlp(2), base_lr=1e-3, layer_decay=0.5, weight_decay=0.05)
    by_layer = {}
    for group in groups:
        by_layer.setdefault(group["layer"], set()).add(group["lr"])
        # Biases are 1-d: never weight-decayed.
        assert group["weight_decay"] == (0.05 if all(p.ndim == 2 for p in group["params"]) else 0.0)
    assert by_layer == {0: {2.5e-4}, 1: {5e-4}, 2: {1e-3}}  # three Linear layers, head last
    assert sum(p.numel() for g in groups for p in g["params"]) == count_trainable_parameters(model=_mlp(2))


def test_layer_groups_method_and_own_parameters():
    layers = model_layers(model=_WithTokens())
    assert [len(group) for group in layers] == [1, 2, 2]

    class Bad(_WithTokens):
        def layer_groups(self):
            return [list(self.block.parameters()), list(self.head.parameters())]  # token missing

    with pytest.raises(ValueError, match="exactly once"):
        model_layers(model=Bad())
    # Without layer_groups, a parameter of the model itself joins the first layer.
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert [len(group) for group in model_layers(model=model)] == [3, 2]


def test_held_out_subjects_are_only_seen_at_the_final_prediction():
    rng = np.random.default_rng(0)
    n_subjects = 18
    y = np.array([0, 1] * (n_subjects // 2))
    row_subject = np.repeat(np.arange(n_subjects), 2)  # two rows (TR variants) per subject
    inputs = np.column_stack([np.arange(2 * n_subjects), rng.normal(size=(2 * n_subjects, 4))])
    split = make_splits(y=y, task_type="classification", n_folds=3, n_repeats=1)[0]
    calls = []

    class Recorder(nn.Module):
        def __init__(self, n_outputs: int) -> None:
            super().__init__()
            self.body = nn.Linear(4, n_outputs)

        def forward(self, x):
            calls.append((self.training, set(x[:, 0].long().tolist())))  # column 0 = row id
            return self.body(x[:, 1:])

    finetune_cross_validated(model_factory=Recorder, inputs=inputs, row_subject=row_subject, labels=y,
                             splits=[split], task_type="classification",
                             settings=FinetuneSettings(learning_rates=(1e-2,), layer_decays=(1.0,),
                                                       max_epochs=2, batch_size=8))
    test_rows = set(np.flatnonzero(np.isin(row_subject, split.test)).tolist())
    *selection, final = calls
    assert not final[0] and final[1] == test_rows
    for _, rows in selection:
        assert not rows & test_rows


def test_finetuning_learns_on_held_out_folds():
    rng = np.random.default_rng(1)
    n_subjects = 48
    x = rng.normal(size=(n_subjects, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    splits = make_splits(y=y, task_type="classification", n_folds=3, n_repeats=1, seed=0)
    result = finetune_cross_validated(model_factory=_mlp, inputs=x, row_subject=np.arange(n_subjects),
                                      labels=y, splits=splits, task_type="classification",
                                      settings=SMALL, seed=3)
    auroc = metrics_by_repeat(labels=y, scores=result.scores[..., None], task_type="classification")["auroc"]
    assert auroc.mean() > 0.8
    assert len(result.selected) == 3
    for choice in result.selected:
        assert choice["learning_rate"] in SMALL.learning_rates and 1 <= choice["epochs"] <= 20
    assert result.n_trainable_parameters == count_trainable_parameters(model=_mlp(2))


def test_finetuning_is_deterministic_and_keeps_the_global_rng():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    y = np.array([0, 1] * 12)
    split = make_splits(y=y, task_type="classification", n_folds=3, n_repeats=1)[:1]
    settings = FinetuneSettings(learning_rates=(1e-2,), layer_decays=(0.75,), max_epochs=3, batch_size=8)
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    runs = [finetune_cross_validated(model_factory=_mlp, inputs=x, row_subject=np.arange(24), labels=y,
                                     splits=split, task_type="classification", settings=settings,
                                     seed=5).scores for _ in range(2)]
    assert torch.rand(1) == expected_draw
    np.testing.assert_array_equal(runs[0], runs[1])


def test_regression_finetuning_predicts_in_target_units():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6)).astype(np.float32)
    y = 50.0 + 10.0 * x[:, 0]
    splits = make_splits(y=y, task_type="regression", n_folds=3, n_repeats=1)
    result = finetune_cross_validated(model_factory=_mlp, inputs=x, row_subject=np.arange(30), labels=y,
                                      splits=splits, task_type="regression", settings=SMALL)
    metrics = metrics_by_repeat(labels=y, scores=result.scores[..., None], task_type="regression")
    assert metrics["pearson_r"].mean() > 0.7
    assert abs(result.scores.mean() - 50.0) < 5.0
