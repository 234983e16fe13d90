"""The output_dir claim: exclusive, renewed, refused while live, taken over when its holder died
(on this host: at once; elsewhere: once its heartbeat is older than the lease)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamtrain.errors import UserError
from streamtrain.train.claim import CLAIM_FILE, OutputClaim, OutputInUse


def holder(output: Path, **fields: object) -> None:
    record = {"host": "other-host", "pid": 1, "since": time.time() - 100, "heartbeat": time.time()}
    record.update(fields)
    output.mkdir(parents=True, exist_ok=True)
    (output / CLAIM_FILE).write_text(json.dumps(record))


def test_a_live_claim_is_refused_naming_its_holder(tmp_path: Path) -> None:
    first = OutputClaim(tmp_path, lease_s=60)
    first.acquire()
    try:
        with pytest.raises(OutputInUse) as refused:
            OutputClaim(tmp_path, lease_s=60).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}" in message and f"pid {os.getpid()}" in message, message
        assert "is in use by another run" in message and "since" in message
    finally:
        first.release()
    assert not (tmp_path / CLAIM_FILE).exists()
    second = OutputClaim(tmp_path, lease_s=60)
    second.acquire()  # free again once released
    second.release()


def test_the_heartbeat_renews_the_claim(tmp_path: Path) -> None:
    claim = OutputClaim(tmp_path, lease_s=0.2)
    claim.acquire()
    try:
        first = json.loads((tmp_path / CLAIM_FILE).read_text())
        time.sleep(0.3)
        renewed = json.loads((tmp_path / CLAIM_FILE).read_text())
        assert renewed["heartbeat"] > first["heartbeat"] and renewed["since"] == first["since"]
        with pytest.raises(OutputInUse):  # renewed within the lease: still live
            OutputClaim(tmp_path, lease_s=0.2).acquire()
    finally:
        claim.release()


def test_a_claim_from_another_host_expires_with_its_lease(tmp_path: Path) -> None:
    holder(tmp_path, heartbeat=time.time() - 5)
    with pytest.raises(OutputInUse, match="host other-host, pid 1"):
        OutputClaim(tmp_path, lease_s=60).acquire()
    holder(tmp_path, heartbeat=time.time() - 120)
    taker = OutputClaim(tmp_path, lease_s=60)
    taker.acquire()
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == taker.token
    taker.release()


def test_a_claim_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder(tmp_path, host=socket.gethostname(), pid=int(dead.stdout), heartbeat=time.time())
    taker = OutputClaim(tmp_path, lease_s=3600)
    taker.acquire()  # raises OutputInUse if the dead holder's fresh heartbeat were trusted
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == taker.token
    taker.release()


def test_a_claim_whose_holder_is_an_unreaped_zombie_is_taken_over_at_once(tmp_path: Path) -> None:
    """A process that exited but was not reaped yet (state Z) still answers kill(pid, 0)."""
    child = subprocess.Popen(["sleep", "0"])
    stat = Path(f"/proc/{child.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not waited for
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = stat.read_text().rsplit(")", 1)[1].split()[19]
    try:
        holder(tmp_path, host=socket.gethostname(), pid=child.pid, process_start=started)
        taker = OutputClaim(tmp_path, lease_s=3600)
        taker.acquire()
        assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == taker.token
        taker.release()
    finally:
        child.wait()


def test_a_lost_claim_is_noticed_and_not_given_back(tmp_path: Path) -> None:
    claim = OutputClaim(tmp_path, lease_s=0.2)
    claim.acquire()
    holder(tmp_path, heartbeat=time.time(), token="someone-else")  # taken over behind its back
    deadline = time.monotonic() + 5
    while not claim.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert claim.lost
    claim.release()
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == "someone-else"


def test_an_output_dir_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        OutputClaim(a_file, lease_s=60).acquire()


def test_the_command_line_refuses_a_live_claim_before_its_slow_imports(tmp_path: Path) -> None:
    from streamtrain.cli import _claimed_elsewhere

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"task: alignment\noutput_dir: {tmp_path / 'elsewhere'}\ntrain: {{claim_lease_s: 30}}\n"
    )
    out = tmp_path / "run"
    claim = OutputClaim(out, lease_s=30)
    claim.acquire()
    try:
        found = _claimed_elsewhere(str(recipe), [f"output_dir={out}", "train.max_steps=3"])
        assert found is not None and f"pid {os.getpid()}" in found
        assert _claimed_elsewhere(str(recipe), []) is None  # the recipe's own output_dir is free
        assert _claimed_elsewhere(str(tmp_path / "missing.yaml"), [f"output_dir={out}"]) is None
    finally:
        claim.release()
    assert _claimed_elsewhere(str(recipe), [f"output_dir={out}"]) is None
