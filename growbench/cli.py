"""`growbench run | search | list | leaderboard`: Hydra-style `key=value` overrides on top of a suite YAML.

Bad input (unknown suite, key, method or value, missing dataset files) prints one error that names the
valid choices or the fix and exits with code 2 before anything runs.
"""
from __future__ import annotations

import argparse
import sys

from growbench.config import ConfigError, available_suites, load_suite, read_yaml

EPILOG_RUN = """\
overrides (Hydra style, values in YAML syntax):
  suite=NAME                  a suite from `growbench list` (default: toy) or a path to a YAML file
  budget.epochs=3             any key of the suite, dotted
  methods=[fixed,random]      lists in brackets
  seeds=[0,1,2]
  dataset.root=/data          where the datasets live (else $GROWBENCH_DATA, else ~/.cache/growbench/data)
  device=cuda                 auto | cpu | cuda | cuda:1
  method_settings.random.units_per_step=2
  results_dir=results         records go to <results_dir>/runs/<suite>/<dataset>/<method>/
  workers=4                   run 4 cells at once in local worker processes (executor=local)
  executor=submitit           send cells to SLURM (pip install growbench[slurm]; settings under submitit.)
  submitit.partition=gpu submitit.time=120 submitit.gpus_per_node=1
  checkpoint=false            no per-cell checkpoints (default: saved at every evaluation point)
examples:
  growbench run                                  # the toy suite, in under a minute on a CPU
  growbench run suite=mnist seeds=[0] --dry-run  # the plan, what is done, a cost estimate
  growbench run suite=cifar-small device=cuda methods=[fixed]
"""


def _split_overrides(items: list[str]) -> tuple[str, list[str]]:
    suite = "toy"
    rest = []
    for it in items:
        if it.startswith("suite="):
            suite = it.split("=", 1)[1]
        else:
            rest.append(it)
    return suite, rest


def cmd_run(args: argparse.Namespace) -> int:
    from growbench.runner import dry_run, run_suite

    name, overrides = _split_overrides(args.overrides)
    suite = load_suite(name, overrides)
    if args.dry_run:
        dry_run(suite)
        return 0
    summary = run_suite(suite, show_progress=False if args.quiet else None)
    print(f"done: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} already recorded; "
          f"records under {suite.results_dir}/runs/{suite.name}/")
    unfinished = summary.get("lost", 0) + summary.get("busy", 0)
    if unfinished:
        print(f"growbench: error: {unfinished} cell(s) not finished ({summary.get('lost', 0)} lost when their "
              f"process died, {summary.get('busy', 0)} running in another process); rerun the same command "
              "to finish them (they resume from their last checkpoints)", file=sys.stderr)
        return 1
    print(f"table: growbench leaderboard suite={name}" + (f" results_dir={suite.results_dir}"
                                                          if suite.results_dir != "results" else ""))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from growbench.data import DATASETS
    from growbench.methods import PluginLoadError, load_method_class, method_names

    print("suites:")
    for name, path in sorted(available_suites().items()):
        try:
            desc = str(read_yaml(path).get("description", "")).strip().splitlines()[0]
        except (ConfigError, IndexError):
            desc = ""
        print(f"  {name:16s} {desc}")
    print("methods:")
    for name in method_names():
        try:
            cls = load_method_class(name)
            doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip().splitlines()
            print(f"  {name:16s} {doc[0] if doc else ''}")
        except PluginLoadError as e:
            print(f"  {name:16s} BROKEN: {e}")
    print("datasets:")
    print("  " + ", ".join(DATASETS))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from growbench.leaderboard import print_leaderboard, write_all

    if args.all:
        if any(o.startswith("suite=") for o in args.overrides):
            raise ConfigError("leaderboard --all takes every suite with records; leave suite= out")
        results_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("results_dir=")), "results")
        write_all(results_dir, args.overrides, figures=not args.no_figures)
        return 0
    name, overrides = _split_overrides(args.overrides)
    print_leaderboard(load_suite(name, overrides), sys.stdout, overrides, figures=not args.no_figures)
    return 0


