"""Every rule against its step function, and the DAG under every config option that changes it.

The rules are read through Snakemake's API (the parsed workflow's Rule objects),
for each configuration in :data:`VARIANTS`: the named inputs, outputs and params
a rule passes must be keyword parameters of the function its ``params.step``
names, and every required parameter must be passed (``listed_<arg>`` inputs pass
``<arg>``). A batch rule (``batch_units`` param) passes its unit step the units'
inputs and params, the unit outputs and the shared params; its own inputs and
outputs go to the batch runner. A dry run of each
configuration (``snakemake -n``, as a user types it) must plan the rules that
configuration turns on.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from bh_models.core.batches import LISTED_PREFIX
from bh_models.core.step import BATCH_STEP, DEPENDENCY_PREFIX, resolve
from tests.conftest import write_bids
from workflow_utils import REPO, make_workdir, snakemake


def _finetune(config):
    config["evaluate"]["finetune"] = {"enabled": True}


def _networks_7(config):
    config["atlas"]["networks"] = 7


def _ants(config):
    config["anat"]["skullstrip"] = "ants"


def _scrubbing(config):
    config["func"]["denoise"] = "scrubbing"
    config["func"]["gsr"] = True


def _one_dataset(config):
    config["datasets"] = {"siteC": {**config["datasets"]["siteC"], "role": "both"}}


def _two_downstream(config):
    targets = config["datasets"]["siteC"]["targets"]
    config["datasets"]["siteB"].update(role="downstream", targets=targets)


# name -> (edit of the demo config, rules it must plan, rules it must not plan)
VARIANTS = {
    "demo": (None, {"make_bundle", "extract_embeddings", "evaluate_dataset"},
             {"extract_latents", "evaluate_pooled", "finetune_folds", "finetune"}),
    "finetune": (_finetune, {"extract_latents", "finetune_folds", "finetune"}, {"finetune_pooled"}),
    "finetune-pooled": (lambda c: (_finetune(c), _two_downstream(c)),
                        {"finetune_folds_pooled", "finetune_pooled", "evaluate_pooled"}, set()),
    "networks-7": (_networks_7, {"func_preprocess"}, set()),
    "ants-skullstrip": (_ants, {"anat_preprocess"}, set()),
    "scrubbing-gsr": (_scrubbing, {"func_preprocess"}, set()),
    "one-dataset": (_one_dataset, {"pretrain_fmri", "extract_embeddings", "evaluate_dataset"}, {"evaluate_pooled"}),
    "three-datasets-two-downstream": (_two_downstream, {"evaluate_pooled"}, set()),
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """Zero-byte BIDS copies of the demo sites' layout: planning never opens an image."""
    root = tmp_path_factory.mktemp("layout")
    for site, tr in (("siteA", 0.735), ("siteB", 2.0), ("siteC", 1.5)):
        write_bids(root / site, {f"{i:02d}": {} for i in range(1, 5)}, top_tr=tr)
    return root


def variant_workdir(root: Path, demo_root: Path, name: str) -> Path:
    workdir = make_workdir(root / name, demo_root)
    edit = VARIANTS[name][0]
    if edit is not None:
        config = yaml.safe_load((workdir / "config.yaml").read_text())
        edit(config)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return workdir


def parsed_rules(workdir: Path) -> list:
    """The workflow's Rule objects for the config in ``workdir``, through Snakemake's API.

    A batch rule's params are functions of the parsed workflow's globals, which the next
    parse in this process replaces: they are evaluated here, into ``rule.batch_info``.
    """
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1),
                                config_settings=ConfigSettings(configfiles=[workdir / "config.yaml"]),
                                snakefile=REPO / "workflow" / "Snakefile", workdir=workdir)
        workflow.dag(dag_settings=DAGSettings())  # parses the Snakefile
        rules = list(workflow._workflow.rules)
        for rule in rules:
            if "batch_units" in rule.params._names:
                rule.batch_info = batch_info(rule, workflow._workflow.globals["BATCH_PLAN"])
        return rules


def _param(rule, name):
    return rule.params[rule.params._names[name][0]]


def passed_names(rule) -> tuple[set[str], bool]:
    """Keyword names a rule passes to its step, and whether an ``unpack()`` input adds more."""
    names = {n.removeprefix(LISTED_PREFIX) for part in (rule.input, rule.output) for n in part._names
             if not n.startswith(DEPENDENCY_PREFIX)}
    names |= set(rule.params._names) - {"step"}
    unpacked = any(getattr(item, "flags", {}).get("unpack") for item in rule.input)
    return names | {"threads"}, unpacked


