"""Scenario 4: the S3 server stops, errors, resets or answers slowly mid-stream; a shard vanishes.

Real training (the alignment recipe shrunk to seconds, in this process with a real dataloader
worker process) streams ``s3://`` shards from the real SeaweedFS server through a real HTTP
fault proxy (s4_s3proxy.py). While it trains, a driver thread injects at random steps: a window
of 503/500 answers, a window of connection resets (before and mid-body), a window of slow
answers, and a stop-and-restart of the S3 server itself; and deletes one shard from the bucket
for good. The run's ``data.sample_log`` must equal the uninterrupted reference's exactly, minus
the deleted shard's samples only; the deleted shard must be skipped, counted (data/shard_errors,
data/unreadable_samples) and reported (a warning naming it), and the run must finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from random import Random

import pytest
import s3fs

from shardify.convert import ConvertOptions, convert
from shardify.format import MANIFEST_NAME
from streamtrain.config import load_config
from streamtrain.data.sample_log import read_sample_log
from streamtrain.tasks import TASKS, model_types
from streamtrain.train.tracking import read_metrics
from streamtrain.train.trainer import Trainer
from tests.faults.conftest import FULL, FaultRecord, fault_rng, trials
from tests.faults.s4_s3proxy import Fault, FaultProxy
from tests.faults.s46_logs import by_step, compare, shard_sample_ids
from tests.planned import StepLog, not_yet_read, occurrences
from tests.s3server import SeaweedS3
from tests.streamtrain.train.conftest import ROOT, tiny_overrides

SCENARIO = "4. S3 server down, erroring or slow"
RECIPE = ROOT / "configs" / "alignment.yaml"
BATCH = 16
WINDOW = 64
SHARD_SAMPLES = 40
MAX_STEPS = 36
TRANSIENT = ("error", "reset", "slow", "restart")
FAULT_WAIT_S = 120.0


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits sample in shards of 40 samples: every few steps the stream opens another object."""
    out = tmp_path_factory.mktemp("s4") / "train"
    convert(
        [str(ROOT / "sample" / "digits_caption" / "train.parquet")],
        ConvertOptions(output=str(out), max_samples_per_shard=SHARD_SAMPLES),
    )
    return out


