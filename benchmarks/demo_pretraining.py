"""The demo's pretraining chain on a copy of a finished demo run's store: does each loss still fall by 30 %?

Runs, with the demo's ``config.yaml`` settings (steps, batch sizes, learning rates,
masking, Harmonizer options), the step functions the workflow runs after packing:
the functional gradients (training split), ``pretrain_fmri``, ``pretrain_t1``,
``cache_latents`` per pretraining dataset and ``pretrain_harmonizer``; prints each
model's loss drop (mean of the first vs last 3 steps), and the Harmonizer's with
the padded-token loss option flipped, for comparison.

Usage::

    python benchmarks/demo_pretraining.py --results RESULTS --work WORK [--networks 7]

``RESULTS`` is a finished demo run's results folder (store, derivatives); nothing is
written there. ``--networks`` is the order that run's series were extracted in.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from bh_models.core.config import check_config
from bh_models.geometry.gradients import compute_gradients
from bh_models.models import embeddings, pretrain

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--networks", type=int, default=7)
    parser.add_argument("--only", choices=["fmri", "t1", "harmonizer"], nargs="*")
    args = parser.parse_args()
    config = check_config(yaml.safe_load((REPO / "config.yaml").read_text()))
    settings = config["pretrain"]
    pretraining = [name for name, entry in config["datasets"].items() if entry["role"] in ("pretrain", "both")]
    store = args.work / "store"
    if not store.exists():
        shutil.copytree(args.results / "store", store)
    tag = f"seg-{args.networks}n"
    geometry = next((args.results / "derivatives" / "bh-geometry").glob(f"*{tag}*_desc-LBO_embedding.tsv"))
    series = sorted(p for d in pretraining for p in (args.results / "derivatives" / "bh-preproc" / d).glob(
        f"sub-*/func/*{tag}*_timeseries.tsv"))
    gradients = args.work / "gradients.tsv"
    started = time.perf_counter()
    if not gradients.exists():
        compute_gradients(splits=[store / "splits" / f"{d}_splits.tsv" for d in pretraining], timeseries=series,
                          out_gradients=gradients, out_figure=args.work / "gradients.png", networks=args.networks,
                          **config["geometry"]["gradients"])
    print(f"gradients: {time.perf_counter() - started:.0f} s")
    fmri = [store / "fmri" / d for d in pretraining]
    t1 = [store / "t1" / d for d in pretraining]
    out = {name: {kind: args.work / name / f"{kind}{suffix}" for kind, suffix in
                  (("out_checkpoint", ".pt"), ("out_metrics", ".tsv"), ("out_curve", ".png"))}
           for name in ("fmri", "t1", "harmonizer", "harmonizer_real")}
    common = dict(model_size=settings["model_size"], seed=config["seed"], threads=2)
    runs = args.only or ["fmri", "t1", "harmonizer"]
    if "fmri" in runs:
        started = time.perf_counter()
        pretrain.pretrain_fmri(fmri=fmri, scaling=store / "scaling.json", geometry=geometry, gradients=gradients,
                               **out["fmri"], **common, model_overrides={"masking": settings["fmri_masking"]},
                               **settings["fmri"])
        print(f"harmonix-F: {time.perf_counter() - started:.0f} s")
    if "t1" in runs:
        started = time.perf_counter()
        pretrain.pretrain_t1(t1=t1, **out["t1"], **common, **settings["t1"])
        print(f"harmonix-S: {time.perf_counter() - started:.0f} s")
    if "harmonizer" in runs:
        encoders = {"fmri_checkpoint": out["fmri"]["out_checkpoint"], "t1_checkpoint": out["t1"]["out_checkpoint"]}
        started = time.perf_counter()
        latents = []
        for dataset in pretraining:
            latents.append(args.work / "latents" / dataset)
            embeddings.cache_latents(**encoders, geometry=geometry, gradients=gradients, fmri=[store / "fmri" / dataset],
                                     t1=[store / "t1" / dataset], scaling=store / "scaling.json",
                                     out_latents=latents[-1], dataset=dataset, threads=2)
        print(f"cache_latents: {time.perf_counter() - started:.0f} s")
        options = dict(include_unpaired=settings["harmonizer_subjects"] == "all",
                       loss_on_padded=settings["harmonizer_loss_tokens"] == "all")
        for name, padded in (("harmonizer", options["loss_on_padded"]),
                             ("harmonizer_real", not options["loss_on_padded"])):
            started = time.perf_counter()
            pretrain.pretrain_harmonizer(latents=latents, **encoders, **out[name], **common,
                                         include_unpaired=options["include_unpaired"], loss_on_padded=padded,
                                         **settings["harmonizer"])
            print(f"{name} (loss_on_padded={padded}): {time.perf_counter() - started:.0f} s")
    for name, files in out.items():
        if not files["out_metrics"].exists():
            continue
        metrics = pd.read_csv(files["out_metrics"], sep="\t")
        drop = pretrain.loss_drop(metrics["loss"])
        extra = "".join(f", {c} {metrics[c].iloc[:3].mean():.3f} -> {metrics[c].iloc[-3:].mean():.3f}"
                        for c in ("loss_f", "loss_s") if c in metrics)
        print(f"{name}: loss {metrics['loss'].iloc[:3].mean():.4f} -> {metrics['loss'].iloc[-3:].mean():.4f} "
              f"({100 * drop:.1f} % lower) in {len(metrics)} steps{extra}")


if __name__ == "__main__":
    main()
