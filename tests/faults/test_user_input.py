"""Scenario 7: bad input everywhere a user types — each a clear message and exit code, no
traceback, nothing overwritten.

Every case runs the real command-line entry points (``streamtrain.cli.main``,
``shardify.cli.main``) in this process, with stderr captured: a case passes when the exit
status is the documented one (2: bad config or input), stderr names what was wrong, holds no
traceback, and every file that existed before (a finished run's checkpoints, the inputs) has
the same bytes and modification time afterwards. One case also goes through a real subprocess
to show the whole process exits the same way.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shardify import cli as shardify_cli
from streamtrain import cli
from tests.faults.conftest import FaultRecord
from tests.streamtrain.train.conftest import ROOT, digits_shards, env, tiny_overrides  # noqa: F401

ALIGNMENT = ROOT / "configs" / "alignment.yaml"
VLM = ROOT / "configs" / "vlm_qa.yaml"
QUICK = {"train.max_steps": 1, "data.num_workers": 0, "log.progress_bar": False}


def snapshot(*roots: Path) -> dict[Path, tuple[int, bytes]]:
    """Every file under ``roots``: modification time and bytes."""
    files = [path for root in roots if root.exists() for path in sorted(root.rglob("*")) if path.is_file()]
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files}


def run_cli(main: Callable[[list[str]], int], args: list[object]) -> tuple[int, str]:
    """Exit status and stderr of an entry point; argparse's SystemExit counts as a status."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.scenario("7. bad user input")
