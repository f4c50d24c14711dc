"""Running a built DALI pipeline on a background thread, a bounded number of batches ahead."""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any

import torch


class _Prefetcher:
    """Runs a built DALI pipeline on a background thread, ``prefetch_queue_depth`` batches ahead.

    The thread owns every call into the pipeline (``run()``: the :class:`_Feeder` callback, the
    scheduling, the wait for the batch), so the consumer's thread only takes finished batches from
    a queue. With DALI prefetch depth D and the consumer holding batch i, batch i+1 is finished and
    waiting here and the feeder has been called up to batch i+D (a semaphore lets the thread start
    batch i+2's ``run()`` only once the consumer has taken i+1). A failure in the thread (a file
    the feeder cannot read, a DALI error) is queued after the batches before it and raised on the
    consumer's thread as is; a thread that ends without either is an error, not a hang.

    The thread references this object, never the loader, so a dropped loader is collected and its
    finalizer stops the thread.
    """

    _POLL_S = 0.05  # how often a waiting side looks at the stop flag / the thread's liveness

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe: Any = pipe
        self.device = device
        self._ready: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._space = threading.Semaphore(1)  # finished batches waiting for the consumer, at most 1
        self._stop = threading.Event()
        # Outputs handed to the consumer: the latest batch's, then earlier ones kept until the
        # consumer's work on them is done (see _hold()).
        self.handed: Any = None
        self._held: collections.deque[tuple[Any, Any]] = collections.deque()
        self.thread = threading.Thread(target=self._loop, name="oodfast-dali-prefetch", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._space.acquire(timeout=self._POLL_S):
                    continue
                if self._stop.is_set():
                    break
                self._ready.put((True, self.pipe.run()))  # host-synchronous: the batch is finished
        except BaseException as e:  # noqa: BLE001 - every failure is the consumer's to raise
            self._ready.put((False, e))

    def get(self) -> tuple[Any, ...]:
        """The next batch's outputs (DALI TensorLists); raises the thread's error in its place.

        Asking for the next batch ends the previous one's views (the loader's contract): its
        outputs go to :meth:`_hold`.
        """
        if self.handed is not None:
            self._hold(self.handed)
            self.handed = None
        while True:
            try:
                ok, value = self._ready.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the DALI prefetch thread ended without a batch or an error") from None
        self._space.release()
        if not ok:
            raise value
        self.handed = value
        return value

    def _hold(self, outputs: Any) -> None:
        """Keep ``outputs`` (the batch just handed out as views) alive until the consumer is done.

        Called when the consumer asks for the next batch, or stops. On CUDA an event recorded on the
        consumer's current stream marks the end of the work it has enqueued on them (e.g. the
        trainer's non-blocking staging copy); the outputs are released, back to DALI's memory pool,
        only once that event has completed, so DALI cannot reuse the memory under a pending read.
        On the CPU every torch op on them has finished when this is called.
        """
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._held.append((event, outputs))
        while self._held and (self._held[0][0] is None or self._held[0][0].query()
                              or len(self._held) > 8):  # 8: a consumer that never waits on the GPU
            ev, _ = self._held.popleft()
            if ev is not None:
                ev.synchronize()  # no-op unless the bound of 8 forced it

    def close(self) -> None:
        """Stop the thread (it finishes a run() in progress), drop queued batches and the pipeline.

        The last batch's outputs are released once the consumer's work enqueued on them is done.
        """
        if self.handed is not None:
            self._hold(self.handed)
            self.handed = None
        self._stop.set()
        self._space.release()  # wake a thread waiting for space
        if self.thread is not threading.current_thread():
            self.thread.join()
        while not self._ready.empty():
            self._ready.get_nowait()
        for event, _ in self._held:
            if event is not None:
                event.synchronize()
        self._held.clear()
        self.pipe = None

