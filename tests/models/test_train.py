"""Training loop: schedule, data order, outputs, and bit-identical resume after a kill."""

from __future__ import annotations

import os
import random
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from bh_models.models.lr_schedule import warmup_cosine_lr
from bh_models.models.nn.configs import config_to_dict, model_config
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.train import (
    ResumableBatchSampler,
    TrainConfig,
    load_checkpoint,
    resume_path,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train,
)

N_ROIS, MAX_PATCHES = 8, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers


class Regressor(nn.Module):
    """Small MLP whose step uses the global RNG (dropout) and the step generator (noise)."""

    def __init__(self, dropout: float = 0.0, noise: float = 0.01) -> None:
        super().__init__()
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        noise = self.noise * torch.randn(batch["x"].shape, generator=generator)
        loss = F.mse_loss(self.net(batch["x"] + noise), batch["y"])
        return loss, {"noise": float(noise.abs().mean())}


def regression_data(n: int = 24) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0]))[:, None]
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def call_model(model: nn.Module, batch: dict, generator: torch.Generator):
    return model(batch, generator)


def fmri_items(n: int = 10) -> list[dict]:
    """Store-like fMRI items with mixed patch sizes."""
    generator = torch.Generator().manual_seed(1)
    items = []
    for i in range(n):
        k = (48, 24, 16)[i % 3]
        n_patches = 1 + i % MAX_PATCHES
        x = torch.zeros(N_ROIS, MAX_PATCHES * k)
        x[:, : n_patches * k] = torch.randn(N_ROIS, n_patches * k, generator=generator)
        mask = torch.arange(MAX_PATCHES) < n_patches
        items.append({"x": x, "patch_mask": mask, "k": k, "tr": 35.28 / k, "n_patches": n_patches,
                      "sample_id": f"s{i}", "subject": f"sub{i // 2}", "dataset": "synthetic"})
    return items


def collate_fmri(items: list[dict]) -> dict:
    """Stand-in for ``bh_models.models.data.collate_fmri``: pad x along time, stack tensors."""
    length = max(item["x"].shape[1] for item in items)
    return {
        "x": torch.stack([F.pad(item["x"], (0, length - item["x"].shape[1])) for item in items]),
        "patch_mask": torch.stack([item["patch_mask"] for item in items]),
        "k": torch.tensor([item["k"] for item in items]),
        "n_patches": torch.tensor([item["n_patches"] for item in items]),
        "tr": torch.tensor([item["tr"] for item in items]),
        "sample_id": [item["sample_id"] for item in items],
        "subject": [item["subject"] for item in items],
        "dataset": [item["dataset"] for item in items],
    }


def run_jepa(folder: Path, *, stop_after: int | None = None, steps: int = 8) -> object:
    seed_everything(0)
    config = model_config(model="harmonix_f", size="tiny", overrides={"n_rois": N_ROIS, "geometry_dim": 3})
    model = HarmonixF(config, torch.randn(N_ROIS, 3))
    train_config = TrainConfig(steps=steps, batch_size=3, lr=1e-3, seed=0, checkpoint_every=3, grad_accum=2)
    return train(
        model=model, loss_fn=call_model, dataset=fmri_items(), collate_fn=collate_fmri, config=train_config,
        model_config=config_to_dict(config), out_checkpoint=folder / "model.pt", out_metrics=folder / "metrics.tsv",
        out_curve=folder / "curve.png", title="test", stop_after=stop_after,
    )


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- schedule and data order


