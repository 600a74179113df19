"""The Ray backend of sweeps: each member is a Ray Tune trial, on a local Ray or an existing cluster.

A trial calls :func:`irnn.experiments.sweep.run_member`, the same unit of work as
the local backend, so it writes the same run folder and the figures, tables and
verdict come out the same. A trial whose member fails (an exception, a killed
worker) is retried by Ray Tune up to ``max_failures`` times and resumes from the
member's last checkpoint; a member that already finished is not trained again.

On a cluster of several machines the sweep folder must be on a filesystem that
every node sees (NFS, a shared volume), and ``irnn`` must be installed on every
node: the trials write the run folders there.

    >>> from irnn.experiments.ray_backend import run_members
    >>> run_members("runs/my-sweep", ["irnn-150__s0", "irnn-150__s1"])  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import json
import numbers
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from ..config import ConfigError
from ..runs.store import RunDir

INSTALL_HINT = '--backend ray needs ray: pip install "irnn[ray]"'
ATTEMPTS = "attempts.jsonl"
# Local runs start their own private Ray; these apply to it (and to its trials) only.
_LOCAL_ENV = {"RAY_AUTH_MODE": "disabled"}  # no token needed for a cluster only this process uses
_TRIAL_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}  # trials keep the driver's working directory (relative paths work)
_DRIVER_ENV = {"RAY_AIR_NEW_OUTPUT": "0"}  # with verbose=0: no Tune status tables (echo prints one line per member)


def _plugin_env() -> dict[str, str]:
    """Models and tasks registered from outside the package, for the trials (irnn.registry)."""
    from .. import registry

    modules = registry.plugin_modules()
    return {"IRNN_PLUGINS": ",".join(modules)} if modules else {}


def _import_ray():
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray, tune


def _metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports: the summary's numbers and its status."""
    out: dict[str, Any] = {k: v for k, v in summary.items()
                           if isinstance(v, numbers.Real) and not isinstance(v, bool)}
    out["status"] = str(summary.get("status"))
    out["member"] = str(summary.get("name"))
    out["primary_metric"] = str(summary.get("primary_metric", "test_mse"))
    return out


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: train (or resume, or just read) sweep members, then report their summaries.

    ``config["names"]`` holds one member, or several that differ only in seed: those are
    trained together by the sweep's work loop (one ``train_many`` call, which may stack
    them as one ensemble).
    """
    from ray import tune

    from .sweep import FINISHED, open_sweep, run_member, work_loop

    sweep_dir, names = config["sweep_dir"], list(config["names"])
    _note_attempt(Path(sweep_dir), names)
    if len(names) == 1:
        summaries = [run_member(sweep_dir, names[0], wait=True)]
    else:
        work_loop(open_sweep(sweep_dir), names)
        summaries = [run_member(sweep_dir, n, wait=True) for n in names]  # reads finished ones, retries none
    failed = [s for s in summaries if s.get("status") not in FINISHED]
    if failed:
        # Raising hands the trial to Ray's fault tolerance: it is retried up to max_failures times.
        s = failed[0]
        raise RuntimeError(f"member {s.get('name')!r} ended {s.get('status')!r}: {s.get('reason')}")
    for s in summaries:
        tune.report(_metrics(s))


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables that are not set already, and put everything back afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _trial_groups(sweep_dir: Path, names: Sequence[str], group_seeds: bool) -> list[list[str]]:
    if not group_seeds:
        return [[n] for n in names]
    from ..config import setting_key
    from .sweep import open_sweep

    sweep = open_sweep(sweep_dir)
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(setting_key(sweep.configs[n]), []).append(n)
    return list(groups.values())


def run_members(sweep_dir: str | os.PathLike, names: Sequence[str], *, address: Optional[str] = None,
                num_cpus: Optional[int] = None, max_failures: int = 2, cpus_per_trial: float = 1,
                gpus_per_trial: float = 0, group_seeds: bool = False, echo: bool = False) -> dict[str, dict[str, Any]]:
    """Train sweep members as Ray Tune trials and return each member's summary.

    Args:
        sweep_dir: the sweep folder (``<out>/<name>``, made by :func:`irnn.experiments.sweep.create`).
        names: the members to run; finished ones are read, not trained again.
        address: an existing Ray cluster (``auto``, ``ray://host:10001``, ``host:6379``); default: start a
            private local Ray for this call and shut it down afterwards.
        num_cpus: CPUs of the local Ray (default: all of this machine's).
        max_failures: retries of a failed trial (Ray Tune ``FailureConfig``); it resumes from its checkpoint.
        cpus_per_trial, gpus_per_trial: the resources one trial claims.
        group_seeds: one trial per setting (its seeds trained together, possibly as one ensemble)
            instead of one per member.
        echo: print one line per finished trial.

    Returns:
        ``{member name: summary}`` read from the run folders (the source of truth), failed ones included.
    """
    ray, tune = _import_ray()
    sweep_dir = Path(sweep_dir).resolve()  # trials may run elsewhere: give them an absolute path
    names = list(names)
    if not names:
        return {}
    groups = _trial_groups(sweep_dir, names, group_seeds)
    started_here = False
    env = {**_TRIAL_ENV, **_DRIVER_ENV, **({} if address else _LOCAL_ENV)}
    with _environ(env):
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="warning", log_to_driver=echo,
                                          runtime_env={"env_vars": {**_TRIAL_ENV, **_plugin_env()}})
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
            started_here = True
        try:
            trainable = tune.with_resources(_trial, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
            tuner = tune.Tuner(
                trainable,
                param_space={"sweep_dir": str(sweep_dir), "names": tune.grid_search(groups)},
                tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
                run_config=tune.RunConfig(
                    name=f"{sweep_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=str(sweep_dir / "ray"),  # Tune's own records stay inside the sweep folder
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    verbose=0, callbacks=[_echo_callback(tune)] if echo else None),
            )
            tuner.fit()  # trial errors are recorded per trial; the run folders say how each member ended
        finally:
            if started_here:
                ray.shutdown()
    return {n: RunDir(sweep_dir / "members" / n).read_summary() or {"name": n, "status": "pending"} for n in names}


def _note_attempt(sweep_dir: Path, names: list[str]) -> None:
    """One line per trial attempt in ``<sweep>/ray/attempts.jsonl``: which host and process ran what, when."""
    line = json.dumps({"names": names, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    try:
        (sweep_dir / "ray").mkdir(exist_ok=True)
        with open(sweep_dir / "ray" / ATTEMPTS, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")  # one short append: whole lines even from concurrent trials
    except OSError:
        pass  # a record of attempts is no reason to fail a trial


def _echo_callback(tune):
    """A Tune callback that prints one line per finished or failed trial."""

    class EchoCallback(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            from .sweep import format_member_line

            print(format_member_line(str(result.get("member")), {
                "state": result.get("status"), "final": result.get(f"final_{result.get('primary_metric', 'test_mse')}"),
                "solved_step": result.get("solved_step"), "wall_time_s": result.get("wall_time_s")}), flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"error     {' '.join(trial.config.get('names', []))} (Ray Tune retries the trial while "
                  f"max_failures allows; the member resumes from its checkpoint)", flush=True)

    return EchoCallback()
