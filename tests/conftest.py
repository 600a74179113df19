"""Process-wide state that one test must not leak into the next."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _subnormal_floats():
    """A Trainer built in this process turns on flush-to-zero (fast ReLU-RNN gradients), which lasts for
    the process; hypothesis refuses to generate floats under it, so every test starts without it."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session", autouse=True)
def _built_engines():
    """Build the C++ engines once, in this process, before any test: a cold build takes minutes on a
    slow 2-core CPU, and a test that starts a subprocess (a benchmark script, the CLI) would otherwise
    spend its own timeout compiling. The subprocesses then load the cached build."""
    from irnn.engine import fused, fused_gates, indrnn

    for engine in (fused, fused_gates, indrnn):
        engine._EXT.available()
    yield
