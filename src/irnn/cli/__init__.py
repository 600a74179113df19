"""The ``irnn`` command line: parses and dispatches, nothing else.

Every ``irnn train`` option is generated from the fields of :class:`irnn.config.Config`,
so each is documented in exactly one place. Bad input of any kind ends in one
line on stderr and exit status 2. ``irnn sweep``, ``reproduce``, ``benchmark`` and ``plot`` live in
:mod:`irnn.cli.experiments`; what both halves share, in :mod:`irnn.cli.options`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from typing import Any, Sequence

from ..config import PRESETS, ConfigError, field_types
from ..registry import RegistryError
from .options import (EXIT_FAILED, EXIT_USAGE, RESUMABLE_OVERRIDES, UsageError, _Parser, add_config_options,
                      command_line, config_values, resolve_config, storage_error_line)

# -- commands -----------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    # The trainer (and torch, ~1.5 s) is imported only once the input is known to be good.
    if args.resume:
        if args.config or args.overwrite:
            raise UsageError(f"irnn train: --{'config' if args.config else 'overwrite'} cannot be used with --resume; "
                             f"a resumed run keeps its stored config")
        given = set(config_values(args))
        bad = sorted(given - RESUMABLE_OVERRIDES)
        if bad:
            raise ConfigError(f"--{bad[0].replace('_', '-')} cannot change when resuming; only "
                              f"{', '.join('--' + k for k in sorted(RESUMABLE_OVERRIDES))} may")
        overrides = {k: v for k, v in config_values(args).items()}
        if overrides:
            types = field_types()
            from ..config import _coerce

            overrides = {k: _coerce(k, v, types[k]) for k, v in overrides.items()}
        from ..train import train

        run = train(resume=args.resume, **overrides)
    else:
        cfg = resolve_config(args)
        from ..train import train

        run = train(cfg, overwrite=args.overwrite)
    _print_result(run.path, run.summary)
    return 0 if run.summary["status"] == "completed" else 1


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_result(path, s: dict[str, Any]) -> None:
    pm = s.get("primary_metric", "test_mse")
    solved = s.get("solved_step")
    thr = s.get("solved_threshold")
    # formatted in full before printing: a damaged summary fails before any half-printed report
    text = "\n".join([
        f"run stored in {path}",
        f"  status {s['status']}" + (f" ({s['reason']})" if s.get("reason") else "")
        + f", {s['steps']}/{s['total_steps']} steps, {s['wall_time_s']:.1f} s, engine {s.get('engine')}",
        f"  final {pm} {_fmt(s.get('final_' + pm))}, best {_fmt(s.get('best_' + pm))} at step {s.get('best_step')}, "
        f"constant-prediction baseline {_fmt(s.get('baseline_' + pm))}",
        f"  {pm} {'<' if pm != 'test_acc' else '>'} {thr}: "
        + (f"reached at step {solved}" if solved is not None else "not reached")
        + _guard_text(s),
    ])
    print(text)


def _guard_text(s: dict[str, Any]) -> str:
    """``; guard: 2 rollbacks (480 batches skipped), 1 spike absorbed``, or nothing when it never acted."""
    rollbacks = s.get("guard_interventions", s.get("divergences")) or 0  # "divergences": summaries of older runs
    absorbed, skipped = s.get("spikes_absorbed") or 0, s.get("skipped_batches") or 0
    parts = []
    if rollbacks:
        parts.append(f"{rollbacks} rollback{'s' * (rollbacks != 1)}"
                     + (f" ({skipped:,} batches skipped)" if skipped else ""))
    if absorbed:
        parts.append(f"{absorbed} spike{'s' * (absorbed != 1)} absorbed")
    return f"; guard: {', '.join(parts)}" if parts else ""


def cmd_show(args: argparse.Namespace) -> int:
    from ..runs import RunDir

    run = RunDir.open(args.run)
    summary = run.read_summary()
    if summary is None:
        raise ConfigError(f"{args.run!r} has no readable summary.json (never started, or the file is damaged)")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    cfg = run.read_config()
    try:
        _print_result(run.path, summary)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{run.summary_path}: not an irnn summary (missing or malformed fields)") from None
    print(f"  config: task={cfg.task} T={cfg.seq_len} model={cfg.model} hidden={cfg.hidden_size} "
          f"init_scale={cfg.init_scale} optimizer={cfg.optimizer} lr={cfg.lr} clip_norm={cfg.clip_norm} "
          f"batch={cfg.batch_size} seed={cfg.seed}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="irnn", description="Train IRNNs (Le, Jaitly & Hinton 2015) and their baselines on "
                     "long-range memory benchmarks, and reproduce the paper's study.")
    parser.add_argument("--version", action="version", version=f"irnn {__import__('irnn').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train one model (alone: the quick preset, an IRNN on the adding problem)",
                       description="Train one model. Presets (--preset) are named overrides: "
                       + "; ".join(f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in PRESETS.items())
                       + ". With no options the quick preset runs. Precedence: preset < --config file < flags.")
    p.add_argument("--config", metavar="FILE", help="TOML or YAML file of config keys")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name")
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("show", help="print a run's summary", description="Print a run's summary and config.")
    p.add_argument("run", metavar="RUN", help="a run folder")
    p.add_argument("--json", action="store_true", help="print summary.json as it is")
    p.set_defaults(func=cmd_show)

    _add_experiment_commands(sub)
    return parser


def _add_experiment_commands(sub) -> None:
    from .experiments import add_commands

    add_commands(sub)


def _terminate(signum, frame) -> None:
    """SIGTERM (cluster schedulers, `kill`) stops training like Ctrl-C: summary saved, run resumable."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise KeyboardInterrupt("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a worker thread): leave signals alone
        previous = None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # the parser lists the registered models: it imports IRNN_PLUGINS, which may fail (RegistryError)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USAGE
        args.argv = argv  # to say how to continue after an error
        return int(args.func(args) or 0)
    except (UsageError, ConfigError, RegistryError) as e:
        print(f"{e}" if str(e).startswith(("irnn:", "irnn ")) else f"irnn: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        # Interrupted (from the training loop) names the step and the run to resume.
        print(f"irnn: interrupted by {e}" if str(e) else "irnn: interrupted by SIGINT", file=sys.stderr)
        return 143 if str(e).startswith("SIGTERM") else 130
    except OSError as e:
        # A started run continues with --resume; anything else (a new run that could not start) is
        # the same command again.
        run = getattr(e, "run", None)
        line = storage_error_line(e, f"irnn train --resume {shlex.quote(str(run))}" if run else command_line(argv))
        if line is None:
            raise
        print(line, file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
