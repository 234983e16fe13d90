"""Step folders: publication with the marker last, latest complete, stale cleanup, rotation, best/."""

from __future__ import annotations

from pathlib import Path

from streamtrain.train import checkpoint


def make(output: Path, step: int, complete: bool = True) -> Path:
    staging = checkpoint.staging_dir(output, step)
    staging.mkdir(parents=True)
    (staging / "weights.bin").write_bytes(b"x" * step)
    if complete:
        return checkpoint.publish(staging, output, step)
    return staging


def test_publish_marks_after_rename_and_latest_ignores_unmarked(tmp_path: Path) -> None:
    make(tmp_path, 100)
    make(tmp_path, 200)
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "step-00000200"
    # A folder renamed into place whose marker never got written (killed in between).
    crashed = make(tmp_path, 300, complete=False)
    crashed.rename(tmp_path / "step-00000300")
    make(tmp_path, 400, complete=False)  # a staging folder, killed mid-write
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "step-00000200"
    # A marker naming another step than the folder (copied by hand) is not trusted.
    (tmp_path / "step-00000300" / checkpoint.MARKER).write_text('{"step": 999}')
    assert checkpoint.latest_complete(tmp_path) == tmp_path / "step-00000200"
    removed = checkpoint.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step-00000400", "step-00000300"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000100", "step-00000200"]


def test_publish_replaces_an_incomplete_leftover_of_the_same_step(tmp_path: Path) -> None:
    leftover = tmp_path / "step-00000100"
    leftover.mkdir()
    (leftover / "junk").write_text("old")
    final = make(tmp_path, 100)
    assert not (final / "junk").exists() and checkpoint.is_complete(final)


def test_rotation_keeps_last_and_every_nth(tmp_path: Path) -> None:
    for step in range(100, 1100, 100):
        make(tmp_path, step)
    removed = checkpoint.rotate(tmp_path, keep_last=2, keep_every_steps=500)
    kept = [path.name for _, path in checkpoint.step_dirs(tmp_path)]
    assert kept == ["step-00000500", "step-00000900", "step-00001000"]
    assert len(removed) == 7
    checkpoint.rotate(tmp_path, keep_last=1, keep_every_steps=0)
    assert [path.name for _, path in checkpoint.step_dirs(tmp_path)] == ["step-00001000"]


def test_replace_dir_swaps_best(tmp_path: Path) -> None:
    best = tmp_path / "best"
    for value in ("first", "second"):
        staging = tmp_path / ".tmp-best"
        staging.mkdir()
        (staging / "metrics.json").write_text(value)
        checkpoint.replace_dir(staging, best)
        assert (best / "metrics.json").read_text() == value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_best_survives_a_replace_killed_between_its_renames(tmp_path: Path) -> None:
    old = tmp_path / ".tmp-old-best"  # where replace_dir moves best/ before renaming the new one in
    old.mkdir()
    (old / "metrics.json").write_text('{"step": 4}')
    checkpoint.remove_stale(tmp_path)
    assert (tmp_path / "best" / "metrics.json").read_text() == '{"step": 4}'
    assert not old.exists()
