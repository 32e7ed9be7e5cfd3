"""GPU check: each base model at its default per-GPU batch on one GPU, in under 5 minutes on an H100.

Per model (harmonix-F JEPA, harmonix-S MAE, Harmonizer on cached latents), with
synthetic batches of the real shapes (``synthetic_models.py``: 400 ROIs x 18
patches, the 160 x 192 x 160 T1 grid, 1,200 + 128 + 7,200 Harmonizer tokens):

1. **Throughput** at the schema's default per-GPU batch and activation
   checkpointing (``pretrain.<model>.batch_size``): step time, samples/s,
   tokens/s, peak memory (``torch.cuda.max_memory_allocated``) beside the memory
   table's prediction, and MFU against the bf16 dense peak (989.4 TFLOP/s on an
   H100 SXM)::

       MFU = FLOPs per sample x samples/s / peak

   FLOPs per sample from ``bh_models.models.flops`` (matrix products at 2 FLOPs
   per multiply-add; 3x the forward for trained parts, 2x for the first layer,
   1x for the EMA target encoder; recomputation not counted). One block of width
   ``D`` over ``N`` tokens costs ``24 N D^2 + 4 N^2 D`` forward.
2. **Attention backend** SDPA picked (flash, memory-efficient, cuDNN or math),
   from the aten operators of one profiled forward pass.
3. **bf16 against fp32**: 20 optimiser steps from the same initial weights on the
   same batches, under bf16 autocast and in fp32 (TF32 off); both loss series.
4. **Stop and resume**: ``bh_models.models.train.train`` run 6 steps straight, and
   stopped after 3 then resumed from its resume file, with deterministic
   algorithms on; are the final weights bit-identical? Nondeterministic operators
   met are listed.

Parts 3 and 4 run at batch ``--small-batch`` (fp32 at the full batch would take
longer than the whole budget). Without CUDA the script runs the tiny configs on
CPU at the demo's shapes (``--tiny`` forces that), which a test does, so the
script cannot rot; MFU is then not reported.

    python benchmarks/bench_gpu.py                   # on the GPU machine
    python benchmarks/bench_gpu.py --tiny            # CPU, demo shapes, minutes
    python benchmarks/bench_gpu.py --quick --steps 2 --compare-steps 3 --resume-steps 4  # the test
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before CUDA starts

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_models import MODELS, build  # noqa: E402

from bh_models.core.config import load_schema  # noqa: E402
from bh_models.models.flops import H100_BF16_DENSE_PEAK, sample_cost  # noqa: E402
from bh_models.models.memory import GIB, load_memory_table  # noqa: E402
from bh_models.models.train import (  # noqa: E402
    DistContext,
    TrainConfig,
    load_checkpoint,
    resume_path,
    set_activation_checkpointing,
    train,
)

SECTIONS = {"harmonix_f": "fmri", "harmonix_s": "t1", "harmonizer": "harmonizer"}
BACKENDS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_attention_math": "math",
}


def schema_defaults(name: str) -> tuple[int, bool]:
    """Default per-GPU batch and activation checkpointing of ``pretrain.<model>``."""
    properties = load_schema()["properties"]["pretrain"]["properties"][SECTIONS[name]]["properties"]
    return properties["batch_size"]["default"], properties["activation_checkpointing"]["default"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(synthetic, model, optimizer, batch: dict, generator: torch.Generator, device: torch.device,
         bf16: bool) -> float:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = synthetic.loss(model, batch, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(model, "on_optimizer_step"):
        model.on_optimizer_step(step=1, total_steps=100)
    return float(loss.detach())


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


#: Shape overrides of ``--quick`` (the test): 2 fMRI patches, a 48^3 T1 grid.
SHAPES: dict = {}


def new_model(name: str, *, size: str, device: torch.device, checkpointing: bool, seed: int = 0):
    synthetic = build(name, size=size, seed=seed, **SHAPES)
    set_activation_checkpointing(synthetic.model, checkpointing)
    model = synthetic.model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    return synthetic, model, optimizer


def throughput(name: str, *, size: str, device: torch.device, batch_size: int, checkpointing: bool, steps: int,
               compile_model: bool) -> dict:
    synthetic, model, optimizer = new_model(name, size=size, device=device, checkpointing=checkpointing)
    runner = torch.compile(model) if compile_model else model
    batch = to_device(synthetic.make_batch(batch_size, 0), device)
    bf16 = device.type == "cuda"
    for warm in range(2):
        step(synthetic, runner, optimizer, batch, torch.Generator().manual_seed(warm), device, bf16)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for index in range(steps):
        step(synthetic, runner, optimizer, batch, torch.Generator().manual_seed(2 + index), device, bf16)
    sync(device)
    seconds = (time.perf_counter() - started) / steps
    cost = sample_cost(model=name, config=synthetic.config, n_patches=synthetic.n_patches)
    samples = batch_size / seconds
    result = {"batch_size": batch_size, "activation_checkpointing": checkpointing, "compiled": compile_model,
              "step_s": seconds, "samples_per_s": samples, "tokens_per_s": samples * cost.tokens,
              "tflop_per_sample": cost.flops / 1e12, "achieved_tflops": cost.flops * samples / 1e12,
              "backend": attention_backend(synthetic, model, batch, device, bf16)}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["mfu"] = cost.flops * samples / H100_BF16_DENSE_PEAK
        if size == "base":
            memory = load_memory_table()[name]
            result["predicted_memory_gib"] = memory.predicted_bytes(batch_size=batch_size,
                                                                    checkpointing=checkpointing) / GIB
    del model, optimizer, runner
    return result


def attention_backend(synthetic, model, batch: dict, device: torch.device, bf16: bool) -> str:
    """SDPA kernels of one forward pass, named from the aten operators the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            synthetic.loss(model, batch, torch.Generator().manual_seed(0))
    seen = {event.key.removeprefix("aten::") for event in prof.key_averages()}
    found = sorted({label for op, label in BACKENDS.items() if op in seen})
    return ", ".join(found) or "none recorded"


