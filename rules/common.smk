# Config validation, the cohort plan, path helpers, wildcard constraints and input
# functions. Rules only look names up here; all logic lives in bh_models.
import sys
from pathlib import Path

from snakemake.utils import validate

from bh_models.cohort import plan_cohort
from bh_models.config import check_config, load_yaml
from bh_models.errors import BHConfigError, BHInputError
from bh_models.exclusions import failed_subjects

try:
    for _configfile in workflow.configfiles:
        load_yaml(_configfile)  # refuses duplicate keys, which YAML would merge silently
    check_config(config)  # words every problem as "config key X: problem. Fix: ..."
except (BHConfigError, BHInputError) as _exc:
    sys.exit(f"error: {_exc}")
validate(config, "../workflow/schemas/config.schema.yaml")

RESULTS = config["results_dir"]
PREPROC = f"{RESULTS}/derivatives/bh-preproc"
STEP = "../workflow/scripts/step.py"

try:
    COHORT = plan_cohort(config, failed=failed_subjects(results_dir=Path(RESULTS)))
except (BHConfigError, BHInputError) as _exc:
    sys.exit(f"error: {_exc}")
DATASETS = list(COHORT)


wildcard_constraints:
    dataset="[A-Za-z0-9_-]+",
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


def dataset_entry(wildcards):
    return config["datasets"][wildcards.dataset]


def bids_file(wildcards, name):
    return str(COHORT[wildcards.dataset].bids_root / name)


def all_targets():
    targets = []
    for dataset in DATASETS:
        targets += expand(rules.index_dataset.output, dataset=dataset)
        targets.append(f"{PREPROC}/{dataset}/dataset_description.json")
    return targets
