"""What a run prints: streamtrain's own messages on the console, third-party notices in a log file.

Transformers, DeepSpeed, bitsandbytes, peft and torch announce things a user cannot act on
(deprecations inside peft, "setting accelerator to CPU", optional packages not installed).
They are kept — in ``output_dir/run.log`` — but not printed; errors are printed whoever logs
them, and every warning of streamtrain's own is printed. Records emitted before the output
directory is known are held in memory and written there once it is.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import warnings
from pathlib import Path

RUN_LOG = "run.log"
_OWN = ("streamtrain", "shardify", "__main__")
_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _OwnOrSevere(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".", 1)[0] in _OWN
        return record.levelno >= logging.ERROR or (own and record.levelno >= logging.WARNING)


class _Held(logging.handlers.MemoryHandler):
    """Holds records until ``log_to`` names the file; flushes only then."""

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return self.target is not None and super().shouldFlush(record)


class _RunLog(logging.FileHandler):
    def _open(self):
        # Another rank may not have created output_dir yet when this one logs first.
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def quiet_third_party() -> None:
    """Route logging and warnings as described above; call once, first thing in an entry point."""
    # Environment the libraries read at import: set before any of them is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local paths or packages
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked loader workers tokenize
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    root = logging.getLogger()
    if any(isinstance(handler, _Held) for handler in root.handlers):
        return  # already set up (an entry point called twice in one process)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(_FORMAT))
    console.addFilter(_OwnOrSevere())
    root.addHandler(console)
    root.addHandler(_Held(capacity=10_000, flushLevel=logging.CRITICAL + 1))
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of logger "py.warnings"
    warnings.filterwarnings("default", category=DeprecationWarning)  # once per place, not hidden

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()  # transformers' own stderr handler: use ours instead
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with training's
    if not torch.cuda.is_available():  # else DeepSpeed says on import that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def log_to(output_dir: str | os.PathLike[str], rank: int = 0) -> None:
    """Write held and later third-party records to ``output_dir/run.log`` (every rank appends)."""
    held = next((h for h in logging.getLogger().handlers if isinstance(h, _Held)), None)
    if held is None:
        return
    _route_deepspeed_logger()
    # delay: the file is created by the first record only, so a run that logs nothing adds nothing.
    target = _RunLog(Path(output_dir) / RUN_LOG, encoding="utf-8", delay=True)
    target.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} {_FORMAT}"))
    if held.target is not None:
        held.target.close()
    held.setTarget(target)
    held.flushLevel = logging.INFO
    held.flush()


def _route_deepspeed_logger() -> None:
    """DeepSpeed gives its logger a stdout handler of its own when it is imported (transformers and
    sentence-transformers import it): drop that handler so its records reach run.log instead."""
    if "deepspeed" not in sys.modules:
        return
    logger = logging.getLogger("DeepSpeed")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
