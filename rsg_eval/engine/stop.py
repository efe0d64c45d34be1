"""Stop at a step boundary on SIGINT / SIGTERM (Ctrl-C, a cluster's preemption, `kill`).

The first signal asks the loop to stop at the next optimizer-step boundary (`StopRequest.requested`); the loop then
saves its resume point and raises `Stopped`, whose exit code is the shell's 128 + signal (130 for SIGINT, 143 for
SIGTERM). A second signal interrupts at once. A SIGINT that whoever started us ignores (nohup, a background job)
stays ignored: we never install a handler over SIG_IGN.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from rsg_eval.engine import collective


class Stopped(KeyboardInterrupt):
    """Training stopped at a step boundary after a signal; its resume point is saved."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.agreed(dist): save; raise stop.stopped(msg)`."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGINT)
        self._prev: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = int(signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue   # nohup or a background job: whoever started us asked for this signal to be ignored
                self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)
        self._prev = {}

    def agreed(self, d: Any) -> bool:
        """True on every process when any process was asked to stop (one collective: all stop at the same step
        boundary). The signal number travels too, so every process exits with the same code."""
        if not d.active:
            return self.requested
        got = collective.all_sum_floats([1.0 if self.requested else 0.0, float(self.signum if self.requested
                                                                                  else 0)], d)
        if got[0] > 0:
            self.signum = int(got[1] / got[0]) or int(signal.SIGINT)
            return True
        return False

    def stopped(self, message: str) -> Stopped:
        return Stopped(message, self.signum)
