"""Prefetch threads: a reader thread walks the clip groups, a worker pool builds batches from them, in order.

The reader runs ahead by at most ``depth`` batches. With no workers everything happens in the consuming thread
when it asks for the next batch. An error of the reader (a lost store, no usable data) is raised in the
consuming thread, where the batch it would have made is awaited. ``priority="idle"`` runs the reader and the
workers under Linux's ``SCHED_IDLE``: on cores the training step keeps busy they take only the time it leaves.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def lower_input_priority(*_args) -> None:
    """Put the calling thread (or process) under ``SCHED_IDLE``: it runs only when its core has nothing else to
    run. Lowering one's own priority needs no privilege. (Also a DataLoader ``worker_init_fn``.)"""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class Prefetcher:
    """Reader thread + worker pool over ``groups`` (pairs of (group, state)); :meth:`get` returns, strictly in
    order, ``(job(group), state)``."""

    def __init__(
        self,
        groups: Iterator[tuple[Any, Any]],
        job: Callable[[Any], Any],
        workers: int,
        depth: int,
        priority: str = "normal",
    ):
        self.job = job
        self.idle = priority == "idle"
        init = lower_input_priority if self.idle else None
        self.pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch", initializer=init)
            if workers
            else None
        )
        self.inline = None
        self.futures: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        if self.pool is None:
            self.inline = groups  # num_workers=0: everything in the consuming thread
            self.thread = None
        else:
            self.thread = threading.Thread(target=self._read, args=(groups,), name="clip-reader", daemon=True)
            self.thread.start()

    def _read(self, groups) -> None:
        if self.idle:
            lower_input_priority()
        try:
            for group, state in groups:
                future = self.pool.submit(self.job, group)
                while not self._stop.is_set():
                    try:
                        self.futures.put((future, state), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as err:  # surface reader errors (bad store, no data) in the consuming thread
            failed: Future = Future()
            failed.set_exception(err)
            self.futures.put((failed, None))

    def get(self) -> tuple[Any, Any]:
        if self.inline is not None:
            group, state = next(self.inline)
            return self.job(group), state
        future, state = self.futures.get()
        return future.result(), state

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            while self.thread.is_alive():
                try:
                    self.futures.get_nowait()
                except queue.Empty:
                    self.thread.join(timeout=0.05)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
