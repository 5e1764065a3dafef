"""One rank-aware logger and rank-0 progress bars.

Only rank 0 prints info lines; warnings and errors print on every rank, prefixed with the
rank, since a failure on rank 5 must not be silent. Progress bars show only on rank 0 and
only on an interactive terminal unless forced ("on") or disabled ("off", for batch jobs).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_RANK = 0
logger = logging.getLogger("lorif_dist")


def process_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time, not the one at setup: a process that
    redirects stderr later (a notebook, a test harness) keeps getting the log lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _RANK
        return _RANK == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int | None = None, level: int = logging.INFO) -> logging.Logger:
    global _RANK
    _RANK = process_rank() if rank is None else rank
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(
            logging.Formatter("[lorif %(asctime)s r%(rank)s] %(message)s", "%H:%M:%S")
        )
        handler.addFilter(_RankFilter())
        logger.addHandler(handler)
        logger.propagate = False
    # LORIF_LOG_LEVEL=DEBUG adds one line per batch and per written part (resume forensics).
    logger.setLevel(os.environ.get("LORIF_LOG_LEVEL", "").upper() or level)
    return logger


def progress(
    items: Iterable[T], total: int | None, desc: str, mode: str = "auto", unit: str = "it"
) -> Iterator[T]:
    """A tqdm bar on rank 0 (interactive terminals only under "auto"), else the items."""
    show = _RANK == 0 and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} TiB"


def summary(stage: str, **fields: Any) -> str:
    """One line per stage: `extract done: examples=1090 tokens=211716 ...`."""
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        parts.append(f"{key}={value}")
    line = f"{stage} done: " + " ".join(parts)
    logger.info(line)
    return line
