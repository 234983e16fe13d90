"""A real S3 server (SeaweedFS ``weed mini``) on loopback, started and stopped by the tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.raycluster import Namespace

ACCESS_KEY = "streamtrain-test"
SECRET_KEY = "streamtrain-test-secret"
READER_KEY = "streamtrain-reader"
"""An identity that may only read and list: for data in a read-only location."""
READER_SECRET = "streamtrain-reader-secret"
_IDENTITIES = {
    "identities": [
        {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "reader",
            "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
            "actions": ["Read", "List"],
        },
    ]
}


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> int:
    """A port p with p and p+10000 free (weed serves gRPC on http port + 10000)."""
    while True:
        port = random.randint(20000, 30000)
        if port not in taken and _port_free(port) and _port_free(port + 10000):
            taken.add(port)
            return port


class SeaweedS3:
    """One ``weed mini`` process serving S3 on 127.0.0.1; ``restart()`` keeps its data."""

    def __init__(self, data_dir: Path, namespace: Namespace | None = None) -> None:
        self.namespace = namespace
        """Where to run the server (and probe it): a private network namespace, or here."""
        self.weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        self.data_dir = data_dir
        taken: set[int] = set()
        self.ports = {
            name: _free_port_pair(taken) for name in ("s3", "master", "volume", "filer", "webdav", "admin")
        }
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None
        self.log = data_dir / "weed.log"

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.data_dir / "s3-identities.json"
        identities.write_text(json.dumps(_IDENTITIES))
        args = [self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args.append(f"-s3.config={identities}")
        args += [f"-{name}.port={port}" for name, port in self.ports.items()]
        with open(self.log, "ab") as log:
            if self.namespace is not None:
                self.process = self.namespace.popen(args, stdout=log, stderr=subprocess.STDOUT)
            else:
                self.process = subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log}")
            if self._answers():
                return
            time.sleep(0.2)
        raise RuntimeError(f"S3 server did not answer on {self.endpoint} within {timeout}s; see {self.log}")

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        if self.namespace is not None:
            probe = (
                "import urllib.error, urllib.request\n"
                f"try: urllib.request.urlopen({self.endpoint!r}, timeout=1)\n"
                "except urllib.error.HTTPError: pass"
            )
            return self.namespace.run([sys.executable, "-c", probe], timeout=30).returncode == 0

        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:
            return True  # any HTTP answer (403 for an anonymous listing) means S3 is up
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.namespace is not None and self.process is not None:
            from tests.raycluster import kill_session

            kill_session(self.process.pid)
            self.process.wait()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def environment(self, read_only: bool = False) -> dict[str, str]:
        """The AWS variables of the admin identity, or of one that may only read and list."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": READER_KEY if read_only else ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": READER_SECRET if read_only else SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
