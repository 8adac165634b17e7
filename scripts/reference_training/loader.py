"""Batches drawn ahead of the training loop in worker processes."""

from __future__ import annotations

import collections
import os
import time


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the training process, which ends the pool


class BatchLoader:
    """Draws the batches of the coming steps in ``workers`` forked processes, ``2 * workers`` steps ahead.

    ``draw(step)`` (picklable: a module-level function or a partial of one; ``_loader_batch`` for the
    denoisers, ``_vae_loader_batch`` for the VAEs) makes step k's batch from (seed, k) alone, so the data
    does not depend on the number of workers. The pool is forked before this process touches the GPU; the
    workers never use torch. A ``ProcessPoolExecutor``, not a ``multiprocessing.Pool``: a worker that dies
    (killed for memory, a crash in a native library) then fails the step with ``BrokenProcessPool`` instead
    of leaving the training loop waiting for ever on a task the dead worker took with it.
    """

    def __init__(self, draw, first_step: int, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.draw = draw
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_ignore_sigint)
        self.step = first_step
        self.pending: collections.deque = collections.deque()
        self.wait = 0.0  # seconds the training loop waited for data
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        self.pending.append((self.step, self.pool.submit(self.draw, self.step)))
        self.step += 1

    def get(self):
        from concurrent.futures.process import BrokenProcessPool

        t = time.time()
        step, future = self.pending.popleft()
        try:
            result = future.result()
        except BrokenProcessPool as error:
            raise RuntimeError(f"a data worker died while drawing step {step}'s batch (killed for memory? "
                               f"rerun with fewer --workers, or 0 to draw in this process)") from error
        self.wait += time.time() - t
        self._submit()
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    """Batch workers on a GPU machine: every core but three (the training process, its threads, the OS)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 4
    return max(1, min(14, cores - 3))
