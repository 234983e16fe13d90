"""The conversation schema on tiny parquets of every published PixMo layout and a LLaVA JSON.

Each test builds rows of the exact Arrow types the Hugging Face cards give, converts them, and
checks from the shards alone that every turn of every row is there, once, in its image's sample.
Images by URL come from a loopback server that counts requests (grouped URLs: fetched once).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from shardify.cli import main
from shardify.conversations import points_text
from shardify.convert import ConvertOptions, convert
from shardify.index import IndexOptions, index
from tests import factories
from tests.shardify.helpers import (
    local_committed_rows,
    output_files,
    read_manifest,
    read_samples,
    read_skipped,
)
from tests.shardify.test_fetch import FAST_FETCH, ImageServer, image

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
WIDTH, HEIGHT = 48, 32  # the server's images


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            patch.delenv(name, raising=False)
        instance = ImageServer()
        thread = threading.Thread(target=instance.serve_forever, daemon=True)
        thread.start()
        yield instance
        instance.shutdown()
        instance.server_close()


def _convert(sources: list[Path], out: Path, **options: object) -> dict:
    convert([str(s) for s in sources], ConvertOptions(output=str(out), **{"fetch": FAST_FETCH, **options}))
    return read_manifest(out)


def _conversations(out: Path) -> list[dict]:
    """Each sample's .json, with its image's bytes under ``_image``."""
    found = []
    for sample in read_samples(out):
        metadata = json.loads(sample["json"])
        metadata["_image"] = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        found.append(metadata)
    return found


def _turns(messages: list[dict]) -> list[tuple[str, str]]:
    assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def test_pixmo_cap_qa_every_turn_of_every_row_grouped_by_url(server: ImageServer, tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("image_url", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("messages", pa.list_(pa.string())),
        ]
    )
    rows = []
    for i in range(9):
        seed = 100 + i % 4  # four images, rows of one image spread over the file
        turns = [f"q{i}.{t}" if t % 2 == 0 else f"a{i}.{t}" for t in range(2 * (1 + i % 3))]
        rows.append(
            {
                "image_url": server.url(f"/img/{seed}.jpg"),
                "question": turns[0],
                "answer": turns[1],
                "messages": turns,
            }
        )
    source = factories.write_parquet(tmp_path / "cap_qa.parquet", rows, row_group_size=3, schema=schema)
    before = server.counts()
    manifest = _convert(
        [source], tmp_path / "out", group_by="image_url", unit_bytes=1
    )  # a unit per row group
    assert manifest["schema"] == "conversation" and manifest["rows_merged"] == 5
    assert (manifest["rows_read"], manifest["samples_written"], manifest["rows_skipped"]) == (9, 4, 0)
    fetched = server.counts() - before
    assert {path: fetched[path] for path in fetched} == {f"/img/{100 + k}.jpg": 1 for k in range(4)}
    samples = _conversations(tmp_path / "out")
    for sample in samples:
        seed = int(sample["image_url"].rsplit("/", 1)[1].split(".")[0])
        assert sample["_image"] == image(seed)
        mine = [r for r in rows if r["image_url"] == sample["image_url"]]
        expected = [(m[t], m[t + 1]) for r in mine for m in [r["messages"]] for t in range(0, len(m), 2)]
        assert _turns(sample["messages"]) == expected  # every row's turns, in input order
        assert len(sample.get("grouped_rows", [])) == len(mine) - 1
    assert sum(len(s["messages"]) for s in samples) == sum(len(r["messages"]) for r in rows)


def test_pixmo_ask_model_anything_question_answer_rows_grouped_by_url(
    server: ImageServer, tmp_path: Path
) -> None:
    schema = pa.schema(
        [
            ("image_url", pa.string()),
            ("image_sha256", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
        ]
    )
    rows = [
        {
            "image_url": server.url(f"/img/{200 + i % 3}.jpg"),
            "image_sha256": hashlib.sha256(image(200 + i % 3)).hexdigest(),
            "question": f"question {i}?",
            "answer": f"answer {i}",
        }
        for i in range(8)
    ]
    source = factories.write_parquet(tmp_path / "ama.parquet", rows, schema=schema)
    before = server.counts()
    manifest = _convert([source], tmp_path / "out", schema="conversation", group_by="image_url")
    assert (manifest["samples_written"], manifest["rows_merged"]) == (3, 5)
    assert set((server.counts() - before).values()) == {1}
    samples = _conversations(tmp_path / "out")
    got = Counter(turn for s in samples for turn in _turns(s["messages"]))
    assert got == Counter((r["question"], r["answer"]) for r in rows)
    assert all("question" not in s and "answer" not in s for s in samples)  # they are the messages now


def test_pixmo_docs_struct_of_question_and_answer_lists(tmp_path: Path) -> None:
    questions = pa.struct([("question", pa.list_(pa.string())), ("answer", pa.list_(pa.string()))])
    schema = pa.schema([("image", HF_IMAGE), ("image_id", pa.string()), ("questions", questions)])
    rows = [
        {
            "image": {"bytes": factories.jpeg(seed=i), "path": f"{i}.jpg"},
            "image_id": f"doc-{i}",
            "questions": {
                "question": [f"q{i}.{k}" for k in range(1 + i)],
                "answer": [f"a{i}.{k}" for k in range(1 + i)],
            },
        }
        for i in range(4)
    ]
    rows[3]["questions"] = {"question": ["one", "two"], "answer": ["only one"]}  # unequal lists: skipped
    source = factories.write_parquet(tmp_path / "docs.parquet", rows, schema=schema)
    code = main(
        [
            "parquet-to-tar",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--column",
            "messages=questions",
            "--column",
            "image_bytes=image",
            "--quiet",
        ]
    )
    assert code == 0
    samples = _conversations(tmp_path / "out")
    assert [s["image_id"] for s in samples] == ["doc-0", "doc-1", "doc-2"]
    for i, sample in enumerate(samples):
        assert _turns(sample["messages"]) == list(
            zip(rows[i]["questions"]["question"], rows[i]["questions"]["answer"], strict=True)
        )
        assert sample["_image"] == factories.jpeg(seed=i) and "questions" not in sample
    assert [(r["row"], r["reason"]) for r in read_skipped(tmp_path / "out")] == [(3, "bad_conversation")]


def test_pixmo_points_template_writes_molmo_points_in_percent(server: ImageServer, tmp_path: Path) -> None:
    point = pa.struct([("x", pa.float64()), ("y", pa.float64())])
    schema = pa.schema(
        [
            ("image_url", pa.string()),
            ("image_sha256", pa.string()),
            ("points", pa.list_(point)),
            ("count", pa.int64()),
            ("label", pa.string()),
            ("collection_method", pa.string()),
        ]
    )
    rows = [
        {"points": [{"x": 24.0, "y": 8.0}], "label": "Cat"},
        {"points": [{"x": 12.0, "y": 16.0}, {"x": 4.8, "y": 30.0}], "label": "dog"},
        {"points": [], "label": "zebra"},
    ]
    rows = [
        {
            "image_url": server.url("/img/300.jpg"),
            "image_sha256": None,
            "count": len(r["points"]),
            "collection_method": "pointing",
            **r,
        }
        for r in rows
    ]
    source = factories.write_parquet(tmp_path / "points.parquet", rows, schema=schema)
    manifest = _convert([source], tmp_path / "out", template="pixmo-points", group_by="image_url")
    assert (manifest["samples_written"], manifest["rows_merged"]) == (1, 2)
    (sample,) = _conversations(tmp_path / "out")
    assert _turns(sample["messages"]) == [
        ("Point to cat", '<point x="50.0" y="25.0" alt="cat">cat</point>'),
        ("Point to dog", '<points x1="10.0" y1="93.8" x2="25.0" y2="50.0" alt="dog">dog</points>'),
        ("Point to zebra", "There are none."),
    ]
    assert sample["label"] == "Cat" and sample["points"] == [{"x": 24.0, "y": 8.0}]  # the annotation stays
    assert [r["label"] for r in sample["grouped_rows"]] == ["dog", "zebra"]
    assert (
        points_text([(WIDTH, HEIGHT)], WIDTH, HEIGHT, "corner")
        == '<point x="100.0" y="100.0" alt="corner">corner</point>'
    )


def test_pixmo_count_template_writes_the_count(server: ImageServer, tmp_path: Path) -> None:
    points = pa.struct([("x", pa.list_(pa.float32())), ("y", pa.list_(pa.float32()))])
    schema = pa.schema(
        [
            ("image_url", pa.string()),
            ("image_sha256", pa.string()),
            ("count", pa.int32()),
            ("points", points),
            ("label", pa.string()),
        ]
    )
    rows = [
        {
            "image_url": server.url(f"/img/{400 + i // 2}.jpg"),
            "image_sha256": None,
            "count": 2 + i,
            "points": {"x": [1.0] * (2 + i), "y": [2.0] * (2 + i)},
            "label": f"thing {i}",
        }
        for i in range(4)
    ]
    rows[3]["points"] = None  # the eval sets have no points: counting does not need them
    source = factories.write_parquet(tmp_path / "count.parquet", rows, schema=schema)
    manifest = _convert([source], tmp_path / "out", template="pixmo-count", group_by="image_url")
    assert (manifest["samples_written"], manifest["rows_merged"]) == (2, 2)
    turns = [turn for s in _conversations(tmp_path / "out") for turn in _turns(s["messages"])]
    assert turns == [(f"How many thing {i} are there?", str(2 + i)) for i in range(4)]


def test_chat_and_llava_message_columns_and_rows_grouped_by_image_bytes(tmp_path: Path) -> None:
    chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    rows = [
        {
            "image_bytes": factories.jpeg(seed=i % 2),
            "messages": [
                {"role": "user", "content": f"<image>\nq{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ],
        }
        for i in range(5)
    ]
    source = factories.write_parquet(
        tmp_path / "chat.parquet", rows, schema=pa.schema([("image_bytes", pa.binary()), ("messages", chat)])
    )
    manifest = _convert([source], tmp_path / "out", group_by="image_bytes")
    assert (manifest["samples_written"], manifest["rows_merged"]) == (2, 3)
    samples = _conversations(tmp_path / "out")
    assert [_turns(s["messages"]) for s in samples] == [
        [("q0", "a0"), ("q2", "a2"), ("q4", "a4")],  # the <image> marker is gone
        [("q1", "a1"), ("q3", "a3")],
    ]
    assert [s["_image"] for s in samples] == [factories.jpeg(seed=0), factories.jpeg(seed=1)]

    llava = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    turns = [{"from": "human", "value": "Describe <image> it"}, {"from": "gpt", "value": "grey"}]
    rows = [{"image_bytes": factories.jpeg(seed=3), "conversations": turns}]
    schema = pa.schema([("image_bytes", pa.binary()), ("conversations", llava)])
    source = factories.write_parquet(tmp_path / "llava.parquet", rows, schema=schema)
    _convert([source], tmp_path / "llava", columns={"messages": "conversations"})
    (sample,) = _conversations(tmp_path / "llava")
    assert _turns(sample["messages"]) == [("Describe it", "grey")]


def test_llava_json_and_jsonl_with_an_image_folder(tmp_path: Path) -> None:
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    for i in range(4):
        (images / f"{i:012d}.jpg").write_bytes(factories.jpeg(seed=20 + i))
    objects = [
        {
            "id": f"{i:012d}",
            "image": f"coco/{i:012d}.jpg",
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                {"from": "gpt", "value": f"Picture {i}."},
                {"from": "human", "value": "And its colour?"},
                {"from": "gpt", "value": f"colour {i}"},
            ],
        }
        for i in range(4)
    ]
    objects.append({"id": "text-only", "conversations": objects[0]["conversations"]})  # no image
    objects.append({"id": "lost", "image": "coco/missing.jpg", "conversations": objects[0]["conversations"]})
    objects.append({"id": "escape", "image": "../outside.jpg", "conversations": objects[0]["conversations"]})
    (tmp_path / "llava.json").write_text(json.dumps(objects[:5]))
    (tmp_path / "more.jsonl").write_text("\n".join(json.dumps(o) for o in objects[5:]) + "\n")
    out = tmp_path / "out"
    code = main(
        [
            "json-to-tar",
            str(tmp_path / "llava.json"),
            str(tmp_path / "more.jsonl"),
            "--image-root",
            str(tmp_path / "images"),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["schema"] == "conversation" and manifest["samples_written"] == 4
    assert manifest["checksums"] == "crc32" and manifest["skipped_by_reason"] == {
        "bad_path": 1,
        "missing": 1,
        "missing_file": 1,
    }
    samples = _conversations(out)
    for i, sample in enumerate(samples):
        assert sample["sample_id"] == f"{i:012d}" and sample["image_path"] == f"coco/{i:012d}.jpg"
        assert sample["_image"] == factories.jpeg(seed=20 + i)
        assert _turns(sample["messages"]) == [
            (f"What is in picture {i}?", f"Picture {i}."),
            ("And its colour?", f"colour {i}"),
        ]
    # shardify index tells conversation shards from their json.
    index([str(out)], IndexOptions(output=str(tmp_path / "indexed")))
    assert read_manifest(tmp_path / "indexed")["schema"] == "conversation"
    # Run again: the conversion is found complete.
    assert (
        main(
            [
                "json-to-tar",
                str(tmp_path / "llava.json"),
                str(tmp_path / "more.jsonl"),
                "--image-root",
                str(tmp_path / "images"),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    ("columns", "extra", "message"),
    [
        ({"messages": pa.int64()}, [], "a messages column must be list<string>"),
        (
            {"label": pa.string()},
            ["--template", "pixmo-points"],
            r"reads the column\(s\) label, points; missing: points",
        ),
        ({"question": pa.list_(pa.string()), "answer": pa.string()}, [], "must both be text or both lists"),
        (
            {"question": pa.string(), "answer": pa.string()},
            ["--column", "messages=nope"],
            "no column named 'nope'",
        ),
        (
            {"question": pa.string(), "answer": pa.string()},
            ["--group-by", "image_url"],
            r"image_url \(--group-by\)",
        ),
        (
            {"caption": pa.string()},
            ["--template", "pixmo-count", "--schema", "caption"],
            "make conversations",
        ),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], columns: dict, extra: list[str], message: str
) -> None:
    schema = pa.schema([("image_bytes", pa.binary()), *columns.items()])
    source = factories.write_parquet(tmp_path / "in.parquet", [], schema=schema)
    code = main(["parquet-to-tar", str(source), "--output", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("shardify: error: "), err
    assert re.search(message, err), err


def test_a_conversion_that_writes_no_sample_exits_1_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = pa.schema([("image_bytes", pa.binary()), ("messages", pa.list_(pa.string()))])
    rows = [
        {"image_bytes": b"not an image", "messages": ["q", "a"]},
        {"image_bytes": factories.jpeg(), "messages": ["q"]},
    ]
    source = factories.write_parquet(tmp_path / "in.parquet", rows, schema=schema)
    out = tmp_path / "out"
    for _ in range(2):  # and again: still no manifest, still exit 1
        code = main(["parquet-to-tar", str(source), "--output", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1, err
        assert (
            "no sample written: every one of the 2 rows was skipped (bad_conversation 1, unidentified 1)"
            in err
        )
        assert not (out / "manifest.json").exists() and len(read_skipped(out)) == 2
    empty = factories.write_parquet(tmp_path / "empty.parquet", [], schema=schema)
    assert main(["parquet-to-tar", str(empty), "--output", str(tmp_path / "none"), "--quiet"]) == 1
    assert "the inputs hold no rows" in capsys.readouterr().err


class _Interrupt(Exception):
    pass


def _interrupted_then_resumed(sources: list[Path], out: Path, after_rows: int, **options: object) -> None:
    written = 0

    def interrupt(count: int) -> None:
        nonlocal written
        written += count
        if written >= after_rows:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        convert(
            [str(s) for s in sources],
            ConvertOptions(output=str(out), **{"fetch": FAST_FETCH, **options}),
            on_rows=interrupt,
        )
    assert local_committed_rows(out) > 0 and not (out / "manifest.json").exists()


def test_grouped_conversion_resumes_to_the_same_shards_fetching_only_what_is_left(
    server: ImageServer, tmp_path: Path
) -> None:
    schema = pa.schema([("image_url", pa.string()), ("question", pa.string()), ("answer", pa.string())])
    # Images 0-7 three rows each, then the rows of every image again, 9 and 8 appearing late.
    images = [i // 3 for i in range(24)] + [(i * 3) % 10 for i in range(16)]
    rows = [
        {"image_url": server.url(f"/img/{500 + k}.jpg"), "question": f"q{i}", "answer": f"a{i}"}
        for i, k in enumerate(images)
    ]
    source = factories.write_parquet(tmp_path / "qa.parquet", rows, row_group_size=8, schema=schema)
    shaping = {"group_by": "image_url", "unit_bytes": 1, "max_samples_per_shard": 2, "batch_rows": 2}
    _convert([source], tmp_path / "reference", **shaping)
    out = tmp_path / "out"
    _interrupted_then_resumed([source], out, 20, **shaping)
    committed = local_committed_rows(out)
    before = server.counts()
    _convert([source], out, **shaping)
    first_rows = {r["image_url"]: i for i, r in reversed(list(enumerate(rows)))}
    left = {
        url for url, first in first_rows.items() if first >= committed
    }  # groups led after the resume point
    assert 0 < len(left) < 10
    assert server.counts() - before == Counter({"/" + url.split("/", 3)[3]: 1 for url in left})
    assert output_files(out) == output_files(tmp_path / "reference")
    assert read_manifest(out)["samples_written"] == 10


def test_json_to_tar_resumes_to_the_same_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    objects = []
    for i in range(30):
        (images / f"{i}.png").write_bytes(factories.encode(factories.photo(20, 20, seed=i), "PNG"))
        turns = [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}]
        objects.append({"id": str(i), "image": f"{i}.png", "conversations": turns})
    source = tmp_path / "data.jsonl"
    source.write_text("".join(json.dumps(o) + "\n" for o in objects))
    shaping = {"input_format": "json", "image_root": str(images), "max_samples_per_shard": 4, "batch_rows": 2}
    _convert([source], tmp_path / "reference", **shaping)
    _interrupted_then_resumed([source], tmp_path / "out", 12, **shaping)
    _convert([source], tmp_path / "out", **shaping)
    assert output_files(tmp_path / "out") == output_files(tmp_path / "reference")
    assert read_manifest(tmp_path / "out")["samples_written"] == 30
