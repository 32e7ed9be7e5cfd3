"""The ``bh`` command: the user-facing entry points of bh_models.

Subcommands import their module lazily so ``bh index`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bh_models.core.errors import BHConfigError, BHInputError


def _print_problems(problems, *, file=None) -> None:
    """Each problem (left out, with its fix) and note (a choice made), one line each."""
    for row in problems.itertuples():
        fix = f" Fix: {row.fix}" if getattr(row, "fix", "") else ""
        print(f"  {row.kind}: {row.path}: {row.reason}.{fix}", file=file)


def _cmd_index(args: argparse.Namespace) -> int:
    from bh_models.bids.cohort import plan_dataset

    start = time.perf_counter()
    filters = {"task": args.task, "session": args.session, "run": args.run, "acquisition": args.acq,
               "echo": args.echo}
    plan = plan_dataset(args.dataset or Path(args.bids_dir).name,
                        {"bids_root": str(args.bids_dir), "filters": filters, "tr_override": args.tr_override,
                         "exclude_subjects": [], "exclude_runs": []})
    elapsed = time.perf_counter() - start
    index = plan.index
    runs = index.runs
    subjects = index.subjects
    kinds = plan.problems["kind"].value_counts()
    print(
        f"{args.bids_dir}: {len(subjects)} subjects ({int(subjects['paired'].sum())} with T1w and BOLD), "
        f"{len(plan.anat)} T1w units, {len(plan.func)} BOLD runs, {int(kinds.get('problem', 0))} problems "
        f"(left out), {int(kinds.get('note', 0))} notes (choices made), indexed in {elapsed:.2f} s"
    )
    _print_problems(plan.problems, file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs.to_csv(args.out, sep="\t", index=False, na_rep="n/a")
        subjects.to_csv(args.out.with_name(args.out.stem + "_subjects.tsv"), sep="\t", index=False, na_rep="n/a")
        plan.problems.to_csv(args.out.with_name(args.out.stem + "_problems.tsv"), sep="\t", index=False,
                             na_rep="n/a")
        print(f"wrote {args.out}")
    return 1 if (args.strict and kinds.get("problem", 0)) else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from bh_models.demo.cohort import write_demo_cohort

    start = time.perf_counter()
    sizes = {} if args.subjects_per_site is None else {"subjects_per_site": args.subjects_per_site}
    summary = write_demo_cohort(args.out_dir, seed=args.seed, **sizes)
    print(f"demo cohort written to {args.out_dir} in {time.perf_counter() - start:.1f} s")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from bh_models.models.bundle import check_settings, read_bundle, settings_from_config
    from bh_models.bids.cohort import plan_cohort
    from bh_models.core.config import load_config, pretraining_datasets

    config = load_config(args.configfile)
    if config["example_only"]:
        print(f"{args.configfile}: documented example (example_only: true); bids_root values are placeholders "
              "and are not read")
        for name, entry in config["datasets"].items():
            tasks = ", ".join(f"{task} ({spec['type']})" for task, spec in entry["targets"].items()) or "no targets"
            print(f"  {name} ({entry['role']}): {entry['bids_root']}; TR "
                  f"{entry['tr_override'] or 'from sidecars'}; {tasks}")
    else:
        for name, plan in plan_cohort(config).items():
            kinds = plan.problems["kind"].value_counts()
            tasks = (f", tasks evaluated: {', '.join(plan.tasks) or 'none'}"
                     if config["datasets"][name]["targets"] else "")
            print(f"{name} ({config['datasets'][name]['role']}): {len(plan.anat_subjects)} subjects with a T1w, "
                  f"{len(plan.anat)} T1w units, {len(plan.bold_stems)} BOLD runs, "
                  f"{int(kinds.get('problem', 0))} problems, {int(kinds.get('note', 0))} notes{tasks}")
            _print_problems(plan.problems)
    bundle = config["model"]["bundle"]
    if bundle:
        check_settings(bundle=read_bundle(bundle), expected=settings_from_config(config), bundle_path=bundle)
        print(f"model: the existing bundle {bundle} (settings match this config; no pretraining)")
    else:
        print(f"model: pretrained here on {', '.join(pretraining_datasets(config))}; bundle written to "
              f"{config['results_dir']}/models")
        _print_training_plan(config)
    print(f"{args.configfile}: OK")
    return 0


def _print_training_plan(config: dict) -> None:
    """The effective training settings of each pretraining job, their cost, and the GPU-memory fit."""
    from bh_models.models.training_plan import format_plan, training_plan

    plan = training_plan(config)
    print(f"training ({config['pretrain']['model_size']} models, {config['pretrain']['gpus']} GPU(s) per job):")
    for line in format_plan(plan):
        print(line)
    for warning in plan["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
def shares_a_task(config: dict, plans: dict) -> bool:
    """Whether the evaluated downstream datasets share an identically configured task (the pooled evaluation)."""
    from bh_models.evaluation.targets import parse_tasks

    evaluated = [name for name, plan in plans.items()
                 if config["datasets"][name]["role"] in ("downstream", "both") and plan.tasks]
    if len(evaluated) < 2:
        return False
    tasks = {d: parse_tasks(tasks=plans[d].tasks, config_key=f"datasets.{d}.targets") for d in evaluated}
    first, *others = evaluated
    return any(all(spec in tasks[other] for other in others) for spec in tasks[first])


def dataset_counts(config: dict, plans: dict | None = None) -> list:
    """What `bh plan` needs of each configured dataset: units, batches, problems, a typical run's size."""
    from statistics import median

    from bh_models.bids.cohort import plan_cohort
    from bh_models.core.costs import DatasetCounts, run_size

    counts = []
    buckets = config["batches"]["buckets"]
    for name, plan in (plans if plans is not None else plan_cohort(config)).items():
        anat, func = plan.anat_units(), plan.func_units()
        batches = plan.batches(buckets)
        first = next(iter(func.values()), None)
        bold = first["inputs"]["bold"] if first else None
        mvf, frames = run_size(bold[0] if isinstance(bold, list) else bold) if bold else (None, None)
        trs = [unit["params"]["tr_sidecar"] for unit in func.values() if unit["params"].get("tr_sidecar")]
        entry = config["datasets"][name]
        counts.append(DatasetCounts(
            name=name, role=entry["role"], subjects=len({u["subject"] for u in [*anat.values(), *func.values()]}),
            anat_units=len(anat), func_units=len(func), problems=len(plan.problems),
            batch_labels=tuple((label, bool(units["anat"]), bool(units["func"])) for label, units in batches.items()),
            tasks=len(plan.tasks), run_mvoxel_frames=mvf, run_frames=frames,
            repetition_time=median(trs) if trs else None))
    return counts


