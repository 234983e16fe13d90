"""The Ray engine: each unfinished unit is one Ray task, retried by Ray if its worker or node dies.

Tasks run :func:`shardify.units.convert_unit`, the code the local engine runs, so the output is
the same byte for byte. They write straight to the output (a path every node sees, or S3); the
driver only plans, watches and, at the end, writes the manifest from the units' done records,
so its memory grows with the number of units, never with rows.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import shardify
from shardify.options import ConvertOptions
from shardify.output import WORK_DIR, Output
from shardify.sources import InputError, open_inputs
from shardify.units import UnitFailure, UnitJob, UnitOutcome, convert_unit

TASK_RETRIES = 3
"""Attempts after the first, for a unit whose worker or node died or that raised an error."""
FORWARDED_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)
"""The driver's S3 settings, given to every task so nodes need no configuration of their own."""
CONNECT_TIMEOUT_S = 10.0
_REPORT_EVERY_S = 1.0
_POLL_S = 0.5


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(
            "--engine ray needs Ray, which is not installed in this environment: "
            "./launch.sh setup installs it (or: pip install 'ray>=2.58')"
        ) from None
    return ray


def _address(options: ConvertOptions) -> str | None:
    return options.ray_address or os.environ.get("RAY_ADDRESS")


def preflight(options: ConvertOptions) -> None:
    """Before anything is written: Ray is installed and the cluster, if one is named, answers."""
    _import_ray()
    address = _address(options)
    if address and address != "auto":
        _reachable(address)


def _connect(ray: Any, options: ConvertOptions) -> None:
    address = _address(options)
    environment = {name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ}
    # The driver's own shardify goes to every worker, so all nodes run the same conversion code.
    runtime_env: dict[str, Any] = {"py_modules": [str(Path(shardify.__file__).parent)]}
    if environment:
        runtime_env["env_vars"] = environment
    settings: dict[str, Any] = {"logging_level": logging.WARNING, "runtime_env": runtime_env}
    try:
        if address:
            ray.init(address=address, **settings)
        else:  # a Ray of our own, even where `ray start` runs here (ray.init() would join that)
            ray.init(address="local", num_cpus=options.workers, include_dashboard=False, **settings)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise InputError(f"cannot connect to {where}: {exc}") from None


def _reachable(address: str) -> None:
    """Fail fast, naming the address, when nothing listens there (Ray itself would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(
            f"--ray-address {address!r}: expected HOST:PORT of the cluster's head, e.g. 10.0.0.1:6379"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise InputError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}; "
            "is `ray start --head` running there?"
        ) from None


def _probe_node(output_url: str, input_urls: list[str]) -> list[str]:
    """On one node: can it write the output and read the inputs? The problems found."""
    problems = []
    try:
        output = Output(output_url)
        try:
            probe = f"{WORK_DIR}/node-probe-{uuid.uuid4().hex}"
            output.write_text(probe, "")
            output.remove([probe])
        finally:
            output.close()
    except (InputError, OSError) as exc:
        problems.append(f"cannot write to the output {output_url}: {exc}")
    try:
        from shardify.jsoninput import JSON_SUFFIXES, open_json_inputs

        json_urls = [url for url in input_urls if url.endswith(JSON_SUFFIXES)]
        open_inputs([url for url in input_urls if url not in json_urls])
        open_json_inputs(json_urls)
    except InputError as exc:
        problems.append(str(exc))
    return problems


def _check_nodes(ray: Any, options: ConvertOptions, jobs: list[UnitJob]) -> None:
    """Refuse to start when some node of the cluster cannot write the output or read an input."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    sources = list(dict.fromkeys(job.item.url for job in jobs))
    sample = sources if len(sources) <= 2 else [sources[0], sources[-1]]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_node)
    nodes = [node for node in ray.nodes() if node["Alive"]]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            options.output, sample
        )
        for node in nodes
    ]
    problems = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            found = ray.get(ref, timeout=300)
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
            continue  # the node left the cluster since it was listed: no task will run there
        except ray.exceptions.RayError as exc:
            found = [f"could not be checked: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
        problems += [f"Ray node {node['NodeManagerAddress']}: {problem}" for problem in found]
    if problems:
        raise InputError("; ".join(problems))


class _RowCounts:
    """A Ray actor: rows consumed so far by each unit being converted, as its tasks report them."""

    def __init__(self) -> None:
        self.rows: dict[int, int] = {}

    def report(self, unit: int, rows: int) -> None:
        self.rows[unit] = rows

    def snapshot(self) -> dict[int, int]:
        return self.rows


def _convert_unit_task(job: UnitJob, counts: Any) -> UnitOutcome:
    """One unit, in a Ray task of one CPU: one check thread beside the reading and writing one."""
    last = [0.0]

    def report(rows: int) -> None:
        now = time.monotonic()
        if now - last[0] >= _REPORT_EVERY_S:
            last[0] = now
            counts.report.remote(job.unit.index, rows)

    return convert_unit(replace(job, options=replace(job.options, workers=1)), report)


def _failure(ray: Any, job: UnitJob, exc: Exception) -> UnitFailure:
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if cause is not None:
        error = f"{type(cause).__name__}: {cause}"
    else:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return UnitFailure(job.unit, job.item.url, f"{error} (after {TASK_RETRIES} retries)")


def run_on_ray(
    jobs: list[UnitJob],
    options: ConvertOptions,
    committed: dict[int, int],
    on_rows: Callable[[int], None] | None,
) -> tuple[list[UnitOutcome], list[UnitFailure], float]:
    """Convert ``jobs`` as Ray tasks; ``committed`` holds the rows each unit's journal had at start.

    Also returns the seconds spent joining (or starting) the cluster and checking its nodes.
    """
    if not jobs:
        return [], [], 0.0
    started = time.perf_counter()
    ray = _import_ray()
    _connect(ray, options)
    try:
        _check_nodes(ray, options, jobs)
        startup_s = time.perf_counter() - started
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # The progress counter lives beside the driver and restarts if lost: only the bar needs it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        counter = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_RowCounts)
        counts = counter.options(scheduling_strategy=here).remote()
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=True)(_convert_unit_task)
        pending = {task.remote(job, counts): job for job in jobs}
        outcomes: list[UnitOutcome] = []
        failures: list[UnitFailure] = []
        shown = sum(committed[job.unit.index] for job in jobs)
        finished_rows = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_POLL_S)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    failures.append(_failure(ray, job, exc))
                    continue
                outcomes.append(outcome)
                finished_rows += job.unit.rows
            if on_rows:
                try:
                    reported = ray.get(counts.snapshot.remote(), timeout=10)
                except ray.exceptions.RayError:
                    reported = {}
                position = finished_rows + sum(
                    max(committed[job.unit.index], reported.get(job.unit.index, 0))
                    for job in pending.values()
                )
                on_rows(position - shown)
                shown = position
        return outcomes, failures, startup_s
    finally:
        ray.shutdown()
