"""streamtrain: streaming trainer for vision/audio-language models on WebDataset shards.

``streamtrain.load_encoder(DIR)`` and ``streamtrain.load_vlm(DIR)`` load what ``streamtrain
export`` wrote (imported on first use: ``import streamtrain`` stays light for the command line).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_encoder", "load_vlm"]


def __getattr__(name: str) -> Any:
    if name == "load_encoder":
        from streamtrain.inference.encoder import load_encoder

        return load_encoder
    if name == "load_vlm":
        from streamtrain.inference.vlm import load_vlm

        return load_vlm
    raise AttributeError(f"module 'streamtrain' has no attribute {name!r}")
