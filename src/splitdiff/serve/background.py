"""A loop woken through one condition, on a daemon thread or the caller's: the engine's and the admission's life."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Subclasses implement `_loop`, which returns once `_stopping` is set; `stop` sets it and waits."""

    thread_name = "splitdiff-loop"

    def __init__(self):
        self._cv = threading.Condition()
        self._stopping = False
        self._runner: threading.Thread | None = None  # the thread that runs (or will run) the loop
        self._finished = threading.Event()

    @property
    def alive(self) -> bool:
        return self._runner is not None and not self._finished.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        """Run the loop on a daemon thread, unless a thread has claimed it (`claim`)."""
        if self._runner is None:
            self._runner = threading.Thread(target=self._run_loop, name=self.thread_name, daemon=True)
            self._runner.start()

    def claim(self) -> None:
        """The calling thread will run the loop (`run_here`); `start` then starts no thread."""
        self._runner = threading.current_thread()

    def run_here(self) -> None:
        """Run the loop in the calling thread (which claimed it) until it is stopped."""
        if self._runner is not threading.current_thread():
            raise RuntimeError("run_here needs the loop claimed by this thread")
        self._run_loop()

    def _run_loop(self) -> None:
        try:
            self._loop()
        finally:
            self._finished.set()

    def _halt(self, timeout: float) -> None:
        """Tell the loop to stop and wait for it (not from the loop's own thread)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._runner is not None and self._runner is not threading.current_thread():
            self._finished.wait(timeout)

    def _loop(self) -> None:
        raise NotImplementedError
