"""Worker processes for data work (synthesis, preprocessing)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes started with spawn, not fork: the caller may hold threads
    (torch's, a progress bar's refresh thread) that a forked child would inherit half-way."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