EPILOG_SEARCH = """\
options (besides the suite's own overrides, e.g. budget.epochs=5 device=cuda):
  trials=20             finished trials (complete + pruned) the study should have; a rerun resumes towards it
  storage=PATH|URL      journal file (default <results_dir>/search/<suite>.journal), sqlite:///f.db, postgresql://...
  workers=1             worker processes sharing the study (and the retraining's cells)
  pruner=median         median | hyperband | none, fed the validation metric at every evaluation point
  val_size=N            validation examples (default: the suite's, else 5000 for image data, else 20 %)
  space=NAME|PATH       search space (default baselines/spaces/<suite>.yaml, else <model family>.yaml)
  train_seed=1000 sampler_seed=0 prune_startup=5 retrain=true heartbeat=60
examples:
  growbench search suite=toy trials=20
  growbench search suite=mnist trials=50 workers=2      # then the best goes to baselines/best/mnist-mnist.yaml
"""


def cmd_search(args: argparse.Namespace) -> int:
    from baselines.search import main as search_main

    return search_main(args.overrides, dry_run=args.dry_run, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="growbench",
        description="Benchmark neural-network growth methods under one harness: same data, same budget, "
                    "same evaluation; growth overhead measured, not hidden.")
    from growbench import __version__

    p.add_argument("--version", action="version", version=f"growbench {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run a suite's missing cells (default suite: toy)",
                       description="Run every cell (dataset x method x seed) of a suite that has no record yet.",
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("overrides", nargs="*", metavar="key=value", help="suite=NAME and overrides")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan, what is done and a cost estimate; run nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)
    se = sub.add_parser("search", help="Optuna search of a fixed-size baseline per dataset; best -> baselines/best/",
                        description="Search the fixed-size networks of a suite's model family (widths, lr, weight "
                                    "decay) with Optuna on a validation split, write the best configuration and the "
                                    "search's cost to baselines/best/<suite>-<dataset>.yaml, and train it for every "
                                    "seed as method optuna-fixed. Rerunning resumes the same study.",
                        epilog=EPILOG_SEARCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    se.add_argument("overrides", nargs="*", metavar="key=value", help="suite=NAME, search options and overrides")
    se.add_argument("--dry-run", action="store_true", help="print the studies (name, storage, space); run nothing")
    se.add_argument("--quiet", action="store_true", help="no progress bars")
    se.set_defaults(func=cmd_search)
    li = sub.add_parser("list", help="show suites, methods (with plugins) and datasets")
    li.set_defaults(func=cmd_list)
    lb = sub.add_parser("leaderboard", help="write and print a suite's tables and figures from its records",
                        description="Write <results_dir>/leaderboards/<suite>.{md,csv,tex} (one table per dataset: "
                                    "cells done, mean ± std and bootstrap CI of the final metric, average rank, wins "
                                    "vs the size-matched fixed baseline, params, FLOPs, train/growth/search time), "
                                    "figures under <results_dir>/leaderboards/<suite>/ and the index "
                                    "<results_dir>/README.md; print the Markdown table.")
    lb.add_argument("overrides", nargs="*", metavar="key=value", help="suite=NAME (and results_dir=...)")
    lb.add_argument("--all", action="store_true", help="every suite with records under <results_dir>/runs/")
    lb.add_argument("--no-figures", action="store_true", help="tables and index only (faster)")
    lb.set_defaults(func=cmd_leaderboard)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value may also come after --flags
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if args.command is None:
        parser.print_help()
        return 0
    from growbench.data import DatasetError
    from growbench.records import RecordWriteError

    try:
        return args.func(args)
    except (ConfigError, DatasetError) as e:
        print(f"growbench: error: {e}", file=sys.stderr)
        return 2
    except RecordWriteError as e:
        print(f"growbench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
