"""Reading runs back: a run folder as a :class:`Member`, settings over seeds, tables and figures.

It sits just above the run store and looks only down (config, runs): the trackers draw a finished run's
figures with it, and the experiments aggregate whole sweeps and studies with it.
"""
from .aggregate import Member, Table, collect, load_run, steps_to_threshold

__all__ = ["Member", "Table", "collect", "load_run", "steps_to_threshold"]
