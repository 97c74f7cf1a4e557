"""The one signal-handler installer (stopping.handling_signals) that a run, a sweep and a tune share."""

import os
import signal
import threading
import time

from cnnlab import stopping
from cnnlab.stopping import HANDLED, StopSignals, handling_signals


def handlers():
    return {signum: signal.getsignal(signum) for signum in HANDLED}


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout  # Python runs a handler at its next instruction; this only catches a hang
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_signals_go_to_the_block_and_the_previous_handlers_come_back():
    before = handlers()
    seen = []
    with handling_signals(seen.append) as pending:
        assert all(handlers()[s] is not before[s] for s in HANDLED)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: len(seen) == 2)
    assert pending is None and seen == [signal.SIGHUP, signal.SIGTERM]
    assert handlers() == before


def test_a_signal_recorded_while_starting_is_handed_to_the_block_not_to_its_handler(monkeypatch):
    monkeypatch.setattr(stopping, "_pending", signal.SIGTERM)
    seen = []
    with handling_signals(seen.append) as pending:
        pass
    assert pending == signal.SIGTERM and seen == []
    with StopSignals() as stop:  # a run takes it as its stop request
        assert stop.requested == signal.SIGTERM


def test_outside_the_main_thread_nothing_is_installed():
    before = handlers()
    found = {}

    def in_thread():
        with handling_signals(lambda signum: None) as pending:
            found["handlers"], found["pending"] = handlers(), pending

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert found == {"handlers": before, "pending": None} and handlers() == before