def _slurm_group_components(profile: Path) -> int:
    import yaml

    path = profile / "config.yaml" if profile.is_dir() else profile
    settings = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return int((settings or {}).get("group-components", {}).get("preproc", 1))


def _human_bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return f"{value:.1f} PB"


def _cmd_plan(args: argparse.Namespace) -> int:
    from bh_models.core.config import load_config
    from bh_models.core.costs import (DEFAULT_GPU_TFLOPS, cpu_hours, gpu_hours, slurm_submissions, storage_bytes,
                                      workflow_jobs)

    args.gpu_tflops = args.gpu_tflops or DEFAULT_GPU_TFLOPS
    started = time.perf_counter()
    config = load_config(args.configfile)
    if config["example_only"]:
        print(f"{args.configfile}: documented example (example_only: true); its bids_root values are "
              "placeholders, so there is nothing to plan", file=sys.stderr)
        return 2
    from bh_models.bids.cohort import plan_cohort

    plans = plan_cohort(config)
    datasets = dataset_counts(config, plans)
    jobs = workflow_jobs(datasets=datasets, config=config, pooled=shares_a_task(config, plans))
    group = _slurm_group_components(args.profile)
    submissions = slurm_submissions(datasets=datasets, jobs=jobs, group_components=group)
    cpu = cpu_hours(datasets=datasets, jobs=jobs, config=config)
    gpu = gpu_hours(datasets=datasets, config=config, gpu_tflops=args.gpu_tflops)
    storage = storage_bytes(datasets=datasets, config=config)
    print(f"bh plan: {args.configfile} (costs measured by benchmarks/bench_costs.py, bh_models/core/costs.tsv)\n")
    print(f"{'dataset':<16}{'role':<11}{'subjects':>10}{'T1w units':>11}{'BOLD runs':>11}{'problems':>10}"
          f"{'batches':>9}  typical run")
    for d in datasets:
        run = (f"{d.run_frames:.0f} volumes, {d.run_mvoxel_frames:.0f} Mvoxel-frames" if d.run_mvoxel_frames
               else "unknown (headers unreadable): the measured demo run is assumed")
        print(f"{d.name:<16}{d.role:<11}{d.subjects:>10,}{d.anat_units:>11,}{d.func_units:>11,}{d.problems:>10,}"
              f"{len(d.batch_labels):>9,}  {run}")
    print(f"\n{'rule':<52}{'jobs':>8}{'SLURM submissions':>19}")
    grouped = next(iter(submissions))
    for rule, count in jobs.items():
        shown = "" if rule in ("anat_preprocess", "func_preprocess") else submissions.get(rule, 0)
        print(f"{rule:<52}{count:>8,}{shown:>19}")
    print(f"{grouped:<52}{'':>8}{submissions[grouped]:>19,}  (group-components preproc: {group}, {args.profile})")
    print(f"{'total':<52}{sum(jobs.values()):>8,}{sum(submissions.values()):>19,}")
    print("\nCPU-hours (one thread per unit; measured per-unit costs)")
    for rule, value in cpu.items():
        print(f"  {rule:<30}{value:>12,.1f}")
    preprocessing = cpu.get("anat_preprocess", 0) + cpu.get("func_preprocess", 0)
    print(f"  {'preprocessing total':<30}{preprocessing:>12,.1f}   ({preprocessing / max(1, sum(d.subjects for d in datasets)) * 60:.1f} CPU-minutes per subject)")
    if gpu:
        print(f"\nGPU-hours of pretraining (measured FLOPs per sample x samples / {args.gpu_tflops:g} TFLOP/s "
              "sustained, an assumption: --gpu-tflops)")
        for rule, value in gpu.items():
            print(f"  {rule:<30}{value:>12,.1f}")
        print(f"  {'pretraining total':<30}{sum(gpu.values()):>12,.1f}")
    print(f"\n{'storage class':<36}{'per unit':>12}{'units':>10}{'total':>12}")
    for name, row in storage.items():
        if name.endswith("transforms_exact"):
            continue
        print(f"{name:<36}{_human_bytes(row['per_unit']):>12}{row['units']:>10,}{_human_bytes(row['total']):>12}")
    total = sum(row["total"] for name, row in storage.items() if not name.endswith("transforms_exact"))
    print(f"{'total':<36}{'':>12}{'':>10}{_human_bytes(total):>12}")
    exact = storage.get("anat: transforms_exact")
    compact = storage.get("anat: transforms")
    if exact and compact:
        print(f"(transforms as ITK writes them, compact_storage off: {_human_bytes(exact['total'])} instead of "
              f"{_human_bytes(compact['total'])}; derivatives per subject "
              f"{_human_bytes(_per_subject(storage, exact=True))} -> {_human_bytes(_per_subject(storage, exact=False))})")
    print(f"\nplanned in {time.perf_counter() - started:.1f} s")
    return 0


