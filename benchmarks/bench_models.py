"""Benchmark: CPU training speed of the tiny configs, and SDPA against naive attention.

Two figures, each from one run:

1. Training steps/s and peak memory of each tiny config (harmonix-F JEPA,
   harmonix-S MAE, Harmonizer) on demo-cohort shapes: 400 ROIs x up to 6 TAPE
   patches (TR 0.735 s x 160 frames, TR 2.0 s x 100 frames), T1 on the 2 mm MNI
   grid (97 x 115 x 97, padded to 112 x 128 x 112 = 392 patches), batch 4,
   AdamW. Each model runs in its own subprocess so its peak resident memory
   (``ru_maxrss``) is its own; the increase over the process's resident memory
   before the first step is reported too.
2. Attention at the full Harmonizer sequence length, 400 x 18 fMRI + 1,200 T1
   + 128 hub = 8,528 tokens, with a key-padding mask (a quarter of the fMRI
   patches padded): ``torch.nn.functional.scaled_dot_product_attention`` with a
   boolean mask against ``softmax(QK^T / sqrt(d)) V`` materialised, forward and
   forward + backward, same inputs, each in its own subprocess for memory; the
   outputs are checked equal on a shorter sequence first.
3. Parameter counts of the full (``base``, paper-scale) configs: total,
   trainable (harmonix-F's EMA target encoder is not trained) and per top-level
   sub-module. Built on CPU in a subprocess; nothing is run.

    python benchmarks/bench_models.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from bh_models.models.nn.blocks import naive_attention

FULL_TOKENS = 400 * 18 + 1200 + 128


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def demo_fmri_batch(batch_size: int) -> dict:
    """Demo-like fMRI batch: k = 48 (4 patches), 24 (4 patches) and 18 (6 patches), max 18 patches."""
    generator = torch.Generator().manual_seed(0)
    plans = [(48, 4), (24, 4), (18, 6), (48, 4)][:batch_size]
    length = 18 * max(k for k, _ in plans)
    x = torch.zeros(batch_size, 400, length)
    patch_mask = torch.zeros(batch_size, 18, dtype=torch.bool)
    for row, (k, n) in enumerate(plans):
        x[row, :, : n * k] = torch.randn(400, n * k, generator=generator)
        patch_mask[row, :n] = True
    return {"x": x, "patch_mask": patch_mask, "k": torch.tensor([k for k, _ in plans])}


def run_model(name: str, steps: int, batch_size: int) -> dict:
    """Time ``steps`` training steps of one tiny config after one warm-up step."""
    from bh_models.models.nn.configs import model_config
    from bh_models.models.nn.harmonix_f import HarmonixF
    from bh_models.models.nn.harmonix_s import HarmonixS
    from bh_models.models.nn.harmonizer import Harmonizer

    torch.manual_seed(0)
    if name == "harmonix_f":
        model = HarmonixF(model_config(model="harmonix_f", size="tiny", overrides={"geometry_dim": 20}),
                          torch.randn(400, 20))
        batch = demo_fmri_batch(batch_size)

        def step_loss(generator: torch.Generator) -> torch.Tensor:
            return model(batch, generator)[0]
    elif name == "harmonix_s":
        model = HarmonixS(model_config(model="harmonix_s", size="tiny", overrides={"img_size": (112, 128, 112)}))
        batch = {"t1": torch.randn(batch_size, 1, 97, 115, 97)}

        def step_loss(generator: torch.Generator) -> torch.Tensor:
            return model(batch, generator)[0]
    else:
        model = Harmonizer(model_config(model="harmonizer", size="tiny",
                                        overrides={"dim_s": 64, "dim_f": 64, "s_grid": (7, 8, 7)}))
        z_s, s_mask = torch.randn(batch_size, 392, 64), torch.ones(batch_size, 392, dtype=torch.bool)
        f_patch = demo_fmri_batch(batch_size)["patch_mask"][:, :6]
        z_f = torch.randn(batch_size, 400 * 6, 64)
        f_mask = f_patch[:, None, :].expand(batch_size, 400, 6).reshape(batch_size, -1)

        def step_loss(generator: torch.Generator) -> torch.Tensor:
            return model(z_s, s_mask, z_f, f_mask)[0]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss_before = current_rss_mb()

    def one_step(index: int) -> None:
        loss = step_loss(torch.Generator().manual_seed(index))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "on_optimizer_step"):
            model.on_optimizer_step(step=index + 1, total_steps=steps + 1)

    one_step(0)
    started = time.perf_counter()
    for index in range(1, steps + 1):
        one_step(index)
    elapsed = time.perf_counter() - started
    return {"model": name, "steps_per_s": steps / elapsed, "s_per_step": elapsed / steps,
            "peak_rss_mb": peak_rss_mb(), "peak_increase_mb": peak_rss_mb() - rss_before,
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def base_parameter_counts() -> list[dict]:
    """Parameters of each full-size config (the paper's ViT-B scale)."""
    from bh_models.models.nn.configs import model_config
    from bh_models.models.nn.harmonix_f import HarmonixF
    from bh_models.models.nn.harmonix_s import HarmonixS
    from bh_models.models.nn.harmonizer import Harmonizer

    builders = {
        "harmonix_f": lambda c: HarmonixF(c, torch.zeros(c.n_rois, c.geometry_dim)),
        "harmonix_s": HarmonixS,
        "harmonizer": Harmonizer,
    }
    rows = []
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build(model_config(model=name, size="base"))
        rows.append({
            "model": name,
            "total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "children": {n: sum(p.numel() for p in c.parameters()) for n, c in model.named_children()},
        })
        del model
    return rows


def attention_inputs(tokens: int, heads: int, head_dim: int, backward: bool) -> tuple:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=generator).requires_grad_(backward)
               for _ in range(3))
    key_mask = torch.ones(1, tokens, dtype=torch.bool)
    n_fmri = min(tokens, 400 * 18)
    fmri_mask = (torch.arange(18) < 14)[None, :].expand(400, 18).reshape(-1)[:n_fmri]  # 4 of 18 patches padded
    key_mask[0, tokens - n_fmri:] = fmri_mask  # [T1 ; hubs ; fMRI]
    return q, k, v, key_mask


