"""Harmonizer training steps per second: frozen encoders at every step vs the cached latent store.

Before, every Harmonizer step re-encoded its batch with both frozen ViT encoders;
now the encoders run once per sample (``cache_latents``, the release's stage 0) and
training reads bf16 tokens from a memory-mapped latent store. Both are timed here
side by side in one process, with the tiny configs at the demo's sizes (400 ROIs,
6 patches of 48 frames, an 80 x 96 x 80 T1 tensor, batch 4), on CPU:

* ``on the fly``: encode the batch (harmonix-F + harmonix-S, no grad), then a
  Harmonizer forward, backward and AdamW step;
* ``cached``: read the batch's rows from the latent store (bf16 -> float32), then
  the same Harmonizer step.

Prints steps/s of both, their ratio, and the one-off cost of writing the cache.

Usage: ``python benchmarks/bench_harmonizer_latents.py [--steps 20] [--threads 2]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bh_models.models.latents import LatentStore, LatentWriter, collate_latents
from bh_models.models.nn.configs import model_config
from bh_models.models.nn.harmonix_f import HarmonixF
from bh_models.models.nn.harmonix_s import HarmonixS
from bh_models.models.nn.harmonizer import Harmonizer
from bh_models.models.pretrain import encode_latents

N_ROIS, N_PATCHES, K, VOLUME, BATCH, N_SAMPLES = 400, 6, 48, (80, 96, 80), 4, 16


def synthetic_batch(generator: torch.Generator) -> dict:
    real = torch.randint(3, N_PATCHES + 1, (BATCH,), generator=generator)
    x = torch.randn(BATCH, N_ROIS, N_PATCHES * K, generator=generator)
    patch_mask = torch.arange(N_PATCHES)[None] < real[:, None]
    fmri = {"x": x * patch_mask.repeat_interleave(K, dim=1)[:, None], "patch_mask": patch_mask,
            "k": torch.full((BATCH,), K), "n_patches": real}
    rows = torch.arange(BATCH)
    return {"size": BATCH, "fmri": fmri, "fmri_rows": rows, "t1": torch.randn(BATCH, 1, *VOLUME, generator=generator),
            "t1_rows": rows}


def harmonizer_step(model: Harmonizer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                    mask: torch.Tensor) -> None:
    loss, _ = model(tokens, mask)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    f_config = model_config(model="harmonix_f", size="tiny", overrides={"n_rois": N_ROIS})
    fmri_model = HarmonixF(f_config, 0.01 * torch.randn(N_ROIS, 200), 0.1 * torch.randn(N_ROIS, 30)).eval()
    t1_model = HarmonixS(model_config(model="harmonix_s", size="tiny", overrides={"img_size": VOLUME})).eval()
    fmri_model.requires_grad_(False)
    t1_model.requires_grad_(False)
    config = model_config(model="harmonizer", size="tiny", overrides={
        "n_rois": N_ROIS, "n_patches": N_PATCHES, "s_grid": t1_model.config.grid})
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(generator) for _ in range(N_SAMPLES // BATCH)]

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        writer = LatentWriter(Path(tmp) / "latents", n_rows=N_SAMPLES, n_tokens=config.n_f_tokens + config.n_s_tokens,
                              dim=64, meta={"n_rois": N_ROIS, "n_patches": N_PATCHES, "s_grid": list(config.s_grid)})
        for batch in batches:
            tokens, mask = encode_latents(batch, fmri_model=fmri_model, t1_model=t1_model, n_patches=N_PATCHES)
            writer.add(tokens, mask, [{"dataset": "bench", "subject": "s"}] * BATCH)
        store = LatentStore(writer.close())
        cache_seconds = time.perf_counter() - started

        results = {}
        for mode in ("on the fly", "cached", "on the fly again", "cached again"):  # interleaved: fair under load
            torch.manual_seed(1)
            model = Harmonizer(config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(2))
            started = None
            for step in range(args.steps + 2):  # two warm-up steps
                if step == 2:
                    started = time.perf_counter()
                if mode.startswith("on the fly"):
                    with torch.no_grad():
                        tokens, mask = encode_latents(batches[step % len(batches)], fmri_model=fmri_model,
                                                      t1_model=t1_model, n_patches=N_PATCHES)
                else:
                    rows = order[(step * BATCH) % N_SAMPLES:][:BATCH]
                    batch = collate_latents([store[int(i)] for i in rows])
                    tokens, mask = batch["tokens"], batch["mask"]
                harmonizer_step(model, optimizer, tokens, mask)
            results.setdefault(mode.removesuffix(" again"), []).append(args.steps / (time.perf_counter() - started))
    fly, cached = max(results["on the fly"]), max(results["cached"])
    print(f"Harmonizer steps/s on CPU ({args.threads} threads, tiny configs, batch {BATCH}, "
          f"{config.n_f_tokens + config.n_s_tokens} tokens per row; best of 2 interleaved runs of {args.steps} steps):")
    print(f"  frozen encoders at every step: {fly:.2f} steps/s")
    print(f"  cached latent store (bf16):    {cached:.2f} steps/s")
    print(f"  speed-up: {cached / fly:.2f}x; writing the cache once: {cache_seconds:.1f} s for {N_SAMPLES} samples")


if __name__ == "__main__":
    main()
