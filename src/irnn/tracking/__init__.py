"""Trackers that mirror a run's events to W&B and TensorBoard, and log its figures when it ends.

Above the run store and the results (which draw the figures), below the trainer that drives them.
"""
from .trackers import Tracker, check_trackers, finish_trackers, make_trackers

__all__ = ["Tracker", "check_trackers", "finish_trackers", "make_trackers"]
