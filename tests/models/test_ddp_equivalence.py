"""Data parallelism changes nothing but speed: 2 gloo processes x batch B == 1 process x 2B == 1 x B x 2 accumulation.

The model is the (tiny) Harmonizer on synthetic latents: every sample has the same
number of loss tokens, so its loss is a mean over samples, and it draws nothing at random, so the three runs see the same samples
in every optimiser step (the sampler gives rank r every other index of the
epoch's order; one process takes them in order) and must reach the same weights
after 5 AdamW steps with warm-up, cosine decay and gradient clipping, up to the
order of floating-point sums.

How close is "the same" in float32: AdamW divides each gradient entry by its
running RMS + eps (1e-8), so an entry whose gradient is near zero turns a
summation-order difference of ~1e-11 into an update difference of ~1e-3 of the
learning rate. Measured here: 2.7e-6 at most after 5 steps, 3e-4 of the 9e-3 the
weights moved; in float64 the three runs agree to 2.6e-15. The test therefore
runs twice: in float64, to 1e-9, and in float32, to 1e-3 of the distance moved.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import default_collate

from bh_models.models.nn.configs import config_to_dict, model_config
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.train import TrainConfig, distributed_context, load_checkpoint, seed_everything, train

STEPS, BATCH = 5, 3
N_ROIS, PATCHES, S_GRID = 10, 2, (2, 2, 2)


def latents(n: int = 24, dtype: torch.dtype = torch.float32) -> list[dict]:
    generator = torch.Generator().manual_seed(7)
    n_tokens = N_ROIS * PATCHES + 8  # fMRI then T1 tokens, as the latent store holds them
    return [{"tokens": torch.randn(n_tokens, 16, generator=generator, dtype=dtype),
             "mask": torch.ones(n_tokens, dtype=torch.bool)} for _ in range(n)]


def harmonizer_loss(model, batch, generator):
    return model(batch["tokens"], batch["mask"])


def build() -> tuple[Harmonizer, object]:
    config = model_config(model="harmonizer", size="tiny", overrides={
        "dim_s": 16, "dim_f": 16, "s_grid": S_GRID, "n_rois": N_ROIS, "n_patches": PATCHES, "embed_dim": 32,
        "n_hub": 4})
    seed_everything(0)
    return Harmonizer(config), config


def run(folder: str, batch_size: int, grad_accum: int, steps: int = STEPS, double: bool = False) -> None:
    torch.set_num_threads(1)
    model, config = build()
    model = model.double() if double else model
    train_config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, seed=0,
                               checkpoint_every=100, warmup_steps=2, grad_clip=0.5)
    data = latents(dtype=torch.float64 if double else torch.float32)
    train(model=model, loss_fn=harmonizer_loss, dataset=data, collate_fn=default_collate, config=train_config,
          model_config=config_to_dict(config), out_checkpoint=Path(folder) / "m.pt",
          out_metrics=Path(folder) / "m.tsv", out_curve=Path(folder) / "m.png", title="ddp",
          context=distributed_context())


def _rank(rank: int, world_size: int, port: int, folder: str, double: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    try:
        run(folder, BATCH, 1, double=double)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_equal_one_with_twice_the_batch_and_with_accumulation(tmp_path: Path, double: bool) -> None:
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "ddp"), double), nprocs=2, join=True)
    run(str(tmp_path / "big"), 2 * BATCH, 1, double=double)
    run(str(tmp_path / "accum"), BATCH, 2, double=double)
    states = {name: load_checkpoint(tmp_path / name / "m.pt") for name in ("ddp", "big", "accum")}
    assert {s["step"] for s in states.values()} == {STEPS}
    initial = {k: v.to(torch.float64 if double else torch.float32) for k, v in build()[0].state_dict().items()}
    moved = max(float((states["ddp"]["model"][k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # the runs did move the weights: not a vacuous equality
    tolerance = 1e-9 if double else 1e-3 * moved
    for name in ("big", "accum"):
        for key, value in states["ddp"]["model"].items():
            difference = float((value - states[name]["model"][key]).abs().max())
            assert difference <= tolerance, (name, key, difference, tolerance)