def _per_subject(storage: dict, *, exact: bool) -> float:
    anat = sum(row["per_unit"] for name, row in storage.items() if name.startswith("anat:")
               and name != ("anat: transforms" if exact else "anat: transforms_exact"))
    func = sum(row["per_unit"] for name, row in storage.items() if name.startswith("func:"))
    return anat + func


def _cmd_bundle(args: argparse.Namespace) -> int:
    from bh_models.models.bundle import main as bundle_main

    return bundle_main(args.rest)


def _cmd_import_official(args: argparse.Namespace) -> int:
    from bh_models.models.official import main as import_main

    return import_main(args.rest)


def _cmd_audit(args: argparse.Namespace) -> int:
    from bh_models.records.audit import main as audit_main

    return audit_main([str(args.results_dir), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bh", description="Brain Harmony pipeline tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("index", help="index a BIDS dataset: units, TR, participants, every problem with its fix")
    p.add_argument("bids_dir", type=Path)
    p.add_argument("--out", type=Path,
                   help="write the run table here (and <stem>_subjects.tsv, <stem>_problems.tsv beside it)")
    p.add_argument("--dataset", default="", help="dataset name stored in the table")
    p.add_argument("--task", default="rest", help="BOLD task label to keep (default: rest)")
    p.add_argument("--session", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--acq", default=None)
    p.add_argument("--echo", default=None, help="multi-echo runs: use this echo instead of combining them")
    p.add_argument("--tr-override", type=float, default=None)
    p.add_argument("--threads", type=int, default=8, help="folder-scan threads (I/O bound)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any problem is found")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("demo", help="write the seeded demo cohort (three BIDS sites + ground truth)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects-per-site", type=int, default=None, help="default: siteA 6, siteB 6, siteC 16")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("check-config", help="validate config.yaml and show what each dataset contributes")
    p.add_argument("configfile", type=Path, nargs="?", default=Path("config.yaml"))
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("plan", help="cost plan before anything runs: jobs, SLURM submissions, CPU/GPU-hours, storage")
    p.add_argument("configfile", type=Path, nargs="?", default=Path("config.yaml"))
    p.add_argument("--profile", type=Path, default=Path(__file__).resolve().parents[1] / "workflow" / "profiles"
                   / "slurm", help="SLURM profile whose group-components count the submissions")
    p.add_argument("--gpu-tflops", type=float, default=None,
                   help="sustained bf16 TFLOP/s of one GPU for the pretraining estimate (default 350: 35 %% of an H100)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("bundle", help="model bundle tools: `bh bundle verify PATH` checks every file's sha256")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bundle)

    p = sub.add_parser("import-official", help="turn the paper's released checkpoints into a model bundle: "
                       "bh import-official --fmri F --t1 S --harmonizer H --eigenmodes E --gradients G OUT",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("audit", help="re-hash results and check them against their provenance")
    p.add_argument("results_dir", type=Path)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import-official"]:  # its options go to its own parser (argparse.REMAINDER skips "--x")
        args = argparse.Namespace(func=_cmd_import_official, rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BHInputError, BHConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
