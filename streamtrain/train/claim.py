"""One job per output_dir: a claim file that the job's rank 0 holds, renews, and gives back.

``output_dir/.claim.json`` names the holder (host, pid, process start time, job id, since when)
and the time of its last heartbeat, renewed every ``lease_s / 4`` seconds by a thread. A second
job finding a live claim is refused with the holder named. A claim is stale, and taken over,
when its heartbeat is older than the lease (a crashed host on a shared filesystem) or when its
holder ran on this host and that process is gone. Creation is exclusive (``O_CREAT | O_EXCL``),
and a stale claim is first renamed aside, so of two jobs starting together exactly one wins.
Ranks other than 0 never touch the file: they learn rank 0's verdict through a collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from streamtrain.errors import UserError

CLAIM_FILE = ".claim.json"


class OutputInUse(UserError):
    """Another live job holds the output directory."""


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), telling a reused pid apart."""
    fields = _process_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    fields = _process_stat(pid)
    if fields is None:
        return True  # exists, but /proc tells nothing more
    # A zombie (Z) or dying (X) process has exited; only its parent has not reaped it yet, which in
    # a container without an init can be late or never. It holds nothing: the claim is stale.
    if fields[0] in ("Z", "X"):
        return False
    return started is None or fields[19] == started


class OutputClaim:
    """The claim of one job on ``output_dir`` (used by rank 0 only)."""

    def __init__(self, output_dir: Path, lease_s: float) -> None:
        self.path = output_dir / CLAIM_FILE
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.lost = False
        """Set when the heartbeat found another job's claim in place of this one."""
        self._since = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, since: float) -> dict[str, Any]:
        pid = os.getpid()
        return {
            "host": socket.gethostname(),
            "pid": pid,
            "process_start": _process_start(pid),
            "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
            "since": since,
            "heartbeat": time.time(),
            "token": self.token,
        }

    def acquire(self) -> None:
        """Take the claim, or raise OutputInUse naming the live holder."""
        output = self.path.parent
        if output.exists() and not output.is_dir():
            raise UserError(f"output_dir: {output} exists and is not a directory")
        output.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale claim taken over, or a race lost to a holder that just left
            if self._create():
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue  # gone between our create and our read: try again
            why_stale = self._stale(holder)
            if why_stale is None:
                raise OutputInUse(self._describe(holder))
            aside = self.path.with_name(f"{CLAIM_FILE}.stale-{self.token}")
            with contextlib.suppress(FileNotFoundError):  # another starter renamed it first
                os.replace(self.path, aside)
                aside.unlink()
        holder = self._read()
        raise OutputInUse(self._describe(holder) if holder else f"{self.path} keeps changing hands")

    def live_holder(self) -> str | None:
        """Who holds the claim now, if its holder is alive (a read-only look; acquire decides)."""
        holder = self._read()
        if holder is None or self._stale(holder) is not None:
            return None
        return self._describe(holder)

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        record = self._record(time.time())
        self._since = record["since"]
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Cut by a crash while being created: a holder that never finished its first write.
            return {"heartbeat": 0.0}

    def _stale(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0.0))
        if age > self.lease_s:
            return f"its last heartbeat is {age:.0f} s old"
        if holder.get("host") == socket.gethostname() and not _alive(
            int(holder.get("pid", -1)), holder.get("process_start")
        ):
            return f"its process {holder.get('pid')} is gone"
        return None

    def _describe(self, holder: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        job = f", job {holder['job']}" if holder.get("job") else ""
        age = time.time() - float(holder.get("heartbeat", 0.0))
        return (
            f"output_dir {self.path.parent} is in use by another run: host {holder.get('host')}, "
            f"pid {holder.get('pid')}{job}, since {since} (last heartbeat {age:.0f} s ago). Wait for it to "
            f"finish or stop it, or use another output_dir; a claim whose holder died is taken over "
            f"(at once on the same host, after {self.lease_s:.0f} s from elsewhere)"
        )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="streamtrain-claim", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                self.lost = True  # taken over (our heartbeats stalled past the lease): stop renewing
                return
            tmp = self.path.with_name(f"{CLAIM_FILE}.{self.token}.tmp")
            with contextlib.suppress(OSError):  # a missed beat is retried; the lease has room for three
                tmp.write_text(json.dumps(self._record(self._since)))
                os.replace(tmp, self.path)

    def release(self) -> None:
        """Give the claim back (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)


def claim_output(output_dir: Path, lease_s: float) -> OutputClaim | None:
    """Rank 0 claims ``output_dir`` for this job; every rank raises OutputInUse if it could not.

    Returns the claim on rank 0 (to release at the end), None on the other ranks.
    """
    from streamtrain import distributed  # torch: not needed by live_holder's early check

    claim = OutputClaim(output_dir, lease_s) if distributed.rank() == 0 else None
    refusal = ""
    if claim is not None:
        try:
            claim.acquire()
        except UserError as exc:
            refusal = f"{type(exc).__name__}\n{exc}"
    verdict = distributed.gather_objects([refusal])[0]  # rank 0's, on every rank
    if verdict:
        kind, message = verdict.split("\n", 1)
        raise (OutputInUse if kind == OutputInUse.__name__ else UserError)(message)
    return claim
