"""One step ahead: the next step's batches made in a background thread while the trainer runs.

With images decoded on the training device, preparing a step costs the training process real
work (the nvJPEG call, a few kernel launches per image). Done inside ``next(loader)`` it would be
data wait; done here it overlaps with the model's step: the thread issues its work on a CUDA
stream of its own, and the batch handed out is made safe for the caller's stream (an event to
wait on; its tensors recorded on that stream, so their memory is not reused too early).
PyTorch's own pin-memory thread works the same way beside a DataLoader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")

_POLL_S = 0.1


class Ahead(Generic[T]):
    """Calls ``produce`` again and again in a thread, keeping at most ``depth`` results ready.

    ``take()`` returns them in order (re-raising what ``produce`` raised); ``close()`` stops the
    thread after the call in progress. ``produce`` must be safe to call from that one thread.
    """

    def __init__(self, produce: Callable[[], T], device: torch.device, depth: int = 1) -> None:
        self.produce = produce
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ready: queue.Queue[tuple[T | None, BaseException | None, Any]] = queue.Queue(depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="streamtrain-ahead", daemon=True)
        self.thread.start()

    def take(self) -> T:
        while True:
            try:
                item, error, event = self.ready.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the loader's prefetch thread ended") from None
        if error is not None:
            raise error
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in _cuda_tensors(item):
                tensor.record_stream(current)
        return item  # type: ignore[return-value]

    def close(self, timeout_s: float = 120.0) -> None:
        """Stop producing; returns when the thread has finished its call in progress."""
        self.stopping.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.ready.get_nowait()  # unblock a waiting put
            self.thread.join(_POLL_S)
            timeout_s -= _POLL_S
            if timeout_s <= 0:
                break

    def _run(self) -> None:
        while not self.stopping.is_set():
            event = None
            try:
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        item: T | None = self.produce()
                    event = torch.cuda.Event()
                    event.record(self.stream)
                else:
                    item = self.produce()
                error = None
            except BaseException as exc:  # handed to the caller, who decides
                item, error = None, exc
            if not self._put((item, error, event)) or error is not None:
                return

    def _put(self, entry: tuple[T | None, BaseException | None, Any]) -> bool:
        while not self.stopping.is_set():
            try:
                self.ready.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False


def _cuda_tensors(item: Any) -> Iterable[torch.Tensor]:
    """The CUDA tensors in ``item`` (nested in dicts, lists, tuples and dataclasses)."""
    stack = [item]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_cuda:
                yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend(vars(value).values())
