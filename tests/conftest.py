"""Shared test setup.

Lessons read `MVAE_SMOKE` for the default of their `smoke` parameter; setting it here (before any kernel
starts) makes both the papermill runs of tests/test_notebooks.py and nbval's runs of notebooks/ quick.
Set MVAE_SMOKE=0 to test the notebooks with their full defaults instead. MVAE_TEXT_PROGRESS=1 gives nbval's
kernels the text progress bars of the course runner's (mvae_course/progress.py), not ipywidgets.
"""

import os

import pytest
import torch

os.environ.setdefault("MVAE_SMOKE", "1")
os.environ.setdefault("MVAE_TEXT_PROGRESS", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one torch thread (several thrash when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

