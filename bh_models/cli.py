"""The ``bh`` command: the user-facing entry points of bh_models.

Subcommands import their module lazily so ``bh index`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bh_models.core.errors import BHConfigError, BHInputError


def _cmd_index(args: argparse.Namespace) -> int:
    from bh_models.bids.index import Filters, index_dataset

    start = time.perf_counter()
    filters = Filters(task=args.task, session=args.session, run=args.run, acquisition=args.acq)
    index = index_dataset(args.bids_dir, dataset=args.dataset, filters=filters,
                          tr_override=args.tr_override, threads=args.threads)
    elapsed = time.perf_counter() - start
    runs = index.runs
    n_t1 = int((runs["suffix"] == "T1w").sum())
    n_bold = int((runs["suffix"] == "bold").sum())
    subjects = index.subjects
    print(
        f"{args.bids_dir}: {len(subjects)} subjects ({int(subjects['paired'].sum())} with T1w and BOLD), "
        f"{n_t1} T1w, {n_bold} BOLD runs, {len(index.problems)} problems, indexed in {elapsed:.2f} s"
    )
    for row in index.problems.itertuples():
        print(f"  problem: {row.path}: {row.reason}", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs.to_csv(args.out, sep="\t", index=False, na_rep="n/a")
        subjects.to_csv(args.out.with_name(args.out.stem + "_subjects.tsv"), sep="\t", index=False, na_rep="n/a")
        print(f"wrote {args.out}")
    return 1 if (args.strict and len(index.problems)) else 0


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
            print(f"{name} ({config['datasets'][name]['role']}): {len(plan.anat_subjects)} T1w subjects, "
                  f"{len(plan.bold_stems)} BOLD runs, {len(plan.problems)} problems")
            for row in plan.problems.itertuples():
                print(f"  problem: {row.path}: {row.reason}")
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

    p = sub.add_parser("index", help="index a BIDS dataset (T1w, rest BOLD, TR, participants)")
    p.add_argument("bids_dir", type=Path)
    p.add_argument("--out", type=Path, help="write the run table here (and <stem>_subjects.tsv beside it)")
    p.add_argument("--dataset", default="", help="dataset name stored in the table")
    p.add_argument("--task", default="rest", help="BOLD task label to keep (default: rest)")
    p.add_argument("--session", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--acq", default=None)
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
