"""Recipes + dotted overrides -> typed config; every problem reported together."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from streamtrain.config import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    """A nested model section."""

    width: int = 8
    kind: str = "small"


@dataclass
class ToyModel:
    """A model section of a toy task."""

    dims: list[int] = field(default_factory=lambda: [4, 8])
    inner: Inner | None = field(default_factory=Inner)

    def problems(self) -> list[str]:
        return [] if self.dims == sorted(self.dims) else [f"dims: {self.dims} must ascend"]


TYPES = {"toy": ToyModel}


def write(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(payload) if not isinstance(payload, str) else payload)
    return path


def base() -> dict:
    return {"task": "toy", "output_dir": "runs/x", "data": {"train": "shards/"}}


def test_defaults_overrides_and_types(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, base()),
        [
            "train.max_steps=200",
            "train.lr=3e-4",
            "data.train=[a, s3://b/c]",
            "model.inner.width=16",
            "train.max_grad_norm=null",
            "log.trackers=[jsonl,tensorboard]",
        ],
        TYPES,
    )
    assert config.train.max_steps == 200 and config.train.lr == pytest.approx(3e-4)
    assert config.data.train == ["a", "s3://b/c"]
    assert config.model.inner.width == 16 and config.model.dims == [4, 8]
    assert config.train.max_grad_norm is None
    assert config.log.trackers == ["jsonl", "tensorboard"]
    assert config.train.resume == "auto"
    # The resolved config round-trips through YAML.
    again = load_config(write(tmp_path, config.to_yaml()), [], TYPES)
    assert again == config


def test_int_where_float_expected_and_null_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, base()), ["train.lr=1", "model.inner=null"], TYPES)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.inner is None


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    recipe = base() | {"trian": {}}
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(tmp_path, recipe),
            [
                "train.max_step=3",
                "train.lr=fast",
                "data.num_workers=-1",
                "train.mixed_precision=fp8",
                "model.dims=[8,4]",
                "model.inner.widht=2",
                "noequals",
            ],
            TYPES,
        )
    problems = "\n".join(caught.value.problems)
    assert "trian: unknown key (did you mean train?)" in problems
    assert "train.max_step: unknown key (did you mean train.max_steps?)" in problems
    assert "train.lr: 'fast' is not float" in problems
    assert "train.mixed_precision: 'fp8' is not one of 'auto', 'no', 'bf16', 'fp16'" in problems
    assert "model.inner.widht: unknown key (did you mean model.inner.width?)" in problems
    assert "override 'noequals': expected key.path=value" in problems
    assert len(caught.value.problems) == 6  # value checks (problems()) run once types are right


def test_value_checks_run_when_types_are_right(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(tmp_path, base()),
            [
                "data.num_workers=-1",
                "model.dims=[8,4]",
                "train.betas=[0.9]",
                "data.text_dropout_prob=2",
                "data.max_member_mb=0",
                "train.collective_timeout_s=0",
            ],
            TYPES,
        )
    assert sorted(caught.value.problems) == [
        "data.max_member_mb: 0.0 must be > 0",
        "data.num_workers: -1 must be >= 0",
        "data.text_dropout_prob: 2.0 is not in [0, 1]",
        "model.dims: [8, 4] must ascend",
        "train.betas: [0.9] must be two numbers in [0, 1)",
        "train.collective_timeout_s: 0.0 must be > 0",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("task: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("output_dir: x\n", "task: required, one of ['toy']"),
        ("task: toy\n", "output_dir: required"),
    ],
)
def test_malformed_recipes(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, text), [], TYPES)


def test_missing_file_and_required_train_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml", [], TYPES)
    with pytest.raises(ConfigError, match=r"data\.train: required"):
        load_config(write(tmp_path, {"task": "toy", "output_dir": "x"}), [], TYPES)


def test_parse_overrides_nests_and_parses_yaml() -> None:
    tree, problems = parse_overrides(["a.b.c=1", "a.b.d=x y", "a.e=[1, 2]", "f="])
    assert tree == {"a": {"b": {"c": 1, "d": "x y"}, "e": [1, 2]}, "f": ""}
    assert problems == []


def test_retry_keys_are_checked_with_their_paths(tmp_path: Path) -> None:
    recipe = write(tmp_path, base())
    data = load_config(recipe, ["data.retries=2", "data.retry_backoff_s=0.1"], TYPES).data
    assert (data.retries, data.retry_backoff_s, data.retry_max_backoff_s) == (2, 0.1, 8.0)
    bad = ["data.retries=0", "data.retry_backoff_s=-1", "data.retry_max_backoff_s=2"]
    with pytest.raises(ConfigError) as error:
        load_config(recipe, bad, TYPES)
    assert error.value.problems == [
        "data.retries: 0 must be >= 1",
        "data.retry_backoff_s: -1.0 must be >= 0",
    ]
    with pytest.raises(ConfigError) as error:
        load_config(recipe, ["data.retry_backoff_s=4", "data.retry_max_backoff_s=2", "data.retries=x"], TYPES)
    assert error.value.problems == ["data.retries: 'x' is not int"]
    with pytest.raises(ConfigError) as error:
        load_config(recipe, ["data.retry_backoff_s=4", "data.retry_max_backoff_s=2"], TYPES)
    assert error.value.problems == ["data.retry_max_backoff_s: 2.0 must be >= retry_backoff_s (4.0)"]


def test_a_mixture_round_trips_and_plain_lists_stay_plain(tmp_path: Path) -> None:
    mixture = [{"path": "a", "weight": {0: 2, 100: 0.5}, "name": "cap"}, {"path": ["b", "c"], "weight": 1}]
    config = load_config(write(tmp_path, {**base(), "data": {"train": mixture}}), [], TYPES)
    assert [spec.name for spec in config.data.train] == ["cap", None]  # type: ignore[union-attr]
    again = load_config(write(tmp_path, config.to_yaml()), [], TYPES)
    assert again.data.train == config.data.train
    plain = load_config(write(tmp_path, {**base(), "data": {"train": ["a", "b"]}}), [], TYPES)
    assert plain.data.train == ["a", "b"]


def test_every_mixture_mistake_is_reported_at_once(tmp_path: Path) -> None:
    mixture = [
        {"path": "a", "weight": -1},
        {"path": "b", "weight": "heavy"},
        {"path": "c", "weight": {10: 1, 5: 2}},
        {"path": "d", "weight": {1.5: 1}},
        {"path": "e", "wieght": 1},
        "plain",
    ]
    recipe = yaml.safe_dump({**base(), "data": {"train": mixture}}, sort_keys=False)  # steps as written
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, recipe), [], TYPES)
    text = str(caught.value)
    for expected in (
        "data.train[0].weight: -1 must be a finite number >= 0",
        "data.train[1].weight: 'heavy' is not a number",
        "data.train[2].weight: schedule steps [10, 5] are not in ascending order",
        "data.train[3].weight: schedule step 1.5 is not a whole number >= 0",
        "data.train[4].wieght: unknown key (did you mean data.train[4].weight?)",
    ):
        assert expected in text, text
    off = [{"path": "a", "weight": {0: 1, 50: 0}}, {"path": "b", "weight": {0: 1, 40: 0}}]
    with pytest.raises(ConfigError, match=r"data.train: every weight is 0 from step 50"):
        load_config(write(tmp_path, {**base(), "data": {"train": off}}), [], TYPES)
    mixed = [{"path": "a"}, "b"]
    with pytest.raises(ConfigError, match=r"entries \[1\] are plain paths"):
        load_config(write(tmp_path, {**base(), "data": {"train": mixed}}), [], TYPES)
    same = [{"path": "x/train"}, {"path": "y/train"}]
    with pytest.raises(ConfigError, match=r"source names \['train'\] are used more than once"):
        load_config(write(tmp_path, {**base(), "data": {"train": same}}), [], TYPES)


def test_the_config_schema_names_every_task_with_its_model_section() -> None:
    """The model sections checked before torch is imported are the ones the tasks build from."""
    from streamtrain.config.models import MODEL_TYPES
    from streamtrain.tasks import model_types

    assert model_types() == MODEL_TYPES


def test_a_bad_recipe_is_refused_before_torch_is_imported() -> None:
    code = (
        "import sys\n"
        "from streamtrain.cli import main\n"
        "status = main(['train', 'configs/alignment.yaml', 'train.max_stepz=3'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(status)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "train.max_stepz: unknown key (did you mean train.max_steps?)" in done.stderr
    assert "Traceback" not in done.stderr
