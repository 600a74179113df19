"""Experiments: sweeps (local and Ray backends), the paper's studies, aggregation, figures and reports.

    >>> from irnn.experiments import sweep, reproduce
    >>> table = sweep({"seq_len": [50, 100], "seed": [0, 1, 2]}, name="s1", base={"steps": 3000})  # doctest: +SKIP
    >>> report = reproduce("adding", preset="seed", budget="quick")  # doctest: +SKIP
    >>> report = reproduce("mnist", budget="quick")  # doctest: +SKIP

This room imports the trainer, the results, the run store and the config; nothing below imports it.
"""
from ..results import Table, collect, load_run, steps_to_threshold
from .reproduce import reproduce, study_spec, write_report
from .sweep import MemberBusy, Sweep, SweepSpec, create, expand, load_spec, open_sweep, parse_spec, run_member, run_sweep, sweep

__all__ = ["sweep", "run_sweep", "run_member", "reproduce", "study_spec", "write_report", "Sweep", "SweepSpec",
           "MemberBusy", "create", "open_sweep", "expand", "parse_spec", "load_spec", "Table", "collect", "load_run",
           "steps_to_threshold"]
