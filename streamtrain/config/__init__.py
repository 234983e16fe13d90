"""Typed run configuration: the sections (``sections``), mixture weights (``weights``) and how a
recipe plus overrides becomes a validated ``RunConfig`` (``load``). Imports nothing of the data
layer or the trainer: they import it."""

from streamtrain.config.load import build_config, load_config, merge, parse_overrides
from streamtrain.config.sections import (
    DEFAULT_LEASE_S,
    AudioConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LogConfig,
    RunConfig,
    SourceSpec,
    TrainConfig,
    source_name,
)

__all__ = [
    "DEFAULT_LEASE_S",
    "AudioConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "RunConfig",
    "SourceSpec",
    "TrainConfig",
    "build_config",
    "load_config",
    "merge",
    "parse_overrides",
    "source_name",
]