def test_warmup_cosine_schedule() -> None:
    lrs = [warmup_cosine_lr(step=s, base_lr=1.0, warmup_steps=4, total_steps=20, min_lr=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert warmup_cosine_lr(step=50, base_lr=1.0, warmup_steps=4, total_steps=20, min_lr=0.1) == pytest.approx(0.1)


def test_batch_sampler_restarts_at_any_batch() -> None:
    stream = iter(ResumableBatchSampler(n_samples=7, batch_size=3, seed=4))
    batches = [next(stream) for _ in range(10)]
    later = iter(ResumableBatchSampler(n_samples=7, batch_size=3, seed=4, start_batch=6))
    assert [next(later) for _ in range(4)] == batches[6:]
    flat = [i for batch in batches[:7] for i in batch]  # 21 indices = 3 epochs of 7
    for epoch in range(3):
        assert sorted(flat[7 * epoch: 7 * (epoch + 1)]) == list(range(7))


def test_batch_sampler_shards_ranks_disjointly() -> None:
    shards = [next(iter(ResumableBatchSampler(n_samples=8, batch_size=4, seed=0, rank=r, world_size=2)))
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(8))


def test_rng_state_round_trip(tmp_path: Path) -> None:
    seed_everything(3)
    state = rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# ----------------------------------------------------------------------------- outputs and resume


def test_outputs_and_checkpoint_contents(tmp_path: Path) -> None:
    result = run_jepa(tmp_path)
    assert result.completed and result.end_step == 8
    metrics = pd.read_csv(tmp_path / "metrics.tsv", sep="\t")
    assert list(metrics.columns[:5]) == ["step", "loss", "lr", "samples_per_s", "grad_norm"]
    assert metrics["step"].tolist() == list(range(1, 9))
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = load_checkpoint(tmp_path / "model.pt")
    assert {"model", "optimizer", "scheduler", "step", "config", "rng", "data_position"} <= payload.keys()
    assert payload["step"] == 8 and payload["data_position"] == 16
    assert payload["config"]["model"]["kind"] == "harmonix_f"
    assert not resume_path(tmp_path / "model.pt").exists()  # removed once the final checkpoint exists


def test_stopped_and_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    """Stop after step 7 (last checkpoint at step 6), resume: same weights, optimiser and losses."""
    full = run_jepa(tmp_path / "full")
    stopped = run_jepa(tmp_path / "resumed", stop_after=7)
    assert not stopped.completed and not (tmp_path / "resumed" / "model.pt").exists()
    assert load_checkpoint(resume_path(tmp_path / "resumed" / "model.pt"))["step"] == 6
    resumed = run_jepa(tmp_path / "resumed")
    assert resumed.start_step == 6 and resumed.completed
    a = load_checkpoint(tmp_path / "full" / "model.pt")
    b = load_checkpoint(tmp_path / "resumed" / "model.pt")
    assert_same_state(a["model"], b["model"])  # includes the EMA target encoder
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_same_state(state_a, state_b)
    losses_a = pd.read_csv(tmp_path / "full" / "metrics.tsv", sep="\t")["loss"]
    losses_b = pd.read_csv(tmp_path / "resumed" / "metrics.tsv", sep="\t")["loss"]
    assert losses_a.tolist() == losses_b.tolist()


def test_resume_file_of_another_configuration_is_ignored(tmp_path: Path) -> None:
    run_jepa(tmp_path, stop_after=4, steps=8)  # leaves a resume file at step 3
    result = run_jepa(tmp_path, steps=6)  # other schedule: must start afresh
    assert result.start_step == 0 and result.end_step == 6


def test_final_checkpoint_is_byte_reproducible(tmp_path: Path) -> None:
    run_jepa(tmp_path / "a")
    run_jepa(tmp_path / "b")
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()


def test_gradient_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    weights = []
    for batch_size, accum in ((4, 1), (2, 2)):
        seed_everything(0)
        model = Regressor(noise=0.0)
        config = TrainConfig(steps=5, batch_size=batch_size, grad_accum=accum, lr=1e-2, seed=0, checkpoint_every=10)
        folder = tmp_path / f"b{batch_size}"
        train(model=model, loss_fn=call_model, dataset=regression_data(), collate_fn=default_collate,
              config=config, model_config={"kind": "regressor"}, out_checkpoint=folder / "m.pt",
              out_metrics=folder / "m.tsv", out_curve=folder / "m.png", title="accum")
        weights.append(model.net[0].weight.detach().clone())
    # Same samples per step, so the same updates up to float summation order.
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    import torch, torch.nn.functional as F
    from torch import nn
    from torch.utils.data import default_collate
    from bh_models.models.train import TrainConfig, seed_everything, train

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 1))

        def forward(self, batch, generator):
            time.sleep(0.03)  # slow enough for the test to kill it mid-run
            noise = 0.01 * torch.randn(batch["x"].shape, generator=generator)
            return F.mse_loss(self.net(batch["x"] + noise), batch["y"]), {}

    folder = Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    data = [{"x": x[i], "y": x[i, :1] * 2} for i in range(40)]
    seed_everything(0)
    torch.set_num_threads(1)
    train(model=Regressor(), loss_fn=lambda m, b, gen: m(b, gen), dataset=data, collate_fn=default_collate,
          config=TrainConfig(steps=60, batch_size=5, lr=1e-2, seed=0, checkpoint_every=5),
          model_config={"kind": "regressor"}, out_checkpoint=folder / "m.pt", out_metrics=folder / "m.tsv",
          out_curve=folder / "m.png", title="kill")