def run_attention(kind: str, tokens: int, heads: int, head_dim: int, backward: bool, repeats: int) -> dict:
    q, k, v, key_mask = attention_inputs(tokens, heads, head_dim, backward)
    rss_before = current_rss_mb()

    def call() -> None:
        if kind == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        else:
            out = naive_attention(q, k, v, key_mask)
        if backward:
            out.sum().backward()

    call()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    seconds = (time.perf_counter() - started) / repeats
    return {"kind": kind, "backward": backward, "seconds": seconds,
            "peak_increase_mb": peak_rss_mb() - rss_before}


def child(args: list[str]) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (head width 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--param-counts", action="store_true", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--one-model")
    parser.add_argument("--one-attention", nargs=2, metavar=("KIND", "BACKWARD"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_model:
        print(json.dumps(run_model(args.one_model, args.steps, args.batch_size)))
        return
    if args.one_attention:
        kind, backward = args.one_attention
        print(json.dumps(run_attention(kind, FULL_TOKENS, args.heads, 64, backward == "1", args.repeats)))
        return
    if args.param_counts:
        print(json.dumps(base_parameter_counts()))
        return

    common = ["--threads", str(args.threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--heads", str(args.heads), "--repeats", str(args.repeats)]
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    if not args.skip_models:
        print(f"\n1. Tiny configs, one training step = forward + backward + AdamW, batch {args.batch_size}")
        print(f"{'model':<12} {'params':>9} {'steps/s':>8} {'s/step':>7} {'peak RSS MB':>12} {'increase MB':>12}")
        for name in ("harmonix_f", "harmonix_s", "harmonizer"):
            r = child([*common, "--one-model", name])
            print(f"{name:<12} {r['parameters']:>9,} {r['steps_per_s']:>8.2f} {r['s_per_step']:>7.2f} "
                  f"{r['peak_rss_mb']:>12.0f} {r['peak_increase_mb']:>12.0f}")

    if not args.skip_attention:
        attention_section(args, common)
    print("\n3. Full (base) configs, parameters")
    print(f"{'model':<12} {'total':>13} {'trainable':>13}  sub-modules")
    for r in child(["--param-counts"]):
        parts = ", ".join(f"{n} {c:,}" for n, c in r["children"].items() if c)
        print(f"{r['model']:<12} {r['total']:>13,} {r['trainable']:>13,}  {parts}")


def attention_section(args: argparse.Namespace, common: list[str]) -> None:
    # Correctness first, on a sequence short enough for both.
    q, k, v, key_mask = attention_inputs(1024, 2, 64, backward=False)
    reference = naive_attention(q, k, v, key_mask)
    fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    print(f"\n2. Attention, {FULL_TOKENS} tokens (400 x 18 fMRI + 1200 T1 + 128 hub), batch 1, {args.heads} heads "
          f"x 64, key-padding mask; max |SDPA - naive| at 1,024 tokens: {(fused - reference).abs().max():.2e}")
    print(f"{'pass':<18} {'SDPA s':>8} {'naive s':>8} {'speed-up':>9} {'SDPA MB':>8} {'naive MB':>9}")
    for backward in ("0", "1"):
        sdpa = child([*common, "--one-attention", "sdpa", backward])
        naive = child([*common, "--one-attention", "naive", backward])
        label = "forward + backward" if backward == "1" else "forward"
        print(f"{label:<18} {sdpa['seconds']:>8.2f} {naive['seconds']:>8.2f} "
              f"{naive['seconds'] / sdpa['seconds']:>8.2f}x {sdpa['peak_increase_mb']:>8.0f} "
              f"{naive['peak_increase_mb']:>9.0f}")


if __name__ == "__main__":
    main()
