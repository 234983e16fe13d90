"""``--engine ray`` on a real Ray cluster: a head and a second node, separate processes on loopback.

The cluster, the driver and (for S3) a SeaweedFS server run in a private network namespace
(see tests/raycluster.py); the local-engine references run here. One cluster serves the module.
The suite runs the two-node conversion, a killed node and a node without the data; the other
variants (marked ``full``) run under ``./launch.sh faults``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import factories
from tests.raycluster import Namespace, RayCluster, kill_session, namespaces_available
from tests.s3server import SeaweedS3
from tests.shardify.helpers import output_files

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not namespaces_available(), reason="needs unprivileged user+network namespaces"),
]

PER_SHARD = "40"


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    space = Namespace()
    yield space
    space.close()


@pytest.fixture(scope="module")
def cluster(namespace: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    ray_cluster = RayCluster(namespace, tmp_path_factory.mktemp("ray"))
    try:
        ray_cluster.start_head()
        ray_cluster.add_worker()
        yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 inputs x 2 units of 800x600 photos (a few corrupt): about a second per unit on one CPU."""
    folder = tmp_path_factory.mktemp("ray-input")
    distinct = [factories.jpeg(800, 600, seed=s) for s in range(24)]
    for part in range(4):
        rows = [
            {
                "sample_id": f"p{part}-{i}",
                "caption": f"caption {part} {i}",
                "image_bytes": b"<html>not an image</html>" if i % 37 == 3 else distinct[(part + i) % 24],
            }
            for i in range(240)
        ]
        factories.write_parquet(folder / f"part-{part}.parquet", rows, row_group_size=24)
    return folder


@pytest.fixture(scope="module")
def unit_size(inputs: Path) -> str:
    """Parquet bytes of the largest first half of an input: every input is exactly 2 units."""
    halves = []
    for path in inputs.glob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        sizes = [
            sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            for group in (metadata.row_group(i) for i in range(metadata.num_row_groups))
        ]
        halves += [sum(sizes[:5]), sum(sizes[5:])]
    return str(max(halves))


def _command(source: str, out: str, unit_size: str, *extra: str, quiet: bool = True) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shardify",
        "parquet-to-tar",
        source,
        "-o",
        out,
        "--unit-size",
        unit_size,
        "--max-samples-per-shard",
        PER_SHARD,
        *(["--quiet"] if quiet else []),
        *extra,
    ]


def _on_cluster(cluster: RayCluster, source: str, out: str, unit_size: str, quiet: bool = True) -> list[str]:
    return _command(source, out, unit_size, "--engine", "ray", "--ray-address", cluster.address, quiet=quiet)


