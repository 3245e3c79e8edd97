"""Global settings, as in ``scanpy.settings``, and where scmlm's messages go.

Messages go through the ``scmlm`` logger. A decision a tool takes for the user (a random term added for the unit of
replication, a few-level random term fitted as a fixed effect) is logged at :data:`NOTE`, between INFO and WARNING, so
that it is shown by default: with ``verbosity=1`` the ``scmlm`` logger passes NOTE and above, with 2 also INFO, with 0
only errors. When the application has configured logging (a handler on the root logger: the ``scmlm`` command line,
``logging.basicConfig``, pytest), the records go to its handlers; otherwise (a plain script or notebook) scmlm prints
them to stderr itself as ``scmlm: <message>``, because Python's last-resort handler would drop everything below WARNING.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

NOTE = 25
"""Log level of a model decision taken for the user: shown at the default verbosity (1)."""
logging.addLevelName(NOTE, "NOTE")

_LEVELS = {0: logging.ERROR, 1: NOTE, 2: logging.INFO}


class _StderrUnlessConfigured(logging.Handler):
    """Print ``scmlm: message`` to the current stderr unless the root logger has handlers (they print instead)."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(f"scmlm: {record.getMessage()}\n")
        except Exception:  # noqa: BLE001 - a message must never break a fit
            self.handleError(record)


_logger = logging.getLogger("scmlm")
if not any(isinstance(h, _StderrUnlessConfigured) for h in _logger.handlers):
    _logger.addHandler(_StderrUnlessConfigured())


@dataclass
class _Settings:
    """Package-wide defaults.

    Attributes
    ----------
    n_jobs
        Worker processes for per-gene fits when a function gets ``n_jobs=None``. ``-1`` means all cores.
    verbosity
        0 errors only; 1 (default) warnings, summaries and the model decisions a tool takes for you (logged at
        :data:`NOTE`: a term added for the unit of replication, a few-level random term fitted as fixed); 2 also
        progress bars and INFO messages; 3 debug messages.
    chunk_size
        Genes per parallel task.
    """

    n_jobs: int = int(os.environ.get("SCMLM_N_JOBS", "1"))
    verbosity: int = 1
    chunk_size: int = 128

    def __setattr__(self, name: str, value) -> None:
        object.__setattr__(self, name, value)
        if name == "verbosity":
            v = value if isinstance(value, int) and not isinstance(value, bool) else 1
            _logger.setLevel(_LEVELS.get(v, logging.DEBUG if v > 2 else logging.ERROR))


settings = _Settings()
