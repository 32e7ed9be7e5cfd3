# Config validation, the cohort plan, path helpers, wildcard constraints and input
# functions. Rules only look names up here; all logic lives in bh_models.
import re
import sys
from pathlib import Path

from snakemake.utils import validate

from bh_models.models.bundle import CHECKPOINTS, bundle_paths, check_settings, read_bundle, settings_from_config
from bh_models.bids.cohort import plan_cohort
from bh_models.core.config import check_config, downstream_datasets, load_yaml, pretraining_datasets
from bh_models.core.errors import BHConfigError, BHInputError

try:
    for _configfile in [*workflow.configfiles, *workflow.overwrite_configfiles]:
        load_yaml(_configfile)  # refuses duplicate keys, which YAML would merge silently
    check_config(config)  # words every problem as "config key X: problem. Fix: ..."
except (BHConfigError, BHInputError) as _exc:
    sys.exit(f"error: {_exc}")
validate(config, "../workflow/schemas/config.schema.yaml")
if config["example_only"]:
    sys.exit("error: config key 'example_only': this is a documented example whose bids_root paths are "
             "placeholders. Fix: copy it, point every bids_root at a real BIDS dataset and remove example_only")

RESULTS = config["results_dir"]
PREPROC = f"{RESULTS}/derivatives/bh-preproc"
GEOMETRY = f"{RESULTS}/derivatives/bh-geometry"
STORE = f"{RESULTS}/store"
MODELS = f"{RESULTS}/models"
EMBEDDINGS = f"{RESULTS}/embeddings"
EVAL = f"{RESULTS}/evaluation"
QC = f"{RESULTS}/qc"
BATCHES = f"{RESULTS}/batches"
STEP = "../workflow/scripts/step.py"
ENV = "../envs/bh.yaml"
SEED = config["seed"]

# Named pieces of BIDS-derivatives file names.
SPACE = config["template"]["name"]
RES = config["template"]["resolution"]
NETWORKS = config["atlas"]["networks"]
ATLAS = f"atlas-{config['atlas']['name']}_seg-{{networks}}n_scale-{config['atlas']['parcels']}"
SURFACE = "tpl-fsLR_den-32k"
# The 400 x M eigenmode matrix and the 400 x G functional gradients, in the configured network
# order (harmonix-F's positional tables).
GEOMETRY_MATRIX = f"{GEOMETRY}/{SURFACE}_{ATLAS.format(networks=NETWORKS)}_desc-LBO_embedding.tsv"
GRADIENTS_MATRIX = f"{GEOMETRY}/{ATLAS.format(networks=NETWORKS)}_desc-gradients_embedding.tsv"

try:
    COHORT = plan_cohort(config)
except (BHConfigError, BHInputError) as _exc:
    sys.exit(f"error: {_exc}")
DATASETS = list(COHORT)
# Subject batches: one anatomical and one functional job per non-empty bucket of a
# dataset (bh_models.core.batches); units and batches are computed once per parse.
BUCKETS = config["batches"]["buckets"]
UNITS = {d: {"anat": COHORT[d].anat_units(), "func": COHORT[d].func_units()} for d in DATASETS}
BATCH_PLAN = {d: COHORT[d].batches(BUCKETS) for d in DATASETS}
# Roles: pretraining datasets feed the store and the three pretraining jobs;
# downstream datasets are encoded by the frozen models of the bundle and evaluated.
PRETRAIN = pretraining_datasets(config)
DOWNSTREAM = downstream_datasets(config)
# Downstream datasets with a task that can run (participants.tsv and its columns exist);
# the others are still preprocessed and encoded, and their problems are listed.
EVALUATED = [d for d in DOWNSTREAM if COHORT[d].tasks]
if workflow.is_main_process:  # problems are said before any job, with where to read them
    for _name in DATASETS:
        _kinds = COHORT[_name].problems["kind"].value_counts()
        if _kinds.get("problem", 0) or _kinds.get("note", 0):
            print(f"note: {_name}: {_kinds.get('problem', 0)} problem(s) left out before any job, "
                  f"{_kinds.get('note', 0)} choice(s) noted; see {RESULTS}/index/{_name}_problems.tsv "
                  f"(or `bh index {COHORT[_name].bids_root}`)", file=sys.stderr)
