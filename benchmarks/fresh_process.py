"""Run one benchmark job in a fresh (spawned) process, so its peak RSS is its own.

The job function receives a queue first and must put ``(wall_s, cpu_s, peak_mb, extra)``.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def run_in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result