def _client(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def _clear_caches() -> None:
    import fsspec

    fsspec.AbstractFileSystem.clear_instance_cache()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxied(s3_env: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FaultProxy, SeaweedS3]]:
    """The fault proxy in front of the S3 server, with the AWS endpoint pointing at the proxy."""
    with FaultProxy(s3_env.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        _clear_caches()
        yield proxy, s3_env
        if s3_env.process is None:  # a failed trial must not leave later tests without a server
            s3_env.start()
    _clear_caches()


def _upload(server: SeaweedS3, local: Path, bucket: str, prefix: str) -> str:
    client = _client(server.endpoint)
    for path in sorted(local.iterdir()):
        client.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def _train(data: str, out: Path) -> None:
    overrides = tiny_overrides(
        {"train": data, "eval": "null"},  # type: ignore[dict-item]
        out,
        **{
            "train.max_steps": MAX_STEPS,
            "checkpoint.every_steps": 0,
            "data.shuffle_buffer": WINDOW,
            "data.sample_log": out / "samples.jsonl",
            # One request at a time, no prefetch: the driver deletes a shard the stream has not
            # asked for yet and arms faults for requests still to come, and these shards are so
            # small that read-ahead would have fetched them all in the first steps. Faults under
            # read-ahead (and latency): tests/streamtrain/data/test_remote_loader.py.
            "data.read_ahead_mb": 0,
        },
    )
    config = load_config(RECIPE, overrides, model_types())
    Trainer(config, TASKS["alignment"](config)).fit()


def _steps_logged(log: Path) -> int:
    return len(read_sample_log(log)) if log.exists() else 0


class _RunEnded(Exception):
    """The run ended before the fault plan was through."""


class _Driver(threading.Thread):
    """Injects one trial's faults in order, each once the run has logged its trigger step."""

    def __init__(
        self,
        proxy: FaultProxy,
        server: SeaweedS3,
        data: str,
        log: Path,
        rng: Random,
        full: bool,
        plan: tuple[StepLog, dict[str, set[str]]],
    ) -> None:
        super().__init__(daemon=True)
        self.proxy, self.server, self.data, self.log, self.rng = proxy, server, data, log, rng
        self.reference, self.ids_by_name = plan
        self.kinds = list(TRANSIENT)
        rng.shuffle(self.kinds)
        self.triggers = sorted(rng.sample(range(4, MAX_STEPS - 12), len(self.kinds)))
        self.delete_at = rng.randint(1, 3)
        self.longest_s = 4.0 if full else 1.5
        self.faults: list[Fault] = []
        self.deleted: str | None = None
        self.errors: list[BaseException] = []
        self.finished = threading.Event()
        """Set by the test when the run has ended."""
        self.outrun = False
        """The run ended (having read all it needed) before the plan's next fault could hit."""

    def run(self) -> None:
        try:
            self._wait_for_step(self.delete_at)
            self.deleted = self._delete_a_later_shard()
            for kind, step in zip(self.kinds, self.triggers, strict=True):
                self._wait_for_step(step)
                fault = self._arm(kind)
                self.faults.append(fault)
                deadline = time.monotonic() + FAULT_WAIT_S
                while not fault.done.wait(0.1):
                    if self.finished.is_set() and fault.hits == 0:
                        self.proxy.disarm(fault)  # armed after the worker's last request: never injected
                        self.faults.pop()
                        self.outrun = True
                        return
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{kind} fault: the stream never recovered (hits {fault.hits})")
        except _RunEnded:
            self.outrun = True
        except BaseException as exc:
            self.errors.append(exc)

    def _wait_for_step(self, step: int) -> None:
        deadline = time.monotonic() + FAULT_WAIT_S
        while _steps_logged(self.log) < step:
            if self.finished.is_set():
                raise _RunEnded
            if time.monotonic() > deadline:
                raise AssertionError(f"training never reached step {step}")
            time.sleep(0.02)

    def _arm(self, kind: str) -> Fault:
        seconds = self.rng.uniform(0.5, self.longest_s)
        if kind == "slow":
            return self.proxy.arm("slow", seconds, delay_s=self.rng.uniform(0.3, self.longest_s / 2))
        if kind == "restart":
            downtime = self.rng.uniform(0.3, self.longest_s)

            def start_later() -> None:
                time.sleep(downtime)
                try:
                    self.server.start()
                except BaseException as exc:
                    self.errors.append(exc)

            def stop_and_restart() -> None:
                self.server.stop()
                threading.Thread(target=start_later, daemon=True).start()

            return self.proxy.arm("restart", 0.0, on_start=stop_and_restart)
        return self.proxy.arm(kind, seconds)

    def _delete_a_later_shard(self) -> str:
        """Delete a shard the stream has surely not opened yet (its first planned sample is due
        after prefetch and a shuffle window), so every later sample of it is skipped."""
        done = _steps_logged(self.log)
        by_url = {f"{self.data.rstrip('/')}/{name}": ids for name, ids in self.ids_by_name.items()}
        candidates = not_yet_read(self.reference, by_url, after_step=done, margin=WINDOW // BATCH + 4)
        assert candidates, f"no shard left to delete after step {done}"
        url = self.rng.choice(candidates)
        _client(self.server.endpoint).rm(url)
        return url


@pytest.mark.s3
@pytest.mark.scenario(SCENARIO)
def test_s3_faults_keep_the_sample_order(
    proxied: tuple[FaultProxy, SeaweedS3],
    s3_bucket: str,
    small_shards: Path,
    tmp_path: Path,
    fault_record: FaultRecord,
) -> None:
    proxy, server = proxied
    reference_data = _upload(server, small_shards, s3_bucket, "reference")
    _train(reference_data, tmp_path / "reference")
    reference = by_step(tmp_path / "reference" / "samples.jsonl")
    assert len(reference) == MAX_STEPS
    assert MANIFEST_NAME in {p.name for p in small_shards.iterdir()}
    plan = (reference, {p.name: shard_sample_ids(str(p)) for p in sorted(small_shards.glob("*.tar"))})

    rng = fault_rng(SCENARIO)
    wanted, attempts = trials(1, 3), 0
    while fault_record.trials < wanted:
        trial, attempts = attempts, attempts + 1
        assert attempts <= wanted + 3, "runs keep outrunning the fault plan: the test is too loose"
        data = _upload(server, small_shards, s3_bucket, f"trial-{trial}")
        out = tmp_path / f"trial-{trial}"
        warnings = logging.FileHandler(tmp_path / f"warnings-{trial}.log")
        logging.getLogger("streamtrain").addHandler(warnings)
        driver = _Driver(proxy, server, data, out / "samples.jsonl", rng, full=FULL, plan=plan)
        driver.start()
        try:
            _train(data, out)
        finally:
            driver.finished.set()
            driver.join(FAULT_WAIT_S)
            logging.getLogger("streamtrain").removeHandler(warnings)
            warnings.close()
        assert not driver.is_alive(), "the fault driver hung"
        if driver.errors:
            raise driver.errors[0]
        deleted = small_shards / driver.deleted.rsplit("/", 1)[1] if driver.deleted else None
        deleted_ids = shard_sample_ids(str(deleted)) if deleted else set()
        result = compare(reference, by_step(out / "samples.jsonl"), deleted_ids)
        assert result.same_order, "the sample order differs from the reference"
        assert (result.lost, result.repeated) == (0, 0), result
        if driver.outrun or result.skipped == 0:
            # The worker had read ahead of the plan: a planned fault came after its last request,
            # or the shard deleted "ahead" of it was already read. The order held (checked above),
            # but the trial tested less than planned; another one runs in its place.
            continue
        assert len(driver.faults) == len(TRANSIENT)
        final = [m for m in read_metrics(out) if "data/samples" in m][-1]
        log_text = (tmp_path / f"warnings-{trial}.log").read_text()
        fault_record.trials += 1
        fault_record.faults += len(driver.faults) + 1
        fault_record.lost += result.lost
        fault_record.repeated += result.repeated
        for fault in driver.faults:
            assert fault.hits > 0, f"the {fault.kind} fault never hit a request"
            fault_record.recovery_s.append(fault.recovery_s)
        # Transient faults were ridden out by retries, with the reference's exact order (above).
        fault_record.survived += len(driver.faults)
        # The deleted shard: every planned sample of it skipped, counted exactly, reported by name.
        assert result.skipped == occurrences(reference, deleted_ids) > 0
        assert final["data/shard_errors"] >= 1  # once per lane that reached it
        assert final["data/unreadable_samples"] == result.skipped
        assert driver.deleted in log_text and "missing" in log_text, log_text
        assert final["data/samples"] == MAX_STEPS * BATCH - result.skipped
        fault_record.survived += 1
