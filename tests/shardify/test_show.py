"""`shardify show` and `shardify stats` on shards holding every kind of sample: captions, Q/A,
conversations, an audio clip, an image Chromium cannot show natively (TIFF) and one that does not
decode. The HTML sheet is opened in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from shardify import cli
from shardify.show import PNG_CELL, PNG_COLUMNS, PNG_HEADER, png_size
from shardify.tarwriter import TarShard
from tests import factories

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A smooth gradient, <b>not bold</b> & calm."},
]


def _json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("look")
    shard = TarShard(str(folder / "mixed-000000.tar"))
    photo = factories.photo(320, 240, seed=1)
    shard.add_sample("cap0", [("jpg", factories.jpeg(320, 240)), ("txt", b"a photo-like gradient")])
    shard.add_sample(
        "cap1", [("png", factories.encode(photo.convert("RGBA"), "PNG")), ("txt", b"with alpha")]
    )
    shard.add_sample(
        "qa0",
        [("jpg", factories.jpeg(64, 96, seed=2)), ("json", _json(question="Which way up?", answer="tall"))],
    )
    shard.add_sample(
        "conv0",
        [("gif", factories.encode(photo.convert("P"), "GIF")), ("json", _json(messages=CONVERSATION))],
    )
    shard.add_sample("tiff0", [("tiff", factories.encode(photo, "TIFF")), ("txt", b"stored as TIFF")])
    shard.add_sample("broken0", [("jpg", factories.jpeg(320, 240)[:300]), ("txt", b"cut off mid-download")])
    shard.add_sample("audio0", [("wav", factories.wav()), ("txt", b"a short tone")])
    shard.finish()
    assert cli.main(["index", str(folder), "--schema", "caption", "--quiet"]) == 0
    return folder


TEXTS = [
    "a photo-like gradient",
    "with alpha",
    "Which way up?",
    "tall",
    "What is in the picture?",
    "A smooth gradient, <b>not bold</b> & calm.",  # shown as text, not markup
    "stored as TIFF",
    "cut off mid-download",
    "a short tone",
]


def _chromium(user_data: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)",
)
def test_the_html_sheet_shows_every_image_and_text_in_a_real_browser(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sheet = tmp_path / "sheet.html"
    assert cli.main(["show", str(shards), "--n", "24", "--output", str(sheet)]) == 0
    assert "7 of 7 samples" in capsys.readouterr().out
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers on the network
    driver = _chromium(tmp_path / "profile")
    try:
        driver.get(sheet.as_uri())
        images = driver.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
        )
        body = driver.execute_script("return document.body.innerText")
        audio = driver.execute_script("return document.querySelectorAll('audio').length")
        injected = driver.execute_script("return [...document.querySelectorAll('b')].map(b => b.textContent)")
    finally:
        driver.quit()
    assert sorted(alt for alt, *_ in images) == ["cap0", "cap1", "conv0", "qa0", "tiff0"]
    for alt, complete, width, height in images:
        assert complete and width > 0 and height > 0, alt
    assert {alt: (w, h) for alt, _, w, h in images}["qa0"] == (64, 96)  # small images are not enlarged
    for text in [*TEXTS, "user", "assistant", "mixed-000000.tar", "broken0", "audio0"]:
        assert text in body, text
    assert "does not decode" in body and audio == 1
    assert "not bold" not in injected  # the conversation's text is shown, never parsed as markup


def test_the_png_sheet_is_an_image_of_the_expected_size(shards: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"
    assert cli.main(["show", str(shards), "-n", "7", "-o", str(sheet)]) == 0
    with Image.open(sheet) as image:
        assert image.format == "PNG"
        assert image.size == png_size(7) == (PNG_COLUMNS * PNG_CELL[0], PNG_HEADER + 2 * PNG_CELL[1])
        first_cell = image.convert("L").crop((0, PNG_HEADER, PNG_CELL[0], PNG_HEADER + PNG_CELL[0]))
        assert first_cell.getextrema()[0] < 200  # the thumbnail is drawn, not a blank cell
    assert cli.main(["show", str(shards), "-n", "2", "-o", str(sheet)]) == 0
    with Image.open(sheet) as image:
        assert image.size == png_size(2) == (2 * PNG_CELL[0], PNG_HEADER + PNG_CELL[1])


def test_stats_counts_the_manifest_and_measures_a_sample(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["stats", str(shards), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["samples"], stats["shards"], stats["schema"]) == (7, 1, "caption")
    assert stats["media"] == {"jpg": 3, "png": 1, "gif": 1, "tiff": 1, "wav": 1}
    sampled = stats["sampled"]
    assert sampled["samples"] == 7 and sampled["failures"] == {"image_truncated": 1}
    assert sampled["image_formats"] == {"jpg": 2, "png": 1, "gif": 1, "tiff": 1}
    assert sampled["image_width"]["256-511"] == 4 and sampled["image_width"]["64-127"] == 1
    assert sum(sampled["text_chars"]["caption"].values()) == 5
    assert set(sampled["text_chars"]) == {"caption", "question", "answer", "conversation"}
    assert cli.main(["stats", str(shards), "--sample", "3"]) == 0
    report = capsys.readouterr().out
    assert "7 samples in 1 shards" in report and "sampled 3 samples" in report and "image width" in report


def test_looking_at_something_that_is_not_shards_is_one_line_and_exit_2(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["show", str(tmp_path), "-o", str(tmp_path / "sheet.html")],
        ["show", str(shards), "-o", str(tmp_path / "sheet.pdf")],
        ["stats", str(tmp_path / "missing")],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("shardify: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
