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
from bh_models.core.exclusions import failed_subjects

try:
    for _configfile in workflow.configfiles:
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
    COHORT = plan_cohort(config, failed=failed_subjects(results_dir=Path(RESULTS)))
except (BHConfigError, BHInputError) as _exc:
    sys.exit(f"error: {_exc}")
DATASETS = list(COHORT)
# Roles: pretraining datasets feed the store and the three pretraining jobs;
# downstream datasets are encoded by the frozen models of the bundle and evaluated.
PRETRAIN = pretraining_datasets(config)
DOWNSTREAM = downstream_datasets(config)
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
    subject="[A-Za-z0-9]+",
    bold="sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*",


def log_path(rule_name, *parts):
    """One log file per job: results/logs/<rule>/<wildcards>.log."""
    return f"{RESULTS}/logs/{rule_name}/" + "_".join(parts) + ".log"


def anat_path(name):
    """Path of a per-subject anat derivative; `name` follows sub-{subject}_."""
    return f"{PREPROC}/{{dataset}}/sub-{{subject}}/anat/sub-{{subject}}_{name}"


def func_path(name):
    """Path of a per-run func derivative; `name` follows {bold}_."""
    return f"{PREPROC}/{{dataset}}/sub-{{subject}}/func/{{bold}}_{name}"


def figure_path(name):
    """Per-subject QC figure (fMRIPrep-style sub-<label>/figures/ folder)."""
    return f"{PREPROC}/{{dataset}}/sub-{{subject}}/figures/{name}"


def caption(name):
    return f"../workflow/report/{name}.rst"


def dataset_entry(wildcards):
    return config["datasets"][wildcards.dataset]


def bids_file(wildcards, name):
    return str(COHORT[wildcards.dataset].bids_root / name)


def bold_entry(wildcards):
    return COHORT[wildcards.dataset].bold[wildcards.bold]


def participants_tsv(wildcards):
    """``{"participants": path}`` when the dataset has a participants.tsv (for ``unpack``)."""
    path = COHORT[wildcards.dataset].bids_root / "participants.tsv"
    return {"participants": str(path)} if path.is_file() else {}


def per_subject(output, dataset):
    """One anat output for every T1w subject of a dataset."""
    return expand(output, dataset=dataset, subject=COHORT[dataset].anat_subjects)


def per_run(output, dataset):
    """One func output for every BOLD run of a dataset."""
    plan = COHORT[dataset]
    stems = plan.bold_stems
    return expand(output, zip, dataset=[dataset] * len(stems),
                  subject=[plan.bold[stem]["subject"] for stem in stems], bold=stems)


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
    for dataset in DOWNSTREAM:
        targets += expand(rules.evaluate_dataset.output, dataset=dataset)
    if pooled_evaluation():
        targets += [*rules.evaluate_pooled.output]
    return targets


def pooled_evaluation():
    """Evaluate the downstream datasets together: asked for, two or more of them, and a task they share."""
    from bh_models.evaluation.evaluate import pooled_tasks
    from bh_models.evaluation.targets import parse_tasks

    if not config["evaluate"]["pooled"] or len(DOWNSTREAM) < 2:
        return False
    tasks = {d: parse_tasks(tasks=config["datasets"][d]["targets"], config_key=f"datasets.{d}.targets")
             for d in DOWNSTREAM}
    return bool(pooled_tasks(tasks=tasks))


def all_targets():
    return final_targets() + [*rules.audit.output]
