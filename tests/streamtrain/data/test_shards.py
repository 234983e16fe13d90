"""Resolving data sources into shards with exact counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardify.convert import ConvertOptions, convert
from streamtrain.data.shards import DataSourceError, resolve
from tests import factories


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
        ("shard-000000.tar", 10),
        ("shard-000001.tar", 10),
        ("shard-000002.tar", 5),
    ]
    assert resolve(str(one / "manifest.json")) == by_dir
    assert resolve(str(one / "shard-{000000..000002}.tar")) == by_dir
    assert resolve(str(one / "shard-000001.tar")).samples == 10
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
        ("nowhere/shard-000000.tar", "does not exist"),
    ],
)
def test_bad_sources_are_named(outputs: tuple[Path, Path], source: str, message: str) -> None:
    base = outputs[0].parent
    with pytest.raises(DataSourceError, match=message):
        resolve(str(base / source))


def test_same_shard_twice_is_refused(outputs: tuple[Path, Path]) -> None:
    with pytest.raises(DataSourceError, match="more than once"):
        resolve([str(outputs[0]), str(outputs[0] / "shard-000000.tar")])