def batch_info(rule, batch_plan) -> dict:
    """What a batch rule passes its unit step (``names``) and its unit output templates (``outputs``),
    evaluated on the first batch that has units of the rule."""
    from snakemake.iocontainers import Wildcards

    for dataset, batches in batch_plan.items():
        for batch in batches:
            wildcards = Wildcards(fromdict={"dataset": dataset, "batch": batch})
            units = _param(rule, "batch_units")(wildcards)
            if units:
                outputs = _param(rule, "batch_outputs")(wildcards)
                names = {n for n in outputs if not n.startswith(DEPENDENCY_PREFIX)}
                names |= set(units[0]["inputs"]) | set(units[0]["params"])
                shared = {n for n in rule.params._names if n != "step" and not n.startswith("batch_")}
                return {"names": names | shared | {"threads"}, "outputs": outputs}
    raise AssertionError(f"{rule.name}: no batch with units in the layout")


def contract_problems(rule) -> list[str]:
    step = _param(rule, "step")
    parameters = inspect.signature(resolve(step)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return [f"{rule.name}: {step} takes **kwargs, so its contract cannot be checked"]
    names, unpacked = passed_names(rule)
    problems = []
    if "batch_units" in rule.params._names:  # the rule's own files go to the batch runner, the units' to the step
        runner = inspect.signature(resolve(BATCH_STEP)).parameters
        own = {n for part in (rule.input, rule.output) for n in part._names if not n.startswith(DEPENDENCY_PREFIX)}
        problems += [f"{rule.name}: passes {name!r}, which {BATCH_STEP} does not take"
                     for name in sorted(own - set(runner))]
        names = rule.batch_info["names"]
    # Parameters the runner fills itself: the job's context, and each listed file's dataset.
    filled = {"job_context"} | {f"{n}_datasets" for n in names}
    problems += [f"{rule.name}: passes {name!r}, which {step} does not take" for name in sorted(names - set(parameters))]
    required = {n for n, p in parameters.items() if p.default is inspect.Parameter.empty} - filled
    problems += [f"{rule.name}: {step} requires {name!r}, which the rule does not pass"
                 for name in sorted(required - names)]
    if unpacked:  # an unpack() input adds named inputs at run time: they must be optional parameters
        optional = {n for n, p in parameters.items() if p.default is not inspect.Parameter.empty}
        problems += [] if optional - names else [f"{rule.name}: unpack() input but {step} has no optional input"]
    return problems


@pytest.fixture(scope="module")
def rules_by_variant(tmp_path_factory, layout) -> dict[str, list]:
    root = tmp_path_factory.mktemp("variants")
    return {name: parsed_rules(variant_workdir(root, layout, name)) for name in VARIANTS}


def test_every_rule_matches_its_step_function(rules_by_variant):
    seen, problems = set(), []
    for rules in rules_by_variant.values():
        for rule in rules:
            if "step" in rule.params._names:
                seen.add(rule.name)
                problems += contract_problems(rule)
    assert problems == [], "\n".join(sorted(set(problems)))
    # Every rule of the rule files has a step, and every one was checked in some variant.
    defined = {line.split()[1].rstrip(":") for path in (REPO / "rules").glob("*.smk")
               for line in path.read_text().splitlines() if line.startswith("rule ")}
    assert seen == defined, defined ^ seen


def test_a_contract_violation_is_found(rules_by_variant):
    """The check reads real signatures: a rule passing an unknown name is reported."""
    rule = next(r for r in rules_by_variant["demo"] if r.name == "anat_qc_table")
    rule.params._names["not_a_parameter"] = (len(rule.params), None)
    rule.params.append(1)
    try:
        assert contract_problems(rule) == ["anat_qc_table: passes 'not_a_parameter', which "
                                           "bh_models.anat.preprocess:anat_qc_table does not take"]
    finally:
        del rule.params._names["not_a_parameter"]
        rule.params.pop()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dry_run_matrix(name, tmp_path, layout):
    """Each configuration plans the rules it turns on, and `bh plan` counts the same jobs per rule."""
    from bh_models.bids.cohort import plan_cohort
    from bh_models.cli import dataset_counts, shares_a_task
    from bh_models.core.config import load_config
    from bh_models.core.costs import workflow_jobs

    workdir = variant_workdir(tmp_path, layout, name)
    plan = snakemake(workdir, "-n", "--cores", "2").stdout
    counts = {parts[0]: int(parts[1]) for line in plan.split("Job stats:")[1].split("total")[0].splitlines()[2:]
              if len(parts := line.split()) == 2 and parts[1].isdigit()}
    jobs = set(counts)
    _, must, must_not = VARIANTS[name]
    assert must <= jobs, must - jobs
    assert not (must_not & jobs), must_not & jobs
    config = load_config(workdir / "config.yaml", base_dir=workdir)
    plans = plan_cohort(config)
    assert workflow_jobs(datasets=dataset_counts(config, plans), config=config,
                         pooled=shares_a_task(config, plans)) == counts


def test_the_network_order_names_the_parcel_series(rules_by_variant):
    """The series' file names (batch output templates, not Snakemake outputs) follow atlas.networks:
    the paper's 17-network order by default."""
    for name, order in (("demo", "17n"), ("networks-7", "7n")):
        rule = next(r for r in rules_by_variant[name] if r.name == "func_preprocess")
        template = rule.batch_info["outputs"]
        assert f"seg-{order}_scale-400_timeseries.tsv" in template["out_timeseries"], template