@pytest.fixture(scope="module")
def reference(inputs: Path, unit_size: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The local engine's output (here, outside the namespace)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run(_command(str(inputs), str(out), unit_size, "--workers", "2"), check=True, timeout=300)
    units = json.loads((out / "manifest.json").read_text())
    assert len({entry["name"].rsplit("-", 1)[0] for entry in units["shards"]}) == 8  # 8 units
    return output_files(out)


def _done_records(out: Path) -> list[Path]:
    return sorted((out / ".shardify" / "units").glob("*.done.json"))


def _wait_for(
    condition, process: subprocess.Popen, what: str, timeout: float = 120, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            said = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"the conversion ended (exit {process.returncode}) before {what}: {said}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _running_unit_tasks(node: subprocess.Popen) -> int:
    """Unit tasks running on one node (its raylet's forked workers carry the task's name)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == node.pid:
                    count += b"_convert_unit_task" in Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, ProcessLookupError):
                continue
    return count


def _visible_shards_whole(out: Path) -> None:
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as archive:
            archive.getmembers()  # raises on a cut archive
        assert shard.with_name(shard.name + ".crc32.json").exists()


def _assert_same_conversion(
    files: dict[str, bytes], reference: dict[str, bytes], source: str, reference_source: str
) -> None:
    """The reference's output, read from inputs at ``source`` rather than ``reference_source``:
    the same shards byte for byte and the same counts (the skip log and manifest name the inputs)."""
    files, expected = dict(files), dict(reference)
    manifest, expected_manifest = (
        json.loads(files.pop("manifest.json")),
        json.loads(expected.pop("manifest.json")),
    )
    skipped = files.pop("skipped.jsonl").replace(source.encode(), reference_source.encode())
    assert skipped == expected.pop("skipped.jsonl")
    assert files == expected
    for key in ("shards", "rows_read", "samples_written", "skipped_by_reason", "media"):
        assert manifest[key] == expected_manifest[key], key


def test_two_nodes_convert_identically_to_the_local_engine(
    cluster: RayCluster,
    namespace: Namespace,
    inputs: Path,
    unit_size: str,
    reference: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """Run as a user would, on a terminal (``script`` gives it one): the progress bar counts the
    rows of the whole cluster and the summary table follows."""
    out = tmp_path / "ray"
    command = _on_cluster(cluster, str(inputs), str(out), unit_size, quiet=False)
    result = namespace.run(["script", "-qec", shlex.join(command), "/dev/null"])
    assert result.returncode == 0, result.stdout[-3000:]
    assert output_files(out) == reference
    screen = result.stdout.replace("\r", "\n")
    assert re.search(r"converting: 100%.*\b960/960 \[.*rows/s\]", screen), screen[-3000:]
    assert f"shardify: {out}  (schema caption, " in screen and " from 8 units, " in screen
    assert re.search(r"rows read +960\n", screen) and re.search(r"throughput +[0-9,.]+ rows/s", screen)


@pytest.mark.full
def test_without_an_address_a_ray_of_its_own_is_started(
    cluster: RayCluster, namespace: Namespace, inputs: Path, unit_size: str, tmp_path: Path
) -> None:
    """No --ray-address and no RAY_ADDRESS: a Ray started for the run with --workers CPUs, even
    where `ray start` left its address for ray.init() to find (which would then refuse the CPU
    count); the output is the local engine's."""
    source = inputs / "part-1.parquet"
    here = subprocess.run(_command(str(source), str(tmp_path / "local"), unit_size), capture_output=True)
    assert here.returncode == 0, here.stderr
    assert "RAY_ADDRESS" not in os.environ
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live here
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(cluster.address)
        own = namespace.run(
            _command(str(source), str(tmp_path / "ray"), unit_size, "--engine", "ray", "--workers", "1"),
            env={"RAY_TMPDIR": str(ray_tmp)},
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert own.returncode == 0, own.stderr
    assert output_files(tmp_path / "ray") == output_files(tmp_path / "local")


def test_a_killed_worker_node_is_survived(
    cluster: RayCluster,
    namespace: Namespace,
    inputs: Path,
    unit_size: str,
    reference: dict[str, bytes],
    tmp_path: Path,
) -> None:
    out = tmp_path / "ray"
    worker = cluster.workers[0]
    process = namespace.popen(
        _on_cluster(cluster, str(inputs), str(out), unit_size),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _running_unit_tasks(worker) > 0, process, "a unit ran on the worker node")
        _wait_for(lambda: len(_done_records(out)) >= 1, process, "a unit finished")
        assert len(_done_records(out)) < 8, "the conversion finished before the node could be killed"
        cluster.kill_worker(worker)
        _, stderr = process.communicate(timeout=300)
    finally:
        kill_session(process.pid)
        if not cluster.workers:
            cluster.add_worker()
    assert process.returncode == 0, stderr
    assert output_files(out) == reference


@pytest.mark.full
def test_a_sigkilled_driver_is_rerun_to_the_same_output_redoing_nothing_done(
    cluster: RayCluster,
    namespace: Namespace,
    inputs: Path,
    unit_size: str,
    reference: dict[str, bytes],
    tmp_path: Path,
) -> None:
    out = tmp_path / "ray"
    command = _on_cluster(cluster, str(inputs), str(out), unit_size)
    log = tmp_path / "driver.log"
    with log.open("w") as handle:
        process = namespace.popen(command, stderr=handle)
    try:
        _wait_for(lambda: len(_done_records(out)) >= 3, process, "three units finished", log=log)
    finally:
        kill_session(process.pid)  # the driver's whole process tree, SIGKILL
    process.wait()
    done = {record.name for record in _done_records(out)}
    assert 3 <= len(done) < 8, "the conversion finished before the driver could be killed"
    assert not (out / "manifest.json").exists()
    _visible_shards_whole(out)
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    finished_units = {name.split(".")[0][1:] for name in done}
    finished_shards = {name: mtime for name, mtime in kept.items() if name.split("-")[1] in finished_units}
    assert finished_shards

    time.sleep(0.05)  # mtimes would show a rewrite
    rerun = namespace.run(command)
    assert rerun.returncode == 0, rerun.stderr
    assert output_files(out) == reference
    for name, mtime in finished_shards.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} of a finished unit was written again"


@pytest.mark.full
def test_a_unit_that_keeps_failing_is_reported_and_the_rest_completes(
    cluster: RayCluster,
    namespace: Namespace,
    inputs: Path,
    unit_size: str,
    reference: dict[str, bytes],
    tmp_path: Path,
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    for path in sorted(inputs.glob("*.parquet")):
        (source / path.name).write_bytes(path.read_bytes())
    broken = source / "part-2.parquet"
    intact = broken.read_bytes()
    damaged = bytearray(intact)
    damaged[4 : len(damaged) // 3] = bytes(len(damaged) // 3 - 4)  # data pages of the first unit gone
    broken.write_bytes(bytes(damaged))
    out = tmp_path / "ray"
    command = _on_cluster(cluster, str(source), str(out), unit_size)
    failed = namespace.run(command)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "1 of 8 units failed" in failed.stderr and f"{broken} rows 0-" in failed.stderr, failed.stderr
    assert len(_done_records(out)) == 7 and not (out / "manifest.json").exists()

    broken.write_bytes(intact)
    finished = {path.name: path.stat().st_mtime_ns for path in out.glob("*.tar")}
    rerun = namespace.run(command)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime
    _assert_same_conversion(output_files(out), reference, f"{source}/", f"{inputs}/")


@pytest.mark.full
def test_s3_in_and_out_through_the_cluster(
    cluster: RayCluster,
    namespace: Namespace,
    inputs: Path,
    unit_size: str,
    reference: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """Parquet read from S3 and shards written to S3 by the cluster's tasks: the local engine's
    shards (converted from local disk) byte for byte."""
    server = SeaweedS3(tmp_path / "seaweedfs", namespace=namespace)
    server.start()
    try:
        env = server.environment()
        copy = (
            "import sys, s3fs\n"
            "fs = s3fs.S3FileSystem()\n"
            "fs.mkdir('ray-bucket')\n"
            "fs.put(sys.argv[1] + '/', 'ray-bucket/in/', recursive=True)\n"
        )
        put = namespace.run([sys.executable, "-c", copy, str(inputs)], env=env)
        assert put.returncode == 0, put.stderr
        on_ray = namespace.run(
            _on_cluster(cluster, "s3://ray-bucket/in/", "s3://ray-bucket/ray", unit_size),
            env=env,
        )
        assert on_ray.returncode == 0, on_ray.stderr
        fetch = (
            "import sys, s3fs\nfs = s3fs.S3FileSystem()\nfs.get(sys.argv[1], sys.argv[2], recursive=True)\n"
        )
        got = namespace.run([sys.executable, "-c", fetch, "ray-bucket/ray/", str(tmp_path / "ray")], env=env)
        assert got.returncode == 0, got.stderr
    finally:
        server.stop()
    files = output_files(tmp_path / "ray")
    assert len([name for name in files if name.endswith(".tar")]) >= 8
    assert not [name for name in files if name.startswith(".shardify/units")]  # journals cleaned up
    _assert_same_conversion(files, reference, "s3://ray-bucket/in/", f"{inputs}/")


def test_a_node_that_cannot_see_the_data_is_named_and_nothing_starts(
    cluster: RayCluster, namespace: Namespace, inputs: Path, unit_size: str, tmp_path: Path
) -> None:
    """A third node whose view of the filesystem hides the inputs (an empty tmpfs over their
    folder) and write-protects the output: the driver refuses before any unit runs."""
    out = tmp_path / "ray"
    out.mkdir()
    setup = f"mount -t tmpfs none {inputs} && mount --bind {out} {out} && mount -o remount,bind,ro {out}"
    blind = cluster.add_worker(setup=setup)
    try:
        command = _on_cluster(cluster, str(inputs), str(out), unit_size)
        result = namespace.run(command)
    finally:
        cluster.kill_worker(blind)  # the module's last test: no need to wait for the head to notice
    assert result.returncode == 2, result.stderr
    # Ray's own C++ core may log a line first (no route out of the test's network namespace).
    error = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and error.startswith("shardify: error: Ray node 127.0.0.1")
    assert f"cannot write to the output {out}" in error
    assert f"input {sorted(inputs.glob('*.parquet'))[0]} does not exist" in error, error
    assert error.count("Ray node ") == 2  # only the blind node's two problems
    assert not list(out.glob("*.tar")) and not (out / ".shardify" / "units").exists()
