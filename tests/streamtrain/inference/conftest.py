"""Fixtures for using trained runs: the digits samples as shards and the tiny Qwen2 decoder."""

from tests.streamtrain.train.conftest import digits_shards  # noqa: F401  (fixtures)
from tests.streamtrain.vlm.conftest import qa_shards, tiny_decoder  # noqa: F401
