"""The status lines of a training run (the summary, where the report went): one per run, not one per rank.

They go through the `xtf_plugin.status` logger, which has a handler of its own (stderr, the bare message), so
they show with TRL's and axolotl's default logging as the trainer's own lines do. Processes other than the
main one emit warnings and errors only; `XTF_VERBOSITY=debug` adds one debug line per rank with its share of
the work. `XTF_VERBOSITY` (`debug`, `info`, the default, `warning`, `error`) sets the level.
"""

from __future__ import annotations

import logging
import os
import sys


class _MainProcessOnly(logging.Filter):
    """Every record of the main process; of the others, warnings, errors and (per-rank) debug records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or record.levelno < logging.INFO:
            return True
        from xtf_plugin.distributed import is_main_process  # (torch: already imported by whoever logs status)

        return is_main_process()


def status_logger() -> logging.Logger:
    """The `xtf_plugin.status` logger, configured on first use."""
    logger = logging.getLogger("xtf_plugin.status")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_MainProcessOnly())
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("XTF_VERBOSITY", "info").upper())
        logger.propagate = False
    return logger
