"""What a run prints: streamtrain's own messages on the console, third-party notices in a log file.

Transformers, DeepSpeed, bitsandbytes, peft and torch announce things a user cannot act on
(deprecations inside peft, "setting accelerator to CPU", optional packages not installed).
They are kept — in ``output_dir/run.log`` — but not printed; errors are printed whoever logs
them, and every warning of streamtrain's own is printed. Records emitted before the output
directory is known are held in memory and written there once it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import os
import sys
import warnings
from collections.abc import Iterator
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
    held = _held()
    if held is None:
        return
    adopt_library_loggers()
    # delay: the file is created by the first record only, so a run that logs nothing adds nothing.
    target = _RunLog(Path(output_dir) / RUN_LOG, encoding="utf-8", delay=True)
    target.setFormatter(logging.Formatter(f"%(asctime)s rank {rank} {_FORMAT}"))
    if held.target is not None:
        held.target.close()
    held.setTarget(target)
    held.flushLevel = logging.INFO
    held.flush()


def adopt_library_loggers() -> None:
    """Route loggers that libraries gave handlers of their own on import (call after importing them).

    DeepSpeed gives its logger a stdout handler when it is imported (transformers and
    sentence-transformers import it): that handler is dropped so its records reach run.log."""
    held = _held()
    if held is None:
        return
    if "deepspeed" in sys.modules:
        logger = logging.getLogger("DeepSpeed")
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    # torch's own handler on "torch" prints "No CUDA runtime is found" whenever DeepSpeed loads its
    # CPU op; only that child is taken over, torch's other logging (TORCH_LOGS) stays as it is.
    extensions = logging.getLogger("torch.utils.cpp_extension")
    if held not in extensions.handlers:
        extensions.propagate = False
        extensions.addHandler(held)


def _held() -> _Held | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, _Held)), None)


@contextlib.contextmanager
def stdout_to_log(name: str) -> Iterator[None]:
    """Lines a library prints (rather than logs) inside the block become INFO records of ``name``."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        logger = logging.getLogger(name)
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.info("%s", line)
