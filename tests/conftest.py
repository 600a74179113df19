"""Process-wide state that one test must not leak into the next, and the C++ engines built before any test."""
import subprocess
import sys

import pytest
import torch

ENGINES = ("fused", "fused_gates", "indrnn")


def pytest_configure(config):
    """Build the three C++ engines side by side, once, before pytest-xdist starts its workers (the
    controller runs this; a worker has ``workerinput``). Built one after another, in whichever worker
    asks first while the other waits on torch's build lock, a cold build took ~95 s of a 2-core CI
    run; in parallel it takes about as long as the slowest (~40 s here). A failed build is not an
    error here: the session fixture below loads each engine again, and a test sees the same warning
    and fallback as a user would."""
    if hasattr(config, "workerinput"):
        return
    procs = [subprocess.Popen([sys.executable, "-c", f"from irnn.engine import {e}; {e}._EXT.available()"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for e in ENGINES]
    for proc in procs:
        proc.wait()


@pytest.fixture(autouse=True)
def _subnormal_floats():
    """A Trainer built in this process turns on flush-to-zero (fast ReLU-RNN gradients), which lasts for
    the process; hypothesis refuses to generate floats under it, so every test starts without it."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session", autouse=True)
def _built_engines():
    """Load the C++ engines (built by pytest_configure; built here if that failed) before any test: a
    test that starts a subprocess (a benchmark script, the CLI) must not spend its own timeout compiling."""
    import importlib

    for name in ENGINES:
        importlib.import_module(f"irnn.engine.{name}")._EXT.available()
    yield
