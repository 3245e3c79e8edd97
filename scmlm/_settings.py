"""Global settings, as in ``scanpy.settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class _Settings:
    """Package-wide defaults.

    Attributes
    ----------
    n_jobs
        Worker processes for per-gene fits when a function gets ``n_jobs=None``. ``-1`` means all cores.
    verbosity
        0 silent, 1 warnings and summaries, 2 progress bars.
    chunk_size
        Genes per parallel task.
    """

    n_jobs: int = int(os.environ.get("SCMLM_N_JOBS", "1"))
    verbosity: int = 1
    chunk_size: int = 128


settings = _Settings()
