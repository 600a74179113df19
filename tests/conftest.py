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
