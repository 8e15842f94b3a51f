"""Stopping a decode that runs on a worker thread, within one step, when its caller is gone.

A thread cannot be interrupted, so the async bridge (:func:`citebacktrack.backends.base.
iterate_in_thread`) asks instead: each ``next()`` it runs on a worker thread sees a stop
flag through :data:`STOP` (a context variable set for that call only), and the decoder
calls :func:`stop_if_cancelled` before every token step and between prefill batches. When the caller
is cancelled the bridge sets the flag; the step in flight raises :class:`Stopped` at its
next check, the bridge waits for that (a few milliseconds, one forward pass at most),
closes the stream and only then lets the cancellation through. A synchronous caller never
sets the flag, so :func:`stop_if_cancelled` costs one context-variable read.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar

__all__ = ["STOP", "Stopped", "stop_if_cancelled"]

STOP: ContextVar[threading.Event | None] = ContextVar("citebacktrack_stop", default=None)
"""The stop flag of the stream step running in this context (None outside the bridge)."""


class Stopped(Exception):  # noqa: N818 - a signal between the decoder and the bridge
    """Raised inside a stream step whose async caller was cancelled; never reaches a user
    (the bridge catches it and re-raises the caller's own cancellation)."""


def stop_if_cancelled() -> None:
    """Raise :class:`Stopped` if the async caller of this step was cancelled."""
    stop = STOP.get()
    if stop is not None and stop.is_set():
        raise Stopped