# The model bundle: this run's (written to MODELS by make_bundle) or an existing one.
EXTERNAL_BUNDLE = config["model"]["bundle"]
BUNDLE = EXTERNAL_BUNDLE or MODELS
BUNDLE_SETTINGS = settings_from_config(config)
if EXTERNAL_BUNDLE:
    try:  # a bundle trained on other inputs is refused before any job runs
        check_settings(bundle=read_bundle(EXTERNAL_BUNDLE), expected=BUNDLE_SETTINGS, bundle_path=EXTERNAL_BUNDLE)
    except (BHConfigError, BHInputError) as _exc:
        sys.exit(f"error: {_exc}")


wildcard_constraints:
    # The configured names only, so that evaluation/pooled_* never reads as a dataset.
    dataset="|".join(re.escape(name) for name in DATASETS) or "[A-Za-z0-9_-]+",
    batch="[0-9]+",


def log_path(rule_name, *parts):
    """One log file per job: results/logs/<rule>/<wildcards>.log."""
    return f"{RESULTS}/logs/{rule_name}/" + "_".join(parts) + ".log"


def anat_path(dataset, name):
    """Template of a per-unit anat derivative (BIDS-derivatives name); the batch runner fills
    {folder} (sub-<label>[/ses-<label>]) and {prefix} (the unit's entities)."""
    return f"{PREPROC}/{dataset}/{{folder}}/anat/{{prefix}}_{name}"


def func_path(dataset, name):
    """Template of a per-run func derivative; {prefix} is the run's BOLD stem."""
    return f"{PREPROC}/{dataset}/{{folder}}/func/{{prefix}}_{name}"


def figure_path(dataset, name):
    """Template of a per-unit QC figure (fMRIPrep-style sub-<label>/figures/ folder)."""
    return f"{PREPROC}/{dataset}/sub-{{subject}}/figures/{{prefix}}_{name}"


def anat_outputs(dataset):
    """The anatomical unit step's outputs (preprocess_anat's out_* names), as templates."""
    return {
        "out_t1w": anat_path(dataset, "desc-preproc_T1w.nii.gz"),
        "dep_sidecar": anat_path(dataset, "desc-preproc_T1w.json"),
        "out_mask": anat_path(dataset, "desc-brain_mask.nii.gz"),
        "out_mni_t1w": anat_path(dataset, f"space-{SPACE}_res-{RES}_desc-preproc_T1w.nii.gz"),
        "out_mni_mask": anat_path(dataset, f"space-{SPACE}_res-{RES}_desc-brain_mask.nii.gz"),
        "out_forward": anat_path(dataset, f"from-T1w_to-{SPACE}_mode-image_xfm.h5"),
        "out_inverse": anat_path(dataset, f"from-{SPACE}_to-T1w_mode-image_xfm.h5"),
        "out_tensor": anat_path(dataset, f"space-{SPACE}_res-{RES}_desc-encoder_T1w.npy"),
        "out_gm_probseg": anat_path(dataset, f"space-{SPACE}_res-{RES}_label-GM_probseg.nii.gz"),
        "out_wm_probseg": anat_path(dataset, f"space-{SPACE}_res-{RES}_label-WM_probseg.nii.gz"),
        "out_csf_probseg": anat_path(dataset, f"space-{SPACE}_res-{RES}_label-CSF_probseg.nii.gz"),
        "out_dseg": anat_path(dataset, f"space-{SPACE}_res-{RES}_dseg.nii.gz"),
        "dep_dseg_sidecar": anat_path(dataset, f"space-{SPACE}_res-{RES}_dseg.json"),
        "out_qc_mask": figure_path(dataset, "desc-brainmask_T1w.png"),
        "out_qc_registration": figure_path(dataset, f"space-{SPACE}_desc-registration_T1w.png"),
        "out_qc_segmentation": figure_path(dataset, f"space-{SPACE}_desc-segmentation_T1w.png"),
    }


