"""The demo's pretraining chain on a copy of a finished demo run's store: does each loss still fall by 30 %?

Runs, with the demo's ``config.yaml`` settings (steps, batch sizes, learning rates,
masking, Harmonizer options), the step functions the workflow runs after packing:
the functional gradients (training split), ``pretrain_fmri``, ``pretrain_t1``,
``cache_latents`` per pretraining dataset and ``pretrain_harmonizer``; prints each
model's loss drop (mean of the first vs last 3 steps), and the Harmonizer's with
the padded-token loss option flipped, for comparison.

With ``--probe PARTICIPANTS_ROOT`` (a ``bh demo`` folder), the new models become a bundle, the
downstream datasets are encoded and probed as the workflow does (``evaluate_dataset`` with
the config's folds, repeats and permutations), and the results table is printed.

Usage::

    python benchmarks/demo_pretraining.py --results RESULTS --work WORK [--networks 7] [--probe DEMO_DATA]

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
    parser.add_argument("--only", choices=["fmri", "t1", "harmonizer", "none"], nargs="*")
    parser.add_argument("--probe", type=Path, help="demo data folder (participants.tsv of the downstream sites)")
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
    runs = ["fmri", "t1", "harmonizer"] if args.only is None else args.only
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
        _report(name, files)
    if args.probe:
        probe(args=args, config=config, out=out, geometry=geometry, gradients=gradients, pretraining=pretraining)


def probe(*, args, config: dict, out: dict, geometry: Path, gradients: Path, pretraining: list[str]) -> None:
    """Bundle the new models, encode the downstream datasets, probe them as the workflow does."""
    from bh_models.evaluation.evaluate import evaluate_dataset
    from bh_models.models.bundle import CHECKPOINTS, make_bundle
    from bh_models.models.embeddings import extract_embeddings

    bundle = args.work / "bundle"
    for kind, name in zip(CHECKPOINTS, ("fmri", "t1", "harmonizer")):
        target = bundle / CHECKPOINTS[kind]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out[name]["out_checkpoint"], target)
        shutil.copy(out[name]["out_checkpoint"].with_suffix(".json"), target.with_suffix(".json"))
    store = args.work / "store"
    make_bundle(fmri_checkpoint=bundle / CHECKPOINTS["harmonix_f"], t1_checkpoint=bundle / CHECKPOINTS["harmonix_s"],
                harmonizer_checkpoint=bundle / CHECKPOINTS["harmonizer"], scaling=store / "scaling.json",
                scaling_table=store / "scaling.tsv", geometry=geometry, gradients=gradients,
                splits=[store / "splits" / f"{d}_splits.tsv" for d in pretraining],
                samples=[store / "samples" / f"{d}_samples.tsv" for d in pretraining], out_bundle=bundle / "bundle.json",
                out_scaling=bundle / "scaling.json", out_scaling_table=bundle / "scaling.tsv",
                out_geometry=bundle / "geometry_embedding.tsv", out_gradients=bundle / "gradient_embedding.tsv",
                out_card=bundle / "MODEL_CARD.md", out_manifest=bundle / "SHA256SUMS", settings={}, seed=config["seed"])
    tag = f"seg-{args.networks}n"
    for dataset, entry in config["datasets"].items():
        if entry["role"] not in ("downstream", "both"):
            continue
        derivatives = args.results / "derivatives" / "bh-preproc" / dataset
        embeddings_out = {key: args.work / "embeddings" / f"{dataset}_{key}.tsv" for key in ("hub", "fmri", "t1")}
        started = time.perf_counter()
        extract_embeddings(bundle=bundle / "bundle.json", samples=store / "samples" / f"{dataset}_samples.tsv",
                           timeseries=sorted(derivatives.glob(f"sub-*/func/*{tag}*_timeseries.tsv")),
                           t1_tensors=sorted(derivatives.glob("sub-*/anat/*_desc-encoder_T1w.npy")),
                           out_embeddings=embeddings_out["hub"], out_fmri_embeddings=embeddings_out["fmri"],
                           out_t1_embeddings=embeddings_out["t1"], dataset=dataset, threads=2)
        print(f"extract_embeddings {dataset}: {time.perf_counter() - started:.0f} s")
        results = args.work / "evaluation" / f"{dataset}_results.tsv"
        evaluate_dataset(fused=embeddings_out["hub"], fmri_only=embeddings_out["fmri"], t1_only=embeddings_out["t1"],
                         timeseries=sorted(derivatives.glob(f"sub-*/func/*{tag}*_timeseries.tsv")),
                         participants=args.probe / dataset / "participants.tsv", out_results=results,
                         out_predictions=results.with_name(f"{dataset}_predictions.tsv"),
                         out_figure_metrics=results.with_name(f"{dataset}_metrics.png"),
                         out_figure_roc=results.with_name(f"{dataset}_roc.png"),
                         out_figure_scatter=results.with_name(f"{dataset}_scatter.png"), dataset=dataset,
                         tasks=entry["targets"], n_folds=config["evaluate"]["n_folds"],
                         n_repeats=config["evaluate"]["n_repeats"],
                         n_permutations=config["evaluate"]["n_permutations"], seed=config["seed"], threads=2)
        table = pd.read_csv(results, sep="\t")
        columns = ["task", "model", "balanced_accuracy_mean", "auroc_mean", "pearson_r_mean", "permutation_p"]
        print(table[columns].to_string(index=False))


def _report(name: str, files: dict) -> None:
    metrics = pd.read_csv(files["out_metrics"], sep="\t")
    drop = pretrain.loss_drop(metrics["loss"])
    extra = "".join(f", {c} {metrics[c].iloc[:3].mean():.3f} -> {metrics[c].iloc[-3:].mean():.3f}"
                    for c in ("loss_f", "loss_s") if c in metrics)
    print(f"{name}: loss {metrics['loss'].iloc[:3].mean():.4f} -> {metrics['loss'].iloc[-3:].mean():.4f} "
          f"({100 * drop:.1f} % lower) in {len(metrics)} steps{extra}")


if __name__ == "__main__":
    main()
