"""The shardify command: exit codes, messages without tracebacks, help, summary."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from shardify.cli import parse_size
from tests import factories
from tests.shardify.helpers import read_manifest


def shardify(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardify", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("shardify: error:")
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_help_explains_every_option() -> None:
    result = shardify("parquet-to-tar", "--help")
    assert result.returncode == 0
    for option in (
        "--output",
        "--schema",
        "--max-samples-per-shard",
        "--max-shard-bytes",
        "--workers",
        "--engine",
        "--ray-address",
        "--unit-size",
        "--prefix",
        "--quiet",
        "s3://",
        "manifest.json",
        "skipped.jsonl",
    ):
        assert option in result.stdout


def test_summary_table(tmp_path: Path) -> None:
    rows = factories.caption_rows(20)
    rows[3]["image_bytes"] = b"junk"
    source = factories.write_parquet(tmp_path / "in.parquet", rows)
    result = shardify("parquet-to-tar", str(source), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    for text in ("rows read", "20", "samples written", "19", "unidentified", "rows/s", "skipped.jsonl"):
        assert text in result.stdout
    quiet = shardify("parquet-to-tar", str(source), "-o", str(tmp_path / "out2"), "--quiet")
    assert quiet.returncode == 0 and len(quiet.stdout.strip().splitlines()) == 1 and quiet.stderr == ""


def test_no_inputs_matched(tmp_path: Path) -> None:
    assert_user_error(
        shardify("parquet-to-tar", str(tmp_path / "nothing-*.parquet"), "-o", str(tmp_path / "o")),
        "no input matched",
    )
    assert_user_error(
        shardify("parquet-to-tar", str(tmp_path / "missing.parquet"), "-o", str(tmp_path / "o")),
        "does not exist",
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(
        shardify("parquet-to-tar", str(tmp_path / "empty"), "-o", str(tmp_path / "o")), "no *.parquet"
    )


def test_non_parquet_input(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("name,caption\nx,y\n")
    assert_user_error(
        shardify("parquet-to-tar", str(bogus), "-o", str(tmp_path / "o")),
        str(bogus),
        "not a readable parquet file",
    )
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_columns_named_with_what_was_found(tmp_path: Path) -> None:
    table_path = factories.write_parquet(
        tmp_path / "wrong.parquet", [{"sample_id": "a", "caption": "b", "img": b"x"}]
    )
    assert_user_error(
        shardify("parquet-to-tar", str(table_path), "-o", str(tmp_path / "o")),
        "missing required column",
        "image_bytes",
        "found: sample_id, caption, img",
    )
    no_text = factories.write_parquet(tmp_path / "notext.parquet", [{"sample_id": "a", "image_bytes": b"x"}])
    assert_user_error(
        shardify("parquet-to-tar", str(no_text), "-o", str(tmp_path / "o")),
        "cannot tell the schema",
        "found: sample_id, image_bytes",
    )
    assert_user_error(
        shardify("parquet-to-tar", str(no_text), "-o", str(tmp_path / "o"), "--schema", "qa"),
        "question, answer",
    )


def test_media_column_of_wrong_type(tmp_path: Path) -> None:
    path = factories.write_parquet(
        tmp_path / "t.parquet",
        [{"caption": "b", "image_bytes": "a string"}],
        schema=pa.schema([("caption", pa.string()), ("image_bytes", pa.string())]),
    )
    assert_user_error(shardify("parquet-to-tar", str(path), "-o", str(tmp_path / "o")), "must be binary")


def test_output_that_cannot_be_written(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(2))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_user_error(
        shardify("parquet-to-tar", str(source), "-o", str(blocker / "out")), "cannot write to output"
    )


def test_bad_option_values(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(2))
    assert_user_error(
        shardify("parquet-to-tar", str(source), "-o", str(tmp_path / "o"), "--workers", "0"),
        "--workers must be at least 1",
    )
    assert_user_error(
        shardify("parquet-to-tar", str(source), "-o", str(tmp_path / "o"), "--prefix", "a/b"), "--prefix"
    )
    result = shardify("parquet-to-tar", str(source), "-o", str(tmp_path / "o"), "--max-shard-bytes", "lots")
    assert result.returncode == 2 and "not a size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("500MB", 500_000_000),
        ("1GiB", 1 << 30),
        ("1.5G", int(1.5 * (1 << 30))),
        ("2kb", 2000),
        ("64M", 64 << 20),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_console_script_is_installed(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(4))
    script = Path(sys.executable).parent / "shardify"
    result = subprocess.run(
        [str(script), "parquet-to-tar", str(source), "-o", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "o")["samples_written"] == 4


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import os
    import pty

    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(40))
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "shardify", "parquet-to-tar", str(source), "-o", str(tmp_path / "o")],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    terminal = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the pty closes when the process exits
            break
        if not chunk:
            break
        terminal += chunk
    assert process.wait(timeout=120) == 0
    os.close(leader)
    assert b"converting" in terminal and b"rows/s" in terminal and b"40/40" in terminal


def _closed_port() -> int:
    with socket.socket() as sock:  # bound and closed again: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ray_engine_refusals_name_the_cluster_and_write_nothing(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(2))
    out = tmp_path / "out"
    address = f"127.0.0.1:{_closed_port()}"
    convert = ("parquet-to-tar", str(source), "-o", str(out), "--engine", "ray")
    assert_user_error(
        shardify(*convert, "--ray-address", address), f"cannot reach the Ray cluster at {address}"
    )
    assert_user_error(shardify(*convert, "--ray-address", "head-node"), "expected HOST:PORT")
    assert_user_error(
        shardify("parquet-to-tar", str(source), "-o", str(out), "--ray-address", address),
        "--ray-address is only for --engine ray",
    )
    from_environment = subprocess.run(
        [sys.executable, "-m", "shardify", *convert],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": address},
    )
    assert_user_error(from_environment, f"cannot reach the Ray cluster at {address}")
    assert not out.exists()


def test_ray_engine_without_ray_installed(tmp_path: Path) -> None:
    source = factories.write_parquet(tmp_path / "in.parquet", factories.caption_rows(2))
    out = tmp_path / "out"
    # The real command line with `import ray` failing, as it does where Ray is not installed.
    script = (
        "import sys; sys.modules['ray'] = None\nfrom shardify.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "parquet-to-tar", str(source), "-o", str(out), "--engine", "ray"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(result, "--engine ray needs Ray, which is not installed", "./launch.sh setup")
    assert not out.exists()