def func_outputs(dataset):
    """The functional unit step's outputs (preprocess_bold's out_* names), as templates."""
    series = f"space-{SPACE}_{ATLAS.format(networks=NETWORKS)}_timeseries"
    return {
        "out_timeseries": func_path(dataset, f"{series}.tsv"),
        "dep_sidecar": func_path(dataset, f"{series}.json"),
        "out_confounds": func_path(dataset, "desc-confounds_timeseries.tsv"),
        "dep_confounds_sidecar": func_path(dataset, "desc-confounds_timeseries.json"),
        "out_carpet": figure_path(dataset, "desc-carpet_bold.png"),
        "out_rois": figure_path(dataset, "desc-rois_bold.png"),
    }


# The functional step's anatomical inputs: its parameter name -> the anat output it reads.
FUNC_NEEDS = {"t1w": "out_t1w", "t1w_mask": "out_mask", "t1w_to_mni": "out_forward", "mni_mask": "out_mni_mask",
              "mni_t1w": "out_mni_t1w", "gm_probseg": "out_gm_probseg", "wm_probseg": "out_wm_probseg",
              "csf_probseg": "out_csf_probseg"}


_BATCH_UNITS = {}


def batch_units(wildcards, kind):
    """The units of one batch job (bh_models.core.batches.run_units); a BOLD run's unit also names
    the anatomical files it reads, from its anatomical unit's output templates. Built once per batch."""
    key = (wildcards.dataset, wildcards.batch, kind)
    if key not in _BATCH_UNITS:
        units = UNITS[wildcards.dataset][kind]
        keys = BATCH_PLAN[wildcards.dataset][wildcards.batch][kind]
        if kind == "anat":
            _BATCH_UNITS[key] = [units[k] for k in keys]
        else:
            anat_units, templates = UNITS[wildcards.dataset]["anat"], anat_outputs(wildcards.dataset)
            out = []
            for k in keys:
                needed = anat_units[units[k]["needs"]]
                fields = {"subject": needed["subject"], "folder": needed["folder"], "prefix": needed["prefix"]}
                anat = {name: templates[output].format(**fields) for name, output in FUNC_NEEDS.items()}
                out.append({**units[k], "inputs": {**units[k]["inputs"], **anat}})
            _BATCH_UNITS[key] = out
    return _BATCH_UNITS[key]


def batch_raw_signature(wildcards, kind):
    """sha256 of the path, size and modification time of every raw file of a batch.

    A param, not 70 declared inputs per batch: Snakemake's per-file work on 140,000 raw
    inputs was half of the planning time at UK Biobank scale. A raw file that changes
    (or appears, or vanishes) changes the param, and Snakemake reruns the batch; the
    units whose input sha256 is unchanged are skipped inside it.
    """
    from bh_models.core.batches import raw_signature

    files = []
    for unit in batch_units(wildcards, kind):
        value = unit["inputs"]["t1w" if kind == "anat" else "bold"]
        files += value if isinstance(value, list) else [value]
    return raw_signature(files)


def batch_labels(dataset, kind):
    """Labels of the dataset's batches with units of this kind."""
    return [label for label, units in BATCH_PLAN[dataset].items() if units[kind]]


def batch_threads(wildcards, kind):
    """Units run at once in a batch job: batches.workers, never more than the batch has units."""
    return max(1, min(config["batches"]["workers"], len(BATCH_PLAN[wildcards.dataset][wildcards.batch][kind])))


def caption(name):
    return f"../workflow/report/{name}.rst"


def dataset_entry(wildcards):
    return config["datasets"][wildcards.dataset]


def bids_file(wildcards, name):
    return str(COHORT[wildcards.dataset].bids_root / name)


def participants_tsv(wildcards):
    """``{"participants": path}`` when the dataset has a participants.tsv (for ``unpack``)."""
    path = COHORT[wildcards.dataset].bids_root / "participants.tsv"
    return {"participants": str(path)} if path.is_file() else {}


# The batch jobs' declared outputs (rules anat_preprocess and func_preprocess).
MANIFEST = {kind: f"{BATCHES}/{{dataset}}/batch-{{batch}}_desc-{kind}_manifest.tsv" for kind in ("anat", "func")}
BATCH_QC = {kind: f"{QC}/batches/{{dataset}}/batch-{{batch}}_desc-{kind}_qc.html" for kind in ("anat", "func")}


