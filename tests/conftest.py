"""Shared test setup.

Lessons read `MVAE_SMOKE` for the default of their `smoke` parameter; setting it here (before any kernel
starts) makes both the papermill runs of tests/test_notebooks.py and nbval's runs of notebooks/ quick.
Set MVAE_SMOKE=0 to test the notebooks with their full defaults instead.
"""

import os

os.environ.setdefault("MVAE_SMOKE", "1")
