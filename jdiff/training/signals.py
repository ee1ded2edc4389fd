"""Stopping cleanly: SIGTERM/SIGINT set a flag that the training loop reads between steps."""

import signal
import threading
from typing import Optional


class StopFlag:
    """Set by the signal handlers of `catch_signals`; read by the loop between steps."""

    def __init__(self):
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


class catch_signals:
    """Context manager: SIGTERM/SIGINT set `flag` instead of killing the process; a second SIGINT raises
    KeyboardInterrupt. Handlers are only installed in the main thread and restored on exit."""

    def __init__(self, flag: StopFlag):
        self.flag, self._old = flag, {}

    def _handle(self, signum, frame):
        if self.flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag.request(signal.Signals(signum).name)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self.flag

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