def anat_manifests(dataset):
    """The manifests of a dataset's anatomical batches (consumers take them as listed_* inputs)."""
    return expand(MANIFEST["anat"], dataset=dataset, batch=batch_labels(dataset, "anat"))


def func_manifests(dataset):
    """The manifests of a dataset's functional batches."""
    return expand(MANIFEST["func"], dataset=dataset, batch=batch_labels(dataset, "func"))


def outdate_stale_batches():
    """Rerun the batches whose manifest lists a per-unit file that is gone (e.g. a deleted time series).

    Snakemake cannot see those files (a batch declares only its manifest), so the planning
    process dates such a manifest back to 1970 (bh_models.core.batches.outdate): its raw
    inputs are then newer, Snakemake reruns the batch, which redoes only the missing units,
    and everything downstream of the manifest follows. Jobs that re-parse the workflow
    (cluster jobs) skip this: the planning process decided.
    """
    from bh_models.core.batches import outdate, stale_manifests

    if not workflow.is_main_process:
        return
    stale = stale_manifests(manifests=[m for d in DATASETS for m in anat_manifests(d) + func_manifests(d)])
    for manifest in stale:
        outdate(manifest)
    if stale:
        print(f"note: {len(stale)} batch(es) list per-subject files that are gone and will run again: "
              + ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""), file=sys.stderr)


outdate_stale_batches()


def training(model):
    """Keyword arguments of one model's pretraining job, from config.pretrain."""
    settings = config["pretrain"]
    overrides, options = {}, {}
    if model == "fmri":
        overrides["masking"] = settings["fmri_masking"]
    if model == "harmonizer":
        if settings["hub_tokens"]:
            overrides["n_hub"] = settings["hub_tokens"]
        options = dict(include_unpaired=settings["harmonizer_subjects"] == "all",
                       loss_on_padded=settings["harmonizer_loss_tokens"] == "all")
    return dict(model_size=settings["model_size"], seed=SEED, model_overrides=overrides, **options,
                **settings[model])


def gpus():
    return config["pretrain"]["gpus"]


# Fine-tuning (evaluate.finetune): the evaluation stage's folds, the models stage's scores.
FINETUNE = config["evaluate"]["finetune"]["enabled"]
FINETUNE_DIR = f"{RESULTS}/finetune"
FINETUNE_FOLDS = f"{EVAL}/{{dataset}}_desc-finetune_folds.tsv"
FINETUNE_FOLDS_POOLED = f"{EVAL}/pooled_desc-finetune_folds.tsv"
HARMONIZER_CHECKPOINT = f"{BUNDLE}/{CHECKPOINTS['harmonizer']}"


def finetune_recipe():
    """The fine-tuning job's recipe keywords (evaluate.finetune without ``enabled``)."""
    return {key: value for key, value in config["evaluate"]["finetune"].items() if key != "enabled"}


def finetune_resources(input, datasets, threads):
    """mem_mb and runtime of a fine-tuning job, from its latent stores' sizes and the model
    (bh_models.models.finetune.finetune_resources); before the stores exist (planning, dry
    runs) the sizes are unknown and the base-size defaults of the rule are used."""
    from bh_models.models.finetune import finetune_resources as estimate

    stores = [Path(p) for p in ([input.latents] if isinstance(input.latents, str) else input.latents)]
    if not all((store / "latents.json").is_file() for store in stores):
        return {"mem_mb": 32000, "runtime": 12 * 60}
    n_tasks = max(len(config["datasets"][d]["targets"]) for d in datasets)
    recipe = finetune_recipe()
    return estimate(latents=stores, harmonizer_checkpoint=Path(input.harmonizer_checkpoint),
                    batch_size=recipe["batch_size"], eval_batch_size=recipe["eval_batch_size"],
                    epochs=recipe["epochs"], gpu=gpus() > 0, threads=threads,
                    n_trainings=n_tasks * config["evaluate"]["n_repeats"] * config["evaluate"]["n_folds"])


def bundle_inputs():
    """The model bundle's files, named as the embedding steps take them (``bundle`` + ``dep_*``)."""
    return bundle_paths(BUNDLE)


