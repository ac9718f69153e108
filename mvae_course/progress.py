"""Progress bars: widgets in JupyterLab, text in a terminal and in the kernels the course runner starts.

`tqdm.auto` draws an ipywidgets bar whenever code runs in a Jupyter kernel. That suits a learner in JupyterLab;
in a kernel that the course runner or the tests drive nobody sees a widget, while a text bar is saved in the
notebook (and so shown on its HTML page) and streamed to the runner's terminal. Those kernels set
`MVAE_TEXT_PROGRESS=1` (see mvae_course/kernels.py).
"""

from __future__ import annotations

import os

TEXT_PROGRESS = "MVAE_TEXT_PROGRESS"

if os.environ.get(TEXT_PROGRESS) == "1":
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["TEXT_PROGRESS", "tqdm"]
