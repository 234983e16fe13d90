"""The loader's one-step-ahead thread: results in order, the producer's error re-raised where
they are taken, and a close that returns while the thread waits to hand a result over."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from streamtrain.data.ahead import Ahead


def counter():
    made = iter(range(1000))
    calls = []

    def produce() -> int:
        calls.append(threading.current_thread().name)
        return next(made)

    return produce, calls


def test_results_come_in_order_from_one_thread() -> None:
    produce, calls = counter()
    ahead = Ahead(produce, torch.device("cpu"))
    assert [ahead.take() for _ in range(20)] == list(range(20))
    ahead.close()
    assert set(calls) == {"streamtrain-ahead"}
    assert len(calls) <= 20 + 2  # one in the queue and one in hand, no more


def test_the_producers_error_is_raised_by_take() -> None:
    results = iter([1, 2])

    def produce() -> int:
        try:
            return next(results)
        except StopIteration:
            raise ValueError("shard gone") from None

    ahead = Ahead(produce, torch.device("cpu"))
    assert ahead.take() == 1 and ahead.take() == 2
    with pytest.raises(ValueError, match="shard gone"):
        ahead.take()
    ahead.close()


def test_close_returns_while_the_thread_waits_to_hand_over() -> None:
    produce, calls = counter()
    ahead = Ahead(produce, torch.device("cpu"))
    time.sleep(0.3)  # the queue is full, the thread blocked on its next result
    began = time.monotonic()
    ahead.close()
    assert time.monotonic() - began < 2 and not ahead.thread.is_alive()
    produced = len(calls)
    time.sleep(0.3)
    assert len(calls) == produced  # nothing runs after close
