"""Resolving data sources into shards with exact counts."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert
from streamtrain.data.shards import DataSourceError, resolve
from tests import factories
from tests.streamtrain.train.conftest import ROOT, env


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sources")
    factories.write_parquet(folder / "a.parquet", factories.caption_rows(25, size=(8, 8)))
    factories.write_parquet(folder / "b.parquet", factories.caption_rows(7, start=100, size=(8, 8)))
    convert([str(folder / "a.parquet")], ConvertOptions(output=str(folder / "one"), max_samples_per_shard=10))
    convert([str(folder / "b.parquet")], ConvertOptions(output=str(folder / "two"), prefix="qa"))
    return folder / "one", folder / "two"


def test_directory_manifest_and_pattern_agree(outputs: tuple[Path, Path]) -> None:
    one, _ = outputs
    by_dir = resolve(str(one))
    assert [(Path(s.url).name, s.samples) for s in by_dir.shards] == [
        ("shard-000000-000000.tar", 10),
        ("shard-000000-000001.tar", 10),
        ("shard-000000-000002.tar", 5),
    ]
    assert resolve(str(one / "manifest.json")) == by_dir
    assert resolve(str(one / "shard-000000-{000000..000002}.tar")) == by_dir
    assert resolve(str(one / "shard-000000-000001.tar")).samples == 10
    assert by_dir.schema == "caption" and by_dir.samples == 25


def test_list_of_sources_concatenates(outputs: tuple[Path, Path]) -> None:
    one, two = outputs
    both = resolve([str(one), str(two)])
    assert both.samples == 32 and len(both.shards) == 4
    assert both.fingerprint() != resolve(str(one)).fingerprint()


@pytest.mark.parametrize(
    "source, message",
    [
        ("missing-dir", "holds no manifest.json"),
        ("one/shard-{000000..000005}.tar", "not listed in"),
        ("nowhere/shard-000000-000000.tar", "does not exist"),
    ],
)
def test_bad_sources_are_named(outputs: tuple[Path, Path], source: str, message: str) -> None:
    base = outputs[0].parent
    with pytest.raises(DataSourceError, match=message):
        resolve(str(base / source))


def test_same_shard_twice_is_refused(outputs: tuple[Path, Path]) -> None:
    with pytest.raises(DataSourceError, match="more than once"):
        resolve([str(outputs[0]), str(outputs[0] / "shard-000000-000000.tar")])


@pytest.mark.parametrize(
    "form",
    ["{}", "{}/manifest.json", "{}/shard-{{000000..000002}}.tar"],
    ids=["directory", "manifest", "pattern"],
)
def test_unreachable_endpoint_is_a_data_source_error(
    refused_endpoint: str, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # one try by botocore: the message says so
    source = form.format("s3://bucket/pixmo")
    with pytest.raises(DataSourceError) as error:
        resolve(source)
    message = str(error.value)
    assert f"cannot reach the S3 endpoint {refused_endpoint} (from AWS_ENDPOINT_URL)" in message
    assert "no connection after 1 try in" in message and "check the endpoint URL" in message
    assert "\n" not in message


def test_unreachable_endpoint_ends_train_with_one_line(refused_endpoint: str, tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamtrain.cli",
            "train",
            str(ROOT / "configs" / "alignment.yaml"),
            "data.train=s3://bucket/pixmo",
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        # Two tries, not botocore's default five (12 s of back-off; test_storage.py waits those).
        env={**env(), "AWS_MAX_ATTEMPTS": "2"},
        cwd=ROOT,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("streamtrain:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-3000:]
    line = errors[0]
    assert line.startswith(
        f"streamtrain: error: data.train: cannot reach the S3 endpoint {refused_endpoint}"
    ), line
    for needle in ("AWS_ENDPOINT_URL", "s3://bucket/pixmo", "credentials", "network"):
        assert needle in line, line
    waited = re.search(r"no connection after (\d+) tries in ([0-9.]+) s", line)
    assert waited is not None and int(waited.group(1)) == 2, line  # botocore's own tries
    assert float(waited.group(2)) < 40 and elapsed < 120, (line, elapsed)  # imports take ~20 s here
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_sources_keep_their_names_and_shards(outputs: tuple[Path, Path]) -> None:
    one, two = outputs
    both = resolve([str(one), str(two / "manifest.json")])
    assert [(source.name, [s.samples for s in source.shards]) for source in both.sources] == [
        (str(one), [10, 10, 5]),
        (str(two / "manifest.json"), [7]),
    ]
    assert both.shards == both.sources[0].shards + both.sources[1].shards
    assert [source.samples for source in both.sources] == [25, 7] and both.samples == 32
    # The fingerprint a saved loader state holds is that of the flat shard list, as before.
    flat = "\n".join(f"{s.url}\t{s.samples}" for s in both.shards)
    assert both.fingerprint() == hashlib.sha256(flat.encode()).hexdigest()[:16]