def test_every_mistake_is_named_with_exit_2_and_nothing_is_overwritten(
    digits_shards: dict[str, Path],  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    fault_record: FaultRecord,
) -> None:
    # A finished run whose checkpoints every case below must leave untouched.
    run = tmp_path / "run"
    code, err = run_cli(cli.main, ["train", ALIGNMENT, *tiny_overrides(digits_shards, run, **QUICK)])
    assert code == 0, err
    step = run / "step-00000001"
    assert step.is_dir()
    other_model = tiny_overrides(digits_shards, tmp_path / "other", **QUICK, **{"model.vision.width": 8})
    a_file = write(tmp_path / "a-file", "x")
    (tmp_path / "empty").mkdir()
    not_alignment = tmp_path / "vlm-run" / "best"  # a VLM checkpoint where an alignment one belongs
    not_alignment.mkdir(parents=True)
    write(not_alignment / "config.yaml", "task: vlm_qa\n")
    write(not_alignment / "model.safetensors", "")

    def train(config: Path, *overrides: object) -> list[object]:
        return ["train", config, *overrides]

    base = tiny_overrides(digits_shards, tmp_path / "new", **QUICK)
    streamtrain_cases: dict[str, tuple[list[object], list[str]]] = {
        "YAML with a tab": (
            train(write(tmp_path / "tab.yaml", "task: alignment\ndata:\n\ttrain: x\n")),
            [
                "tab.yaml",
                "not valid YAML: line 3, column 1",
            ],
        ),
        "unclosed YAML list": (
            train(write(tmp_path / "open.yaml", "data: [1, 2\n")),
            [
                "open.yaml",
                "not valid YAML: line 2",
            ],
        ),
        "recipe that is a list": (train(write(tmp_path / "list.yaml", "- a\n")), ["must be a mapping"]),
        "empty recipe": (
            train(write(tmp_path / "empty.yaml", "")),
            ["task: required", "output_dir: required"],
        ),
        "missing recipe": (train(tmp_path / "nope.yaml"), ["cannot read", "nope.yaml"]),
        "unknown task": (train(ALIGNMENT, *base, "task=alignmnt"), ["task: 'alignmnt' is not one of"]),
        "mistyped key": (train(ALIGNMENT, *base, "train.max_step=3"), ["did you mean train.max_steps?"]),
        "mistyped nested key in YAML": (
            train(
                write(
                    tmp_path / "typo.yaml",
                    f"task: alignment\noutput_dir: {tmp_path / 'x'}\n"
                    "model: {vision: {kind: small_cnn, widht: 3}}\n",
                ),
                f"data.train={digits_shards['train']}",
            ),
            ["model.vision.widht: unknown key (did you mean model.vision.width?)"],
        ),
        "override without =": (train(ALIGNMENT, *base, "train.max_steps"), ["expected key.path=value"]),
        "value of the wrong type": (
            train(ALIGNMENT, *base, "train.lr=fast"),
            ["train.lr: 'fast' is not float"],
        ),
        "value out of range": (
            train(ALIGNMENT, *base, "train.batch_size=0"),
            ["train.batch_size: 0 must be >= 1"],
        ),
        "unknown tracker": (train(ALIGNMENT, *base, "log.trackers=[foo]"), ["log.trackers[0]: 'foo'"]),
        "train data that does not exist": (
            train(ALIGNMENT, *base, f"data.train={tmp_path / 'nowhere'}"),
            [str(tmp_path / "nowhere")],
        ),
        "eval data that is not shards": (
            train(ALIGNMENT, *base, f"data.eval={tmp_path / 'empty'}"),
            ["holds no manifest.json"],
        ),
        "train data that is a parquet file": (
            train(ALIGNMENT, *base, f"data.train={ROOT / 'sample' / 'digits_caption' / 'train.parquet'}"),
            ["train.parquet holds no manifest.json"],
        ),
        "output_dir that is a file": (
            train(ALIGNMENT, *base, f"output_dir={a_file}"),
            ["output_dir:", "is not a directory"],
        ),
        "DeepSpeed config that does not exist": (
            train(ALIGNMENT, *base, f"train.deepspeed={tmp_path / 'ds.json'}"),
            ["train.deepspeed", "not a file"],
        ),
        "DeepSpeed config that is not JSON": (
            train(ALIGNMENT, *base, f"train.deepspeed={write(tmp_path / 'bad.json', '{nope')}"),
            ["train.deepspeed", "bad.json is not valid JSON"],
        ),
        "resume from a folder that is no checkpoint": (
            train(ALIGNMENT, *base, f"train.resume={tmp_path / 'empty'}"),
            ["train.resume", "not a complete checkpoint"],
        ),
        "output_dir with another model's checkpoints": (
            train(
                ALIGNMENT,
                *[o for o in other_model if not str(o).startswith("output_dir=")],
                f"output_dir={run}",
            ),
            ["different model"],
        ),
        "resume from a checkpoint of an incompatible config": (
            train(ALIGNMENT, *other_model, f"train.resume={step}"),
            ["different model"],
        ),
        "resume=none over existing checkpoints": (
            train(ALIGNMENT, *tiny_overrides(digits_shards, run, **QUICK), "train.resume=none"),
            ["train.resume"],
        ),
        "VLM without an aligned encoder": (
            train(VLM, f"output_dir={tmp_path / 'vlm'}", f"model.encoder_checkpoint={tmp_path / 'empty'}"),
            ["model.encoder_checkpoint", "./launch.sh alignment"],
        ),
        "VLM decoder that does not exist": (
            train(
                VLM,
                f"output_dir={tmp_path / 'vlm'}",
                f"model.encoder_checkpoint={run}",
                f"model.decoder={tmp_path / 'no-decoder'}",
            ),
            ["model.decoder", "does not exist"],
        ),
        "VLM decoder that is not a model": (
            train(
                VLM,
                f"output_dir={tmp_path / 'vlm'}",
                f"model.encoder_checkpoint={run}",
                f"model.decoder={tmp_path / 'empty'}",
            ),
            ["model.decoder", "holds no config.json"],
        ),
        "VLM encoder from a run that is not alignment": (
            train(
                VLM,
                f"output_dir={tmp_path / 'vlm'}",
                f"model.encoder_checkpoint={not_alignment}",
                f"model.decoder={tmp_path / 'empty'}",
            ),
            ["model.encoder_checkpoint", "is not an alignment checkpoint"],
        ),
    }
    parquet = ROOT / "sample" / "digits_caption" / "train.parquet"
    shardify_cases: dict[str, tuple[list[object], list[str]]] = {
        "shardify: input that does not exist": (
            ["parquet-to-tar", tmp_path / "missing.parquet", "-o", tmp_path / "s1"],
            ["does not exist"],
        ),
        "shardify: input that is not parquet": (
            ["parquet-to-tar", a_file, "-o", tmp_path / "s2"],
            ["a-file"],
        ),
        "shardify: output that is a file": (["parquet-to-tar", parquet, "-o", a_file], ["a-file"]),
        "shardify: bad option value": (
            ["parquet-to-tar", parquet, "-o", tmp_path / "s3", "--max-samples-per-shard", "0"],
            ["--max-samples-per-shard"],
        ),
        "shardify: output holding another conversion": (
            ["parquet-to-tar", parquet, "-o", digits_shards["train"]],
            [str(digits_shards["train"])],
        ),
    }

    protected = (run, digits_shards["train"], digits_shards["eval"], a_file, tmp_path / "empty")
    before = snapshot(*protected)
    failures = []
    cases = [(cli.main, *case) for case in streamtrain_cases.items()]
    cases += [(shardify_cli.main, *case) for case in shardify_cases.items()]
    for main, name, (args, expected) in cases:
        fault_record.faults += 1
        with fault_record.recovering():
            code, err = run_cli(main, args)
        problems = []
        if code != 2:
            problems.append(f"exit {code}, not 2")
        problems += [f"stderr lacks {text!r}" for text in expected if text not in err]
        if "Traceback" in err:
            problems.append("a traceback")
        if snapshot(*protected) != before:
            problems.append("files changed")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n    stderr: {err.strip()[-400:]}")
        else:
            fault_record.survived += 1
    fault_record.trials = len(cases)
    assert not failures, "\n".join(failures)

    # The same through a real process: the exit status and stderr the shell sees.
    result = subprocess.run(
        [sys.executable, "-m", "streamtrain.cli", "train", ALIGNMENT, *map(str, base), "train.max_step=3"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "did you mean train.max_steps?" in result.stderr and "Traceback" not in result.stderr
