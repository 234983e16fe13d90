"""Stopping a run on request: SIGTERM/SIGINT become a checkpoint of an agreed step, and a rank
whose launcher died stops on its own.

Schedulers preempt with SIGTERM and a grace period (Slurm's default 30 s), people press Ctrl-C.
The first such signal only sets a flag; after every optimizer step the ranks agree (one small
all-reduce) whether any of them was asked to stop, so all stop after the same step even when
the signal reached only some of them — on several nodes it often does. A second signal exits
at once. Dataloader workers ignore both signals (see streamtrain.data.loader): they end with
their rank.

A rank started by a launcher (torchrun, accelerate launch) watches its parent: when the launcher
is gone the rank exits within a second, writing nothing more — otherwise it would train on as
an orphan beside whatever is started next on the same output_dir.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from streamtrain import distributed
from streamtrain.errors import TrainingError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WATCH_INTERVAL_S = 0.5


class Stopped(TrainingError):
    """The run stopped on a signal after writing the checkpoint of ``step``."""

    def __init__(self, signum: int, step: int, message: str) -> None:
        self.signum = signum
        self.step = step
        super().__init__(message)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what the shell reports for a process the signal ended: 143, 130


class StopRequests:
    """Receives stop signals on this rank and agrees with the others on when to stop."""

    def __init__(self) -> None:
        self.signum = 0
        """The first stop signal this rank received (0: none)."""
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only: Python runs handlers there)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        speak = os.environ.get("RANK", "0") == "0"  # one line per job, not one per rank
        if self.signum:  # the second signal: no checkpoint, exit now
            if speak:
                os.write(2, f"\nstreamtrain: {name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if speak:
            os.write(2, f"\nstreamtrain: {name}: stopping after this step to write a checkpoint\n".encode())

    def agreed(self) -> int:
        """The stop signal any rank received (0: none); every rank calls it after every step.

        SIGTERM wins over SIGINT when ranks received different ones (preemption is the stronger
        reason, and its exit status tells a scheduler the job was stopped, not failed).
        """
        return distributed.all_reduce_max(self.signum)  # SIGTERM (15) > SIGINT (2)


def watch_launcher() -> None:
    """Exit this rank soon after its launcher dies (only when a launcher started it: torchrun, or
    accelerate launch, which starts ranks through torchrun's agent)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(_WATCH_INTERVAL_S)
        # Re-parented: the launcher is gone and nobody will collect this rank's result. Exit at
        # once, without cleanup that could write: the newest complete checkpoint stays the resume point.
        try:  # stderr may be a pipe nobody reads any more (its reader died with the launcher)
            os.write(2, f"streamtrain: the launcher (pid {launcher}) is gone; rank exits\n".encode())
        except OSError:
            pass
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="streamtrain-launcher-watch", daemon=True).start()


def stopped_after(signum: int, step: int, checkpoint: Path | None, seconds: float) -> Stopped:
    """The one line a stopped run ends with: where it stopped and how to continue."""
    name = signal.Signals(signum).name
    if checkpoint is None:
        where = "before training a step; nothing new to save"
    else:
        where = f"after step {step}; its checkpoint {checkpoint} took {seconds:.1f} s to write"
    return Stopped(
        signum, step, f"stopped by {name} {where}. Run the same command again to continue (train.resume=auto)"
    )
