"""Stop requests in one process: the first signal is a request, the second exits at once; the
launcher watch only runs under a launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from streamtrain.train.stopping import StopRequests
from tests.streamtrain.train.conftest import ROOT, env


def test_the_first_signal_is_a_request_and_restored_handlers_follow() -> None:
    before = signal.getsignal(signal.SIGINT)
    stops = StopRequests()
    stops.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without the handler
        assert stops.signum == signal.SIGINT and stops.agreed() == signal.SIGINT
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_signal_exits_at_once_with_its_status() -> None:
    script = textwrap.dedent(
        """
        import os, signal, time
        from streamtrain.train.stopping import StopRequests
        stops = StopRequests()
        stops.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the checkpoint is being written
        time.sleep(30)
        print("not reached")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env(), cwd=ROOT
    )
    assert done.returncode == 143, done.stderr
    assert "not reached" not in done.stdout
    assert "SIGTERM again: exiting now, without a checkpoint" in done.stderr