''')


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_identically(tmp_path: Path) -> None:
    """A real kill: SIGKILL a training subprocess mid-run, re-run it, compare with an uninterrupted run.

    Marked slow: two fresh interpreters (torch import) on top of the in-process reference.
    """
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with pytest.MonkeyPatch.context() as patch:  # the uninterrupted reference runs in this process
        patch.setattr(sys, "argv", [str(script), str(tmp_path / "full")])
        runpy.run_path(str(script), run_name="__main__")

    folder = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(script), str(folder)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = resume_path(folder / "m.pt")
    deadline = time.monotonic() + 120
    while not resume.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)  # land between two checkpoints
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert resume.exists() and not (folder / "m.pt").exists(), "the run was not killed mid-way"
    killed_at = load_checkpoint(resume)["step"]
    assert 0 < killed_at < 60

    subprocess.run([sys.executable, str(script), str(folder)], check=True, env=env, capture_output=True)
    assert_same_state(load_checkpoint(tmp_path / "full" / "m.pt")["model"], load_checkpoint(folder / "m.pt")["model"])


# ----------------------------------------------------------------------------- settings (issue 19)


def test_linear_lr_scaling_follows_the_global_batch() -> None:
    from bh_models.core.errors import BHConfigError

    config = TrainConfig(steps=100, batch_size=16, grad_accum=2, lr=5e-4, seed=0, checkpoint_every=10,
                         lr_scaling="linear", warmup_steps=10, min_lr=1e-6)
    assert config.global_batch(8) == 256
    assert config.peak_lr(8) == pytest.approx(5e-4)  # 5e-4 x 256 / 256
    assert config.peak_lr(1) == pytest.approx(5e-4 * 32 / 256)
    assert config.lr_at(9, world_size=8) == pytest.approx(5e-4)  # end of warm-up
    assert config.lr_at(99, world_size=8) == pytest.approx(1e-6)
    unscaled = TrainConfig(steps=100, batch_size=16, lr=5e-4, seed=0, checkpoint_every=10)
    assert unscaled.peak_lr(8) == unscaled.peak_lr(1) == 5e-4
    with pytest.raises(BHConfigError, match="lr_scaling"):
        TrainConfig(steps=10, batch_size=1, lr=1e-3, seed=0, checkpoint_every=1, lr_scaling="sqrt")
    with pytest.raises(BHConfigError, match="warmup_steps"):
        TrainConfig(steps=10, batch_size=1, lr=1e-3, seed=0, checkpoint_every=1, warmup_steps=10)


def test_the_run_uses_the_scaled_peak(tmp_path: Path) -> None:
    seed_everything(0)
    config = TrainConfig(steps=6, batch_size=4, grad_accum=2, lr=0.064, seed=0, checkpoint_every=10,
                         lr_scaling="linear", warmup_steps=2)
    train(model=Regressor(noise=0.0), loss_fn=call_model, dataset=regression_data(), collate_fn=default_collate,
          config=config, model_config={"kind": "regressor"}, out_checkpoint=tmp_path / "m.pt",
          out_metrics=tmp_path / "m.tsv", out_curve=tmp_path / "m.png", title="lr")
    lrs = pd.read_csv(tmp_path / "m.tsv", sep="\t")["lr"]
    assert lrs[1] == pytest.approx(0.064 * 8 / 256)  # peak at the end of the warm-up, global batch 8


def test_activation_checkpointing_switch_gives_the_same_gradients() -> None:
    from bh_models.models.train import set_activation_checkpointing

    grads = []
    for enabled in (False, True):
        seed_everything(0)
        config = model_config(model="harmonix_f", size="tiny", overrides={"n_rois": N_ROIS, "geometry_dim": 3})
        model = HarmonixF(config, torch.randn(N_ROIS, 3)).train()
        assert set_activation_checkpointing(model, enabled) >= 3  # encoder, target encoder, predictor
        flags = [getattr(m, "grad_checkpointing", None) for m in model.modules()]
        flags += [m.config.grad_checkpointing for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                                    "grad_checkpointing")]
        assert {f for f in flags if f is not None} == {enabled}
        loss, _ = model(collate_fmri(fmri_items(4)), torch.Generator().manual_seed(1))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_loader_workers_and_prefetch_change_nothing_but_speed(tmp_path: Path) -> None:
    """Workers, prefetching and checkpointing do not enter the run's identity: same weights, and a
    run stopped with one setting resumes with another."""
    states = []
    for name, settings in (("plain", {}), ("workers", {"num_workers": 2, "prefetch_factor": 3,
                                                        "activation_checkpointing": True})):
        seed_everything(0)
        config = model_config(model="harmonix_f", size="tiny", overrides={"n_rois": N_ROIS, "geometry_dim": 3})
        model = HarmonixF(config, torch.randn(N_ROIS, 3))
        train_config = TrainConfig(steps=4, batch_size=3, lr=1e-3, seed=0, checkpoint_every=2, **settings)
        stop = 3 if name == "workers" else None
        for stop_after in ((stop, None) if stop else (None,)):
            if stop_after is None and stop:  # resume with the plain settings
                train_config = TrainConfig(steps=4, batch_size=3, lr=1e-3, seed=0, checkpoint_every=2)
                seed_everything(0)
                model = HarmonixF(config, torch.randn(N_ROIS, 3))
            result = train(model=model, loss_fn=call_model, dataset=fmri_items(), collate_fn=collate_fmri,
                           config=train_config, model_config=config_to_dict(config),
                           out_checkpoint=tmp_path / name / "m.pt", out_metrics=tmp_path / name / "m.tsv",
                           out_curve=tmp_path / name / "m.png", title=name, stop_after=stop_after)
        assert result.completed and result.start_step == (2 if stop else 0)
        states.append(load_checkpoint(tmp_path / name / "m.pt")["model"])
    assert_same_state(states[0], states[1])
