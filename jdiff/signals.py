"""Stopping cleanly: SIGTERM/SIGINT set a flag that the training loop reads between steps (standard library
only, so that a command line can install it before anything heavy is imported).

`signal_point(phase)` marks the start-up phases where an interrupt must be honoured ("import" in train.py,
"setup" and "compile" in `jdiff.training.train`); with the environment variable JDIFF_TEST_SIGNAL_AT=PHASE[:N]
the process sends itself N SIGINTs there (default 1), so that tests interrupt a named phase deterministically
instead of after a sleep. Unset (always, outside tests) it does nothing."""

import os
import signal
import threading
from typing import Callable, Optional

SIGNAL_AT_ENV = "JDIFF_TEST_SIGNAL_AT"


def signal_point(phase: str) -> None:
    """Sends this process N SIGINTs when JDIFF_TEST_SIGNAL_AT is `phase` or `phase:N` (a test hook, see above)."""
    name, _, count = os.environ.get(SIGNAL_AT_ENV, "").partition(":")
    if name == phase:
        for _ in range(int(count or 1)):
            os.kill(os.getpid(), signal.SIGINT)


class StopFlag:
    """Set by the signal handlers of `SignalCatcher`; read by the loop between steps."""

    def __init__(self):
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


class SignalCatcher:
    """Context manager: SIGTERM/SIGINT set `flag` instead of killing the process; a second SIGINT calls
    `on_second()` (default: raise KeyboardInterrupt). Handlers are only installed in the main thread and
    restored on exit.

    With `on_second` (a command line's immediate exit), signals are also watched from a thread through
    `signal.set_wakeup_fd`: Python runs its handlers only between bytecodes, so during a long C call (XLA
    compiling) two Ctrl-C would otherwise reach the handler as one, late. The watcher sees each delivery at
    once, sets the flag and calls `on_second` on the second SIGINT.
    """

    def __init__(self, flag: StopFlag, on_second: Optional[Callable[[], None]] = None):
        self.flag, self._old, self._on_second = flag, {}, on_second
        self._pipe = self._old_fd = None

    def _handle(self, signum, frame):
        if self._pipe is not None:
            return  # the watcher thread counts the deliveries
        if self.flag.requested and signum == signal.SIGINT:
            if self._on_second is not None:
                self._on_second()
            raise KeyboardInterrupt
        self.flag.request(signal.Signals(signum).name)

    def _watch(self, fd: int) -> None:
        while data := os.read(fd, 64):
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                if self.flag.requested and signum == signal.SIGINT:
                    self._on_second()
                self.flag.request(signal.Signals(signum).name)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
            if self._on_second is not None:
                self._pipe = os.pipe()
                os.set_blocking(self._pipe[1], False)
                self._old_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
                threading.Thread(target=self._watch, args=(self._pipe[0],), daemon=True, name="jdiff-signals").start()
        return self.flag

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._pipe[1])  # the watcher reads EOF and ends
            self._pipe = None
