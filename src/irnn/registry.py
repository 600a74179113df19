"""What models and tasks exist: their names, their options, their defaults and how to build them.

A model or a task is one entry here: a :class:`ModelSpec` or :class:`TaskSpec` that names it, declares
the config options it adds (with defaults and docs), and points at the function that builds it. Every
part of irnn that needs to know the models or tasks asks this room: the config's validation, the
command line's options, the engines' choice, the run names, the tables, the figures, the benchmark.

This is the bottom room and imports no torch: the command line checks a model's name and lists its
options without loading torch (about 1.5 s). The built-in entries are declared at the end of this file
with their builders as ``"module:function"`` strings, imported on first use. A model from outside the
package registers itself with :func:`register_model` (or :func:`register_task`) when its module is
imported; ``IRNN_PLUGINS=mod1,mod2`` (modules or ``.py`` files) and the ``irnn.plugins`` entry-point
group import such modules for ``irnn`` commands and for sweep workers.

    >>> from irnn.registry import ModelSpec, Option, register_model
    >>> register_model(ModelSpec("my-rnn", "mypkg.models:build", label="My RNN",
    ...                          options=(Option("my_gain", 1.0, "recurrent gain"),)))  # doctest: +SKIP

A builder is ``build(cfg, input_size, output_size, per_step) -> nn.Module`` for a model (``per_step``:
the task reads out every time step, so the module returns ``[B, T, out]`` instead of ``[B, out]``) and
``build(cfg, device) -> Task`` for a task. Option values reach the builder as ``cfg.options[name]``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Union

Builder = Union[str, Callable[..., Any]]


class RegistryError(ValueError):
    """An unknown name or a bad entry; the config reports it as a ConfigError (one line, exit 2)."""


@dataclass(frozen=True)
class Option:
    """One config option a model or task adds: ``--name`` on the command line, ``cfg.options[name]``."""

    name: str  # a Python identifier; its flag is --name-with-dashes
    default: Any
    doc: str
    type: type = float  # float, int, str or bool
    choices: tuple = ()
    minimum: float | None = None  # inclusive

    def check(self, value: Any) -> Any:
        """``value`` converted to the option's type and checked; a RegistryError names the option."""
        t = self.type
        try:
            if t is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                        raise ValueError
                    value = value.lower() in ("true", "1", "yes", "on")
                elif not isinstance(value, bool):
                    raise ValueError
            elif t is int:
                if isinstance(value, (bool, float)):
                    raise ValueError
                value = int(value.replace("_", "")) if isinstance(value, str) else int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError
            elif t is str:
                if not isinstance(value, str):
                    raise ValueError
        except (ValueError, TypeError, OverflowError):
            kind = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}[t]
            raise RegistryError(f"{self.name} must be {kind}, got {value!r}") from None
        if self.choices and value not in self.choices:
            raise RegistryError(f"unknown {self.name} {value!r}; choose one of: {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise RegistryError(f"{self.name} must be >= {self.minimum}, got {value}")
        return value


@dataclass(frozen=True)
class ModelSpec:
    """A model: ``build(cfg, input_size, output_size, per_step) -> nn.Module``."""

    name: str
    build: Builder
    label: str = ""  # the name in tables and legends (default: the name)
    doc: str = ""  # one line for --help
    options: tuple[Option, ...] = ()
    hparams: tuple[str, ...] = ()  # config fields or options the tables show for it
    color: str | None = None
    step_cost: float = 1.0  # a training step's cost relative to the IRNN's (sweeps schedule long runs first)
    builtin: bool = False

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class TaskSpec:
    """A task: ``build(cfg, device) -> irnn.tasks.Task``."""

    name: str
    build: Builder
    label: str = ""
    doc: str = ""
    options: tuple[Option, ...] = ()
    # the time steps of a config's sequences without loading data; None: cfg.seq_len
    sequence_length: Callable[[Any], int] | None = None
    by_length: bool = True  # runs and tables are keyed by seq_len (adding-150, copy-200) or not (mnist)
    per_step: bool = False  # a target at every time step (the model reads out every state), not only the last
    builtin: bool = False

    @property
    def title(self) -> str:
        return self.label or self.name


_MODELS: dict[str, ModelSpec] = {}
_TASKS: dict[str, TaskSpec] = {}
_PLUGINS_LOADED = False


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise RegistryError(f"a {kind} name is letters, digits, '-' and '_', got {name!r}")


# Names an option may not take: the config's own fields (irnn.config adds them when it is imported).
RESERVED: set[str] = set()


def _check_options(owner: str, options: tuple[Option, ...]) -> None:
    for o in options:
        if not o.name.isidentifier() or o.name in RESERVED:
            raise RegistryError(f"{owner}: option {o.name!r} must be a Python identifier that is not a Config field")
        clash = next((s.name for s in (*_MODELS.values(), *_TASKS.values()) if s.name != owner
                      and any(p.name == o.name for p in s.options)), None)
        if clash is not None:
            raise RegistryError(f"{owner}: option {o.name!r} is already {clash}'s")
        o.check(o.default)


def _register(table: dict, kind: str, spec, replace: bool):
    _check_name(spec.name, kind)
    if spec.name in table and not replace and table[spec.name] != spec:
        raise RegistryError(f"{kind} {spec.name!r} is already registered (pass replace=True to redefine it)")
    _check_options(spec.name, spec.options)
    table[spec.name] = spec
    return spec


def register_model(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Make ``spec`` known to every command; ``replace`` allows redefining a name (a notebook re-run)."""
    return _register(_MODELS, "model", spec, replace)


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Make ``spec`` known to every command; ``replace`` allows redefining a name."""
    return _register(_TASKS, "task", spec, replace)


def load_plugins() -> None:
    """Import the modules named by ``IRNN_PLUGINS`` and the ``irnn.plugins`` entry points, once."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ref in filter(None, (s.strip() for s in os.environ.get("IRNN_PLUGINS", "").split(","))):
        import_plugin(ref)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="irnn.plugins"):
            ep.load()
    except Exception as e:  # noqa: BLE001 - a broken third-party plugin must not hide the built-ins
        print(f"irnn: warning: an irnn.plugins entry point failed to load ({type(e).__name__}: {e})", file=sys.stderr)


def import_plugin(ref: str) -> None:
    """Import a plugin: a module name (``mypkg.models``) or a path to a ``.py`` file."""
    try:
        if ref.endswith(".py"):
            name = "irnn_plugin_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(ref))
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, ref)
            if spec is None or not os.path.isfile(ref):
                raise RegistryError(f"IRNN_PLUGINS: no such file {ref!r}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            importlib.import_module(ref)
    except RegistryError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken plugin is the user's input: one line, not a traceback
        raise RegistryError(f"IRNN_PLUGINS: cannot import {ref!r} ({type(e).__name__}: {e})") from None


def plugin_modules() -> list[str]:
    """The importable modules that registered entries, for worker processes (``IRNN_PLUGINS``)."""
    out = [r for r in filter(None, (s.strip() for s in os.environ.get("IRNN_PLUGINS", "").split(",")))]
    for spec in (*_MODELS.values(), *_TASKS.values()):
        if spec.builtin:
            continue
        module = spec.build.split(":")[0] if isinstance(spec.build, str) else getattr(spec.build, "__module__", None)
        path = getattr(sys.modules.get(module or ""), "__file__", None)
        if module and module.startswith("irnn_plugin_") and path:
            module = path  # a plugin loaded from a file goes to the workers as that file
        if module and module != "__main__" and module not in out:
            out.append(module)
    return out


def model_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_MODELS)


def task_names() -> tuple[str, ...]:
    load_plugins()
    return tuple(_TASKS)


def model_spec(name: str) -> ModelSpec:
    load_plugins()
    if name not in _MODELS:
        raise RegistryError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    return _MODELS[name]


def task_spec(name: str) -> TaskSpec:
    load_plugins()
    if name not in _TASKS:
        raise RegistryError(f"unknown task {name!r}; choose one of: {', '.join(_TASKS)}")
    return _TASKS[name]


def all_options() -> dict[str, tuple[str, str, Option]]:
    """Every registered option: its name -> ("model" or "task", owner, Option)."""
    load_plugins()
    out: dict[str, tuple[str, str, Option]] = {}
    for kind, specs in (("model", _MODELS), ("task", _TASKS)):
        for s in specs.values():
            for o in s.options:
                out[o.name] = (kind, s.name, o)
    return out


def resolve(builder: Builder) -> Callable[..., Any]:
    """The callable a builder names."""
    if callable(builder):
        return builder
    module, _, attr = builder.partition(":")
    return getattr(importlib.import_module(module), attr)


def option(cfg: Any, name: str) -> Any:
    """``cfg.options[name]``, or the option's default for a config that was never validated."""
    if name in cfg.options:
        return cfg.options[name]
    opts = all_options()
    if name not in opts:
        raise RegistryError(f"no registered model or task has an option {name!r}")
    return opts[name][2].default


def model_label(name: str) -> str:
    """A model's name in tables; a name no longer registered (an old run) stays as it is."""
    load_plugins()
    return _MODELS[name].title if name in _MODELS else name


def model_color(name: str) -> str | None:
    load_plugins()
    return _MODELS[name].color if name in _MODELS else None


def step_cost(name: str) -> float:
    load_plugins()
    return _MODELS[name].step_cost if name in _MODELS else 1.0


# --- the built-in entries ---------------------------------------------------------------------------------
def _mnist_length(cfg: Any) -> int:
    return 8 * 8 if cfg.data_source == "digits" else 28 * 28


def _copy_length(cfg: Any) -> int:
    return cfg.seq_len + 2 * int(option(cfg, "copy_symbols"))


# step_cost: a training step against the IRNN's, as irnn train runs it (benchmarks/bench_models.py, adding
# T = 200, batch 32, 1 thread, AMD EPYC, 2026-12-04, medians of interleaved repeats in one process)
_REC = "irnn.models.recurrent:build_recurrent"
for _spec in (
    ModelSpec("irnn", _REC, "IRNN", "ReLU RNN, W_hh = init_scale x I (Le et al. 2015)", hparams=("init_scale",),
              color="#d62728"),
    ModelSpec("rnn-relu", _REC, "RNN + ReLU (Gaussian init)", "ReLU RNN, W_hh ~ N(0, recurrent_std^2)",
              hparams=("recurrent_std",), color="#2ca02c"),
    ModelSpec("rnn-tanh", _REC, "RNN + tanh", "tanh RNN, W_hh ~ N(0, recurrent_std^2)", hparams=("recurrent_std",),
              color="#ff7f0e", step_cost=2.6),
    ModelSpec("lstm", _REC, "LSTM", "LSTM, forget-gate bias forget_bias", hparams=("forget_bias",), color="#1f77b4",
              step_cost=8.5),
    ModelSpec("gru", _REC, "GRU", "GRU (PyTorch's initialisation)", color="#9467bd", step_cost=6.0),
    ModelSpec("np-rnn", "irnn.models.successors:build_np_rnn", "np-RNN",
              "ReLU RNN, W_hh = (I + R'R/N) / its largest eigenvalue, R ~ N(0, 1) (Talathi & Vartak 2016)",
              color="#8c564b", step_cost=1.6),
    ModelSpec("rnn-orth", "irnn.models.successors:build_rnn_orth", "RNN (orthogonal init)",
              "RNN with a random orthogonal W_hh (Henaff et al. 2016)", hparams=("orth_nonlinearity",),
              options=(Option("orth_nonlinearity", "relu", "rnn-orth: relu or tanh", str, ("relu", "tanh")),),
              color="#e377c2", step_cost=1.7),
    ModelSpec("exprnn", "irnn.models.exprnn:build_exprnn", "expRNN",
              "W_hh kept orthogonal in training by geotorch, modReLU, Henaff init (Lezcano-Casado & "
              "Martinez-Rubio 2019)", color="#7f7f7f", step_cost=40.0),
    ModelSpec("indrnn", "irnn.models.indrnn:build_indrnn", "IndRNN",
              "h = relu(W x + u * h + b), |u| <= gamma^(1/T) (Li et al. 2018)", hparams=("indrnn_gamma",),
              options=(Option("indrnn_gamma", 2.0, "indrnn: |u| <= gamma^(1/T) over T steps (the paper's 2)",
                              minimum=1.0),), color="#bcbd22", step_cost=1.4),
    ModelSpec("chrono-lstm", "irnn.models.successors:build_chrono_lstm", "chrono-LSTM",
              "LSTM, forget bias log U[1, T_max - 1], input bias its negative (Tallec & Ollivier 2018)",
              hparams=("chrono_tmax",),
              options=(Option("chrono_tmax", 0, "chrono-lstm: T_max of the chrono init (0 = the task's sequence "
                              "length)", int, minimum=0),), color="#17becf", step_cost=8.5),
):
    register_model(_spec.__class__(**{**_spec.__dict__, "builtin": True}))
for _spec in (
    TaskSpec("adding", "irnn.tasks.adding:build", "adding problem", "the sum of two marked numbers (Le et al. 2015)"),
    TaskSpec("mnist", "irnn.tasks.mnist:make_mnist", "pixel MNIST", "MNIST read one pixel a step",
             sequence_length=_mnist_length, by_length=False),
    TaskSpec("pmnist", "irnn.tasks.mnist:make_mnist", "permuted pixel MNIST", "MNIST with a fixed pixel permutation",
             sequence_length=_mnist_length, by_length=False),
    TaskSpec("copy", "irnn.tasks.copy:build", "copy memory",
             "recall copy_symbols symbols after T steps (Arjovsky et al. 2016)", sequence_length=_copy_length,
             options=(Option("copy_symbols", 10, "copy: symbols to recall (the paper's 10)", int, minimum=1),),
             per_step=True),
):
    register_task(_spec.__class__(**{**_spec.__dict__, "builtin": True}))
del _spec
