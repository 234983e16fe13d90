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
import time
from pathlib import Path

HEAD_PORT = 6390
RAY = str(Path(sys.executable).parent / "ray")
ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def namespaces_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
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

    def _node(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.workdir / log, "ab") as handle:
            return self.namespace.popen(
                [RAY, "start", "--block", f"--num-cpus={self.cpus}", "--disable-usage-stats", *args],
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def start_head(self) -> None:
        temp = self.workdir / "ray-temp"
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
        self.wait_for_nodes(1)

    def add_worker(self) -> subprocess.Popen:
        alive = self.alive_nodes()
        node = self._node([f"--address={self.address}", "--node-ip-address=127.0.0.1"], "worker.log")
        self.workers.append(node)
        self.wait_for_nodes(alive + 1)
        return node

    def alive_nodes(self) -> int:
        script = (
            f"import ray; ray.init(address='{self.address}', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        result = self.namespace.run([sys.executable, "-c", script], timeout=120)
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.head is not None and self.head.poll() is not None:
                raise RuntimeError(f"the Ray head exited; see {self.workdir / 'head.log'}")
            if self.alive_nodes() >= count:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{count} Ray nodes were not up within {timeout}s; see {self.workdir}")

    def kill_worker(self, node: subprocess.Popen) -> None:
        kill_session(node.pid)
        node.wait()
        self.workers.remove(node)

    def stop(self) -> None:
        for node in [*self.workers, *([self.head] if self.head else [])]:
            kill_session(node.pid)
            node.wait()
        self.workers, self.head = [], None