def final_targets():
    """Every end product except the audit, which checks them all."""
    targets = [*rules.boilerplate.output, rules.exclusion_table.output.out_tsv]
    if not EXTERNAL_BUNDLE:
        targets += [rules.geometry_plot.output.out_figure, rules.geometry_description.output.out_description,
                    *rules.geometry_gradients.output,
                    *expand(rules.geometry_project.output, networks=[7, 17]), *rules.make_bundle.output]
    for dataset in DATASETS:
        targets += expand([*rules.index_dataset.output, rules.dataset_description.output.out_description,
                           rules.anat_qc_table.output.out_table, rules.func_qc_table.output.out_table],
                          dataset=dataset)
    for dataset in EVALUATED:
        targets += expand(rules.evaluate_dataset.output, dataset=dataset)
    for dataset in [d for d in DOWNSTREAM if d not in EVALUATED]:  # no task can run yet: encoded all the same
        targets += expand(rules.extract_embeddings.output, dataset=dataset)
    if pooled_evaluation():
        targets += [*rules.evaluate_pooled.output]
    return targets


def _pooled_evaluation():
    """Evaluate the downstream datasets together: asked for, two or more of them, and a task they share
    (configured identically in each; bh_models.evaluation.evaluate.pooled_tasks decides which)."""
    from bh_models.evaluation.targets import parse_tasks  # light: the evaluation stage's modules load torch

    if not config["evaluate"]["pooled"] or len(EVALUATED) < 2:
        return False
    tasks = {d: parse_tasks(tasks=COHORT[d].tasks, config_key=f"datasets.{d}.targets") for d in EVALUATED}
    first, *others = EVALUATED
    return any(all(spec in tasks[other] for other in others) for spec in tasks[first])


POOLED = _pooled_evaluation()


def pooled_evaluation():
    return POOLED


def all_targets():
    return final_targets() + [*rules.audit.output]


_RUN_SIZE = {}


def typical_run(dataset):
    """Voxels x volumes / 1e6 of the dataset's first BOLD run (one header read per dataset), or None."""
    from bh_models.core.costs import run_size

    if dataset not in _RUN_SIZE:
        first = next(iter(UNITS[dataset]["func"].values()), None)
        bold = first["inputs"]["bold"] if first else None
        _RUN_SIZE[dataset] = run_size(bold[0] if isinstance(bold, list) else bold)[0] if bold else None
    return _RUN_SIZE[dataset]


def batch_resource(wildcards, rule, key, threads, attempt):
    """mem_mb / runtime of a batch job from the measured per-unit costs (bh_models/core/costs.tsv,
    benchmarks/bench_costs.py) at this config's resolution and the dataset's run size, with
    headroom, times the attempt: a job that ran out of memory or time is retried with more."""
    from bh_models.core.costs import batch_resources

    kind = "anat" if rule.startswith("anat") else "func"
    units = len(BATCH_PLAN[wildcards.dataset][wildcards.batch][kind])
    size = typical_run(wildcards.dataset) if kind == "func" else None
    return batch_resources(rule=rule, units=units, workers=threads, attempt=attempt, config=config,
                           mvoxel_frames=size)[key]


def dataset_units(dataset, kind):
    """Units a dataset-level job handles: subjects, anatomical units, BOLD runs, or all units."""
    if kind == "subjects":
        return len(COHORT[dataset].index.subjects)
    if kind == "all":
        return len(UNITS[dataset]["anat"]) + len(UNITS[dataset]["func"])
    return len(UNITS[dataset][kind])


def job_resource(rule, key, attempt, units=0):
    """mem_mb / runtime of a one-process job: the measured per-job and per-unit costs of the rule
    (bh_models/core/costs.tsv) for ``units``, with headroom, times the attempt."""
    from bh_models.core.costs import job_resources

    return job_resources(rule=rule, units=units, attempt=attempt, config=config)[key]


def audit_files():
    """Files the audit checks, estimated from the units (per-unit outputs and sidecars, figures,
    records' inputs) plus the cohort-level files; its runtime grows with them."""
    return sum(14 * len(UNITS[d]["anat"]) + 6 * len(UNITS[d]["func"]) + 40 for d in DATASETS) + 200