def bf16_against_fp32(name: str, *, size: str, device: torch.device, batch_size: int, steps: int) -> dict:
    """Loss series of the same run under bf16 autocast and in fp32 (same weights, same batches)."""
    series = {}
    for precision in ("bf16", "fp32"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        synthetic, model, optimizer = new_model(name, size=size, device=device, checkpointing=False, seed=1)
        for g in optimizer.param_groups:
            g["lr"] = 3e-4
        batches = [to_device(synthetic.make_batch(batch_size, 100 + i), device) for i in range(4)]
        series[precision] = [step(synthetic, model, optimizer, batches[i % 4], torch.Generator().manual_seed(i),
                                  device, precision == "bf16") for i in range(steps)]
        del model, optimizer
    difference = max(abs(a - b) / abs(b) for a, b in zip(series["bf16"], series["fp32"]))
    return {"batch_size": batch_size, "steps": steps, "loss_bf16": series["bf16"], "loss_fp32": series["fp32"],
            "max_relative_difference": difference}


class _Samples(Dataset):
    """Synthetic samples as a map-style dataset for ``train``."""

    def __init__(self, synthetic, n: int) -> None:
        batch = synthetic.make_batch(n, 7)
        self.items = [{key: value[i] for key, value in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def stop_and_resume(name: str, *, size: str, device: torch.device, batch_size: int, steps: int) -> dict:
    """``train`` straight vs stopped half-way and resumed, deterministic algorithms on."""
    from torch.utils.data import default_collate

    folder = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    context = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    flagged = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        states = {}
        for run, stops in (("straight", [None]), ("resumed", [steps // 2, None])):
            for stop in stops:
                synthetic, model, _ = new_model(name, size=size, device=torch.device("cpu"), checkpointing=False,
                                                seed=2)
                config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-4, seed=0,
                                     checkpoint_every=max(1, steps // 2), warmup_steps=1)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    train(model=model, loss_fn=lambda m, b, g, s=synthetic: (s.loss(m, b, g), {}),
                          dataset=_Samples(synthetic, 4 * batch_size), collate_fn=default_collate, config=config,
                          model_config={"kind": name}, out_checkpoint=folder / run / "m.pt",
                          out_metrics=folder / run / "m.tsv", out_curve=folder / run / "m.png", title=run,
                          context=context, stop_after=stop)
                flagged += [str(w.message).split(".")[0] for w in caught if "deterministic" in str(w.message)]
            states[run] = load_checkpoint(folder / run / "m.pt")["model"]
        assert not resume_path(folder / "resumed" / "m.pt").exists()
        identical = all(torch.equal(states["straight"][k], states["resumed"][k]) for k in states["straight"])
        largest = max(float((states["straight"][k].float() - states["resumed"][k].float()).abs().max())
                      for k in states["straight"])
    finally:
        torch.use_deterministic_algorithms(previous)
    return {"steps": steps, "stopped_after": steps // 2, "batch_size": batch_size, "bit_identical": identical,
            "max_abs_difference": largest, "nondeterministic_ops": sorted(set(flagged))}


def report(name: str, result: dict) -> None:
    t = result["throughput"]
    print(f"\n{name}: batch {t['batch_size']} per GPU, activation checkpointing "
          f"{'on' if t['activation_checkpointing'] else 'off'}{', compiled' if t['compiled'] else ''}")
    print(f"  step {t['step_s'] * 1e3:.1f} ms, {t['samples_per_s']:.1f} samples/s, {t['tokens_per_s']:,.0f} tokens/s, "
          f"{t['tflop_per_sample']:.3f} TFLOP/sample -> {t['achieved_tflops']:.2f} TFLOP/s")
    if "mfu" in t:
        predicted = f" (memory table predicts {t['predicted_memory_gib']:.1f})" if "predicted_memory_gib" in t else ""
        print(f"  MFU {100 * t['mfu']:.1f} % of {H100_BF16_DENSE_PEAK / 1e12:.1f} TFLOP/s bf16 dense; peak memory "
              f"{t['peak_memory_gib']:.1f} GiB{predicted}")
    else:
        print("  MFU: not reported on CPU")
    print(f"  attention backend: {t['backend']}")
    if "precision" in result:
        p = result["precision"]
        pairs = ", ".join(f"{i + 1}: {a:.4f}/{b:.4f}" for i, (a, b) in enumerate(zip(p["loss_bf16"], p["loss_fp32"])))
        print(f"  loss bf16/fp32 by step (batch {p['batch_size']}): {pairs}")
        print(f"  largest relative difference over {p['steps']} steps: {100 * p['max_relative_difference']:.2f} %")
    if "resume" in result:
        r = result["resume"]
        print(f"  stop after {r['stopped_after']} of {r['steps']} steps and resume, deterministic algorithms on: "
              f"{'bit-identical' if r['bit_identical'] else 'NOT bit-identical'} (max |difference| "
              f"{r['max_abs_difference']:.3g}); nondeterministic operators met: "
              f"{', '.join(r['nondeterministic_ops']) or 'none'}")
    for skipped in result.get("skipped", []):
        print(f"  skipped: {skipped}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs (the default without CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny configs on small shapes (2 patches, 48^3 T1)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--compare-steps", type=int, default=20, help="steps of the bf16/fp32 comparison")
    parser.add_argument("--resume-steps", type=int, default=6, help="steps of the stop-and-resume check")
    parser.add_argument("--small-batch", type=int, default=2, help="batch of the comparison and resume checks")
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's default batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for the throughput part")
    parser.add_argument("--budget-s", type=float, default=280.0, help="skip remaining checks past this time")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = "tiny" if args.tiny or args.quick or device.type == "cpu" else "base"
    SHAPES.clear()
    if args.quick:
        SHAPES.update(n_patches=2, img_size=(48, 48, 48))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        name = "CPU"
    print(f"{name}, torch {torch.__version__}, {size} models; bf16 autocast {'on' if device.type == 'cuda' else 'off'}"
          f" for the throughput part")
    results = {}
    for model_name in args.models:
        default_batch, checkpointing = schema_defaults(model_name)
        batch = args.batch_size or (default_batch if size == "base" else args.small_batch)
        result = {"throughput": throughput(model_name, size=size, device=device, batch_size=batch,
                                           checkpointing=checkpointing, steps=args.steps,
                                           compile_model=args.compile)}
        result["skipped"] = []
        for key, check in (("precision", lambda: bf16_against_fp32(model_name, size=size, device=device,
                                                                    batch_size=args.small_batch,
                                                                    steps=args.compare_steps)),
                           ("resume", lambda: stop_and_resume(model_name, size=size, device=device,
                                                              batch_size=args.small_batch,
                                                              steps=args.resume_steps))):
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append(f"{key} check: past the {args.budget_s:.0f} s budget")
                continue
            result[key] = check()
        results[model_name] = result
        report(model_name, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    total = time.perf_counter() - started
    print(f"\ntotal {total:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "size": size, "seconds": total, "models": results},
                                       indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
