"""A real Ray cluster of separate node processes on loopback, inside a private network namespace.

Ray replaces 127.0.0.1 by the host's own interface address, so the cluster and every process
that talks to it (the shardify driver, a SeaweedFS S3 server) run in one user + network
namespace that holds only loopback: ``unshare -rn`` makes it, ``nsenter`` joins it.
Each node is a ``ray start --block`` in its own session; stopping or killing a node kills that
session (its raylet and the task workers it forked).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAD_PORT = 6390
RAY = str(Path(sys.executable).parent / "ray")
ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
NODE_ENVIRONMENT = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
"""A killed node is declared dead after 3 refused health checks a second apart (Ray's default:
5 every 3 s); a node that is merely slow still has the default 10 s to answer each check."""


_MONITOR = """
import sys, time, ray
while True:
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR")
        break
    except (ConnectionError, RuntimeError):
        time.sleep(0.2)
for _ in sys.stdin:
    print(sum(node["Alive"] for node in ray.nodes()), flush=True)
"""
"""Answers each line on stdin with the number of nodes the head counts alive."""


def namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies are dead: they only wait for their parent)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
                    if state != "Z":
                        members.append(int(entry))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                continue
    return members


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a node, or a driver started by :meth:`popen`)."""
    for _ in range(20):
        members = _session_members(sid)
        if not members:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


class Namespace:
    """A private user + network namespace with loopback up, held open by one sleeping process."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-rn", "bash", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline().strip() == "up"
        self.prefix = [
            "nsenter",
            "--target",
            str(self.holder.pid),
            "--user",
            "--net",
            "--preserve-credentials",
        ]

    def popen(self, args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start ``args`` in the namespace, in a session of its own."""
        environment = {**os.environ, **ENVIRONMENT, **(env or {})}
        return subprocess.Popen([*self.prefix, *args], env=environment, start_new_session=True, **kwargs)

    def run(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        process = self.popen(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_session(process.pid)
            raise
        return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

    def close(self) -> None:
        kill_session(self.holder.pid)
        self.holder.wait()


class RayCluster:
    """A head node and worker nodes (``cpus`` each), started as separate ``ray start`` processes."""

    def __init__(self, namespace: Namespace, workdir: Path, cpus: int = 1) -> None:
        self.namespace = namespace
        self.workdir = workdir
        self.cpus = cpus
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.monitor: subprocess.Popen | None = None
        # Ray's sockets live under its temp dir and a unix socket path holds at most 107 bytes:
        # under pytest's basetemp (/tmp/pytest-of-root/pytest-123/...) a node fails to start.
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))

    def _node(self, args: list[str], log: str, setup: str | None = None) -> subprocess.Popen:
        command = [RAY, "start", "--block", f"--num-cpus={self.cpus}", "--disable-usage-stats", *args]
        if setup is not None:
            script = f'{setup} && exec "$@"'
            command = ["unshare", "-m", "--propagation", "private", "bash", "-c", script, "bash", *command]
        with open(self.workdir / log, "ab") as handle:
            return self.namespace.popen(command, NODE_ENVIRONMENT, stdout=handle, stderr=subprocess.STDOUT)

    def start_head(self) -> None:
        temp = self.temp / "t"
        shutil.rmtree(temp, ignore_errors=True)
        self.head = self._node(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={HEAD_PORT}",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
            ],
            "head.log",
        )
        self.wait_for_nodes()

    def add_worker(self, setup: str | None = None) -> subprocess.Popen:
        """Start a node that joins the head; ``setup``: shell commands run first, in a mount
        namespace of the node's own (to hide or write-protect paths from it alone)."""
        node = self._node([f"--address={self.address}", "--node-ip-address=127.0.0.1"], "worker.log", setup)
        self.workers.append(node)
        self.wait_for_nodes()
        return node

    def alive_nodes(self) -> int:
        """Nodes the head counts alive, asked through one connected process kept for the module
        (a fresh ``ray.init`` per question costs seconds)."""
        if self.monitor is None or self.monitor.poll() is not None:
            self.monitor = self.namespace.popen(
                [sys.executable, "-c", _MONITOR, self.address],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        assert self.monitor.stdin is not None and self.monitor.stdout is not None
        try:
            self.monitor.stdin.write("\n")
            self.monitor.stdin.flush()
            return int(self.monitor.stdout.readline())
        except (BrokenPipeError, ValueError):
            return 0

    def wait_for_nodes(self, timeout: float = 90) -> None:
        """Until the head counts exactly the nodes started here alive: new ones have joined and
        killed ones are no longer counted (the head notices a dead node only after a while)."""
        count = (self.head is not None) + len(self.workers)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head is not None and self.head.poll() is not None:
                raise RuntimeError(f"the Ray head exited; see {self.workdir / 'head.log'}")
            if any(worker.poll() is not None for worker in self.workers):
                raise RuntimeError(f"a Ray worker node exited; see {self.workdir / 'worker.log'}")
            if self.alive_nodes() == count:
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"the head did not count {count} nodes alive within {timeout}s; see {self.workdir}"
        )

    def kill_worker(self, node: subprocess.Popen) -> None:
        kill_session(node.pid)
        node.wait()
        self.workers.remove(node)

    def remove_worker(self, node: subprocess.Popen) -> None:
        """Kill a node and wait until the head no longer counts it alive."""
        self.kill_worker(node)
        self.wait_for_nodes()

    def stop(self) -> None:
        for node in [
            *([self.monitor] if self.monitor else []),
            *self.workers,
            *([self.head] if self.head else []),
        ]:
            kill_session(node.pid)
            node.wait()
        self.workers, self.head, self.monitor = [], None, None
        shutil.rmtree(self.temp, ignore_errors=True)
