"""The effective training settings of each pretraining job under a config, with their cost and memory fit.

``bh check-config`` prints this: per model, the values the step functions will
receive (schema defaults filled in), the derived ones (global batch, peak
learning rate, warm-up steps), the training FLOPs per sample and the run time
they imply at 40 % MFU on H100s (:mod:`bh_models.models.flops`), and the
predicted GPU memory of the configured per-GPU batch against
``pretrain.gpu_memory_gb`` (:mod:`bh_models.models.memory`), with a warning when
it does not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bh_models.models.flops import H100_BF16_DENSE_PEAK, sample_cost
from bh_models.models.memory import fit_report, load_memory_table, model_tokens
from bh_models.models.nn.configs import model_config
from bh_models.models.train import TrainConfig

#: config.pretrain section -> model name.
PRETRAIN_MODELS = {"fmri": "harmonix_f", "t1": "harmonix_s", "harmonizer": "harmonizer"}
PLAN_MFU = 0.4


def _train_config(settings: Mapping[str, Any], seed: int) -> TrainConfig:
    return TrainConfig(seed=seed, **{key: value for key, value in settings.items()})


def _model_configs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Model configs of the three models under ``config`` (sizes, atlas, patches, T1 grid, hub tokens)."""
    pretrain = config["pretrain"]
    size = pretrain["model_size"]
    grid = tuple(-(-side // 16) * 16 for side in config["anat"]["tensor_grid"])
    n_rois = config["atlas"]["parcels"]
    f = model_config(model="harmonix_f", size=size, overrides={"n_rois": n_rois})
    s = model_config(model="harmonix_s", size=size, overrides={"img_size": grid})
    hub = {"n_hub": pretrain["hub_tokens"]} if pretrain["hub_tokens"] else {}
    h = model_config(model="harmonizer", size=size, overrides={
        "dim_s": s.embed_dim, "dim_f": f.embed_dim, "s_grid": s.grid, "n_rois": n_rois, **hub})
    return {"harmonix_f": f, "harmonix_s": s, "harmonizer": h}


def training_plan(config: Mapping[str, Any]) -> dict[str, Any]:
    """Effective settings, cost and memory fit of each pretraining job.

    Parameters
    ----------
    config : mapping
        A validated config (:func:`bh_models.core.config.load_config`).

    Returns
    -------
    dict
        ``models``: one dict per model (section, model, settings, derived values, FLOPs,
        hours at 40 % MFU, memory); ``warnings``: list of str; ``gpus``, ``gpu_memory_gb``.
    """
    pretrain = config["pretrain"]
    world = max(1, pretrain["gpus"])
    max_patches = config["augment"]["max_patches"]
    configs = _model_configs(config)
    tokens = {name: model_tokens(model=name, n_rois=config["atlas"]["parcels"], max_patches=max_patches,
                                 t1_grid=configs["harmonix_s"].img_size) for name in configs}
    memory_checked = pretrain["model_size"] == "base" and pretrain["gpus"] > 0
    fits = {}
    if memory_checked:
        rows = fit_report(training={PRETRAIN_MODELS[section]: pretrain[section] for section in PRETRAIN_MODELS},
                          gpu_memory_gb=pretrain["gpu_memory_gb"], tokens=tokens, table=load_memory_table())
        fits = {row["model"]: row for row in rows}
    models, warnings = [], []
    for section, name in PRETRAIN_MODELS.items():
        settings = dict(pretrain[section])
        train = _train_config(settings, seed=config["seed"])
        cost = sample_cost(model=name, config=configs[name], n_patches=max_patches)
        global_batch = train.global_batch(world)
        hours = train.steps * global_batch * cost.flops / (world * PLAN_MFU * H100_BF16_DENSE_PEAK) / 3600
        entry = {
            "section": section, "model": name, "settings": settings, "gpus": world, "global_batch": global_batch,
            "peak_lr": train.peak_lr(world), "warmup": train.warmup, "tokens": tokens[name],
            "flops_per_sample": cost.flops, "hours_at_40_mfu": hours, "memory": fits.get(name),
        }
        models.append(entry)
        fit = fits.get(name)
        if fit is not None and not fit["fits"]:
            problem = (f"pretrain.{section}.batch_size {fit['batch_size']} will not fit a "
                       f"{pretrain['gpu_memory_gb']:g} GB GPU: predicted {fit['predicted_gb']:.1f} GiB > "
                       f"{fit['usable_gb']:.1f} GiB usable")
            if fit["checkpointing"]:
                fix = f"set batch_size <= {fit['max_batch']} and raise grad_accum to keep the global batch"
            else:
                fix = (f"set batch_size <= {fit['max_batch']} and raise grad_accum to keep the global batch, or set "
                       f"pretrain.{section}.activation_checkpointing: true (fits batch <= {fit['max_batch_other']})")
            warnings.append(f"{problem}. Fix: {fix}")
    return {"models": models, "warnings": warnings, "gpus": world, "cpu": pretrain["gpus"] == 0,
            "gpu_memory_gb": pretrain["gpu_memory_gb"], "memory_checked": memory_checked}


def format_plan(plan: Mapping[str, Any]) -> list[str]:
    """Lines of ``bh check-config``'s training section."""
    lines = []
    for entry in plan["models"]:
        s = entry["settings"]
        scaling = (f"peak lr {entry['peak_lr']:.3g} = {s['lr']:g} x {entry['global_batch']} / 256"
                   if s["lr_scaling"] == "linear" else f"peak lr {entry['peak_lr']:.3g} (lr_scaling none)")
        where = "1 CPU process" if plan["cpu"] else f"{entry['gpus']} GPU(s)"
        lines.append(f"  {entry['section']} ({entry['model']}): {s['steps']} steps, batch {s['batch_size']} per "
                     f"process x {s['grad_accum']} accumulation x {where} = {entry['global_batch']} per step; "
                     f"{scaling}, warm-up {entry['warmup']} steps, min lr {s['min_lr']:g}, weight decay "
                     f"{s['weight_decay']:g}, clip {s['grad_clip']:g}")
        lines.append(f"      activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, compile "
                     f"{'on' if s['compile'] else 'off'}; loader: {s['num_workers']} workers, pin_memory "
                     f"{str(s['pin_memory']).lower()}, prefetch {s['prefetch_factor']}; checkpoint every "
                     f"{s['checkpoint_every']} steps")
        cost = f"      {entry['tokens']} tokens, {entry['flops_per_sample'] / 1e9:,.0f} GFLOP per sample (forward + backward)"
        if not plan["cpu"]:
            cost += f"; {entry['hours_at_40_mfu']:,.1f} h on {entry['gpus']} H100(s) at 40 % MFU"
        lines.append(cost)
        fit = entry["memory"]
        if fit is not None:
            lines.append(f"      GPU memory: {fit['predicted_gb']:.1f} GiB predicted of {fit['usable_gb']:.1f} GiB usable "
                         f"on {plan['gpu_memory_gb']:g} GB ({'fits' if fit['fits'] else 'DOES NOT FIT'}); largest "
                         f"batch {fit['max_batch']} with checkpointing {'on' if fit['checkpointing'] else 'off'}, "
                         f"{fit['max_batch_other']} with it {'off' if fit['checkpointing'] else 'on'}")
    if not plan["memory_checked"]:
        lines.append("  GPU memory: not checked (the measured table covers the base models on GPUs; "
                     "this config trains tiny models or on CPU)")
    return lines
