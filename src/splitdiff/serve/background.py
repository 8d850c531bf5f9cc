"""A loop on a daemon thread, woken through one condition: the engine's and the admission's life."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Subclasses implement `_loop`, which returns once `_stopping` is set; `stop` sets it and waits."""

    thread_name = "splitdiff-loop"

    def __init__(self):
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _halt(self, timeout: float) -> None:
        """Tell the loop to stop and wait for it (not from the loop's own thread)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError
