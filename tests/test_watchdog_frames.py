"""The watchdog reads the blocked loop thread's frame with the garbage collector held off (CPython 3.11's
``sys._current_frames()`` can deadlock in a collection it starts: python/cpython#106883), and leaves a
collector someone turned off as it was."""

from __future__ import annotations

import gc
import sys
import threading
from types import FrameType

import pytest

from amqpkit import watchdog


def test_the_frames_are_read_with_the_collector_off(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    original = sys._current_frames

    def recording() -> dict[int, FrameType]:
        seen.append(gc.isenabled())
        return original()

    monkeypatch.setattr(sys, "_current_frames", recording)
    assert gc.isenabled()
    frame = watchdog.thread_frame(threading.get_ident())
    codes = []
    while frame is not None:  # this thread's own stack, read from inside the spy: the test is on it
        codes.append(frame.f_code)
        frame = frame.f_back
    assert test_the_frames_are_read_with_the_collector_off.__code__ in codes
    assert seen == [False]
    assert gc.isenabled()  # on again after


def test_a_collector_turned_off_stays_off_and_an_error_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.disable()
    try:
        watchdog.thread_frame(threading.get_ident())
        assert not gc.isenabled()
    finally:
        gc.enable()

    def failing() -> dict[int, FrameType]:
        raise RuntimeError("no frames")

    monkeypatch.setattr(sys, "_current_frames", failing)
    with pytest.raises(RuntimeError):
        watchdog.thread_frame(threading.get_ident())
    assert gc.isenabled()
