"""Adaptive batching on its own, with a model that records the batches it is given."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from pipelines.api.batching import Batcher
from pipelines.api.settings import Batching


class RecordingModel:
    """Each image's answer is its own first pixel, so a mixed-up batch shows; `seconds` per call."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[int] = []
        self.seconds = seconds
        self.lock = threading.Lock()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(len(pixels))
        time.sleep(self.seconds)
        return pixels[:, 0, 0, :1].copy()


def images(first: float, n: int = 1) -> np.ndarray:
    batch = np.zeros((n, 32, 32, 3), np.float32)
    batch[:, 0, 0, 0] = first + np.arange(n)
    return batch


async def with_batcher(model: RecordingModel, policy: Batching, work) -> object:
    batcher = Batcher(model, policy)
    batcher.start()
    try:
        return await work(batcher)
    finally:
        await batcher.stop()


def test_a_lone_request_does_not_wait_for_a_batch_to_fill():
    model = RecordingModel()

    async def one(batcher: Batcher) -> float:
        started = time.perf_counter()
        answer = await batcher.submit(images(7))
        assert answer.tolist() == [[7.0]]
        return time.perf_counter() - started

    waited = asyncio.run(with_batcher(model, Batching(max_batch=64, max_wait_ms=5_000), one))
    assert waited < 0.5 and model.batches == [1]


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer():
    model = RecordingModel(seconds=0.05)  # requests pile up while the model runs

    async def many(batcher: Batcher) -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(images(10 * i, n=1 + i % 3)) for i in range(40)))

    answers = asyncio.run(with_batcher(model, Batching(max_batch=16, max_wait_ms=0), many))
    for i, answer in enumerate(answers):
        assert answer[:, 0].tolist() == [10 * i + k for k in range(1 + i % 3)]
    assert sum(model.batches) == sum(1 + i % 3 for i in range(40))
    assert max(model.batches) <= 16 and len(model.batches) < 10


def test_a_batch_waits_for_requests_being_decoded_then_takes_them():
    model = RecordingModel()

    async def decode_then_submit(batcher: Batcher, first: float, decode_s: float) -> np.ndarray:
        async with batcher.decoding():
            await asyncio.sleep(decode_s)
        return await batcher.submit(images(first))

    async def two(batcher: Batcher) -> list[np.ndarray]:
        return await asyncio.gather(decode_then_submit(batcher, 1, 0.0), decode_then_submit(batcher, 2, 0.1))

    answers = asyncio.run(with_batcher(model, Batching(max_batch=8, max_wait_ms=2_000), two))
    assert [a.tolist() for a in answers] == [[[1.0]], [[2.0]]] and model.batches == [2]


def test_a_model_error_reaches_every_request_of_its_batch_and_the_next_batch_runs():
    def failing_once(pixels: np.ndarray, calls=[]) -> np.ndarray:  # noqa: B006 - counts calls across the test
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return pixels[:, 0, 0, :1]

    async def run(batcher: Batcher) -> tuple[list, np.ndarray]:
        first = await asyncio.gather(batcher.submit(images(1)), return_exceptions=True)
        return first, await batcher.submit(images(2))

    first, second = asyncio.run(with_batcher(failing_once, Batching(), run))
    assert isinstance(first[0], RuntimeError) and second.tolist() == [[2.0]]


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_request_larger_than_max_batch_runs_alone(max_batch):
    model = RecordingModel()

    async def run(batcher: Batcher) -> np.ndarray:
        return await batcher.submit(images(0, n=10))

    answer = asyncio.run(with_batcher(model, Batching(max_batch=max_batch), run))
    assert answer[:, 0].tolist() == list(range(10)) and model.batches == [10]
