"""What every ``irnn`` command shares: the options generated from :class:`irnn.config.Config`, the
one-line errors and exit statuses, and the line that says how to continue after a refused write.

Both ``irnn.cli`` (train, show) and ``irnn.cli.experiments`` (sweep, reproduce, plot) import this; it
imports neither.
"""
from __future__ import annotations

import argparse
import errno
import shlex
from dataclasses import MISSING, fields
from typing import Any, Sequence

from .. import registry
from ..config import Config, field_types, from_dict, load_file

EXIT_USAGE = 2
EXIT_FAILED = 1
# Fields that may change when a run is resumed: they do not alter its trajectory.
RESUMABLE_OVERRIDES = {"quiet", "device", "threads", "steps", "epochs", "track"}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (and exits 2) instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = ()) -> None:
    """One option per Config field; unset options stay absent so that presets and files apply."""
    types = field_types()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(Config):
        if f.name in exclude:
            continue
        doc = f.metadata.get("doc", "")
        hidden = f.metadata.get("hidden", False)
        default = f.default if f.default is not MISSING else None
        group_name = ("task" if f.name in _TASK_FIELDS else "model" if f.name in _MODEL_FIELDS
                      else "optimisation" if f.name in _OPT_FIELDS else "robustness" if f.name in _ROBUST_FIELDS
                      else "run")
        group = groups.setdefault(group_name, parser.add_argument_group(f"{group_name} options"))
        help_text = argparse.SUPPRESS if hidden else f"{doc} (default: {default})"
        if types[f.name] is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            kind = f.metadata.get("registry")  # model or task: whatever irnn.registry knows (plugins too)
            if kind:
                choices = registry.model_names() if kind == "model" else registry.task_names()
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                               help=help_text)
    for name, (kind, owner, opt) in registry.all_options().items():  # what registered models and tasks add
        if name in exclude:
            continue
        group = groups.setdefault(kind, parser.add_argument_group(f"{kind} options"))
        metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else name.upper()
        group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, metavar=metavar,
                           help=f"{opt.doc} (default: {opt.default}; only with {kind} {owner})")


_TASK_FIELDS = {"task", "variant", "seq_len", "train_size", "test_size", "stream", "data_source", "data_dir",
                "download", "perm_seed"}
_MODEL_FIELDS = {"model", "hidden_size", "num_layers", "init_scale", "recurrent_std", "input_std", "forget_bias",
                 "engine"}
_OPT_FIELDS = {"optimizer", "lr", "momentum", "clip_norm", "batch_size", "steps", "epochs", "eval_every", "log_every"}
_ROBUST_FIELDS = {"guard", "guard_factor", "guard_window", "guard_lr_decay", "guard_retries", "ckpt_every",
                  "keep_checkpoints"}
CONFIG_FIELDS = [f.name for f in fields(Config)]


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields given on the command line (raw strings; from_dict converts and checks them)."""
    options = registry.all_options()
    return {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS or k in options}


def resolve_config(args: argparse.Namespace) -> Config:
    """Preset < config file < flags, validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_file(args.config))
    values.update(config_values(args))
    preset = values.pop("preset", None)
    if preset is None and not getattr(args, "config", None):
        preset = "quick"  # `irnn train` alone is the main job
    return from_dict(values, preset=preset)


def storage_error_line(e: OSError, then: str) -> str | None:
    """One line for a file the OS refused to write (disk full, read-only, no permission): the file,
    the cause, and ``then``, the command that continues; None for any other error (a bug: traceback)."""
    from ..runs.store import STORAGE_ERRNOS, WriteError

    if not isinstance(e, WriteError) and e.errno not in STORAGE_ERRNOS:
        return None
    what = "cannot write " if isinstance(e, WriteError) else ""
    where = f"{what}{e.filename}: " if e.filename else what
    cause = e.strerror or str(e)
    fix = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EROFS: "make that filesystem writable",
           errno.EACCES: "allow writing there", errno.EPERM: "allow writing there"}.get(e.errno, "fix this")
    return f"irnn: {where}{cause}; {fix}, then continue with: {then}"


def command_line(argv: Sequence[str], *, drop: Sequence[str] = ()) -> str:
    """``irnn ARGV`` as a shell command, without the flags in ``drop``."""
    return "irnn " + " ".join(shlex.quote(a) for a in argv if a not in drop)
