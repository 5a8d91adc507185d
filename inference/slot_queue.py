"""The API server's slot queue: requests wait in arrival order for one of `max_concurrency` generation slots (views
of one model: shared weights, one KV cache each); a full queue is 429 with a Retry-After from recent answer times.
An admitted request's answer runs in one worker thread and streams its pieces into the event loop.
"""
import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from .api_requests import SERVER_LOGGER, APIError
from .generation import GenerationSettings, generate_answer
from .loading import LoadedModel

log = logging.getLogger(SERVER_LOGGER)

# Retry-After, in whole seconds (HTTP's delay-seconds): at least 1; at most 60, the longest wait the `openai`
# client honours in 1.30, the oldest tests/requirements.txt allows (3.60 honours up to 120 s; longer: no retry).
RETRY_AFTER_S = (1, 60)
ANSWER_TIME_WEIGHT = 0.2  # weight of the newest answer in the running mean of answer times behind Retry-After


class SlotPool:
    """FIFO admission to generation slots. Used from the event loop thread only, so it needs no lock."""

    def __init__(self, slots: list, max_queue: int):
        self.free = deque(slots)
        self.size = len(slots)
        self.max_queue = max_queue
        self.waiting = deque()  # futures, oldest first
        self.answer_s = None  # running mean of the seconds an answer holds its slot; None before the first

    @property
    def running(self) -> int:
        return self.size - len(self.free)

    def reserve(self) -> asyncio.Future:
        """A future that gets a slot, in arrival order; 429 if the queue is full."""
        future = asyncio.get_running_loop().create_future()
        if self.free and not self.waiting:
            future.set_result(self.free.popleft())
        elif len(self.waiting) >= self.max_queue:
            raise queue_full(self)
        else:
            self.waiting.append(future)
        return future

    def give_up(self, future: asyncio.Future):
        """The request no longer wants its place (it left, or failed before generating)."""
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
            if future in self.waiting:
                self.waiting.remove(future)

    def release(self, slot, busy_s: float = None):
        """Hand `slot` to the oldest waiter, or free it; `busy_s`: how long a finished answer held it."""
        if busy_s is not None:
            self.answer_s = busy_s if self.answer_s is None else \
                (1 - ANSWER_TIME_WEIGHT) * self.answer_s + ANSWER_TIME_WEIGHT * busy_s
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(slot)
                return
        self.free.append(slot)

    def is_full(self) -> bool:
        return not self.free and len(self.waiting) >= self.max_queue

    def retry_after_s(self) -> int:
        """Whole seconds a refused request should wait: about the wait it would have had at the back of the queue
        (the waiting requests and it, answered `size` at a time). Retried then, it loses no time to the queue and
        finds it drained, where a shorter wait would spend the client's few retries on more 429s."""
        lowest, highest = RETRY_AFTER_S
        if self.answer_s is None:
            return lowest
        return min(highest, max(lowest, math.ceil(self.answer_s * (len(self.waiting) + 1) / self.size)))


def queue_full(pool: SlotPool) -> APIError:
    retry_after = pool.retry_after_s()
    return APIError(429, f"the server is busy ({pool.running} answering, {len(pool.waiting)} waiting): retry in "
                         f"{retry_after} s, or start it with a larger --max_queue", None, "queue_full",
                    "rate_limit_error", {"Retry-After": str(retry_after)})


@dataclass
class Finished:
    """Event after the last piece: the generation's stats, or the error that ended it."""
    stats: object = None
    error: BaseException = None


class GenerationRun:
    """One answer generated on a slot in one worker thread, which hands each text piece to the event loop as it is
    decoded (`events`: the pieces, then a Finished).

    The slot goes back to the pool when the thread ends, never before, so slots never overlap.
    """

    def __init__(self, slot: LoadedModel, input_ids, pixel_values, settings: GenerationSettings, release):
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.stop_event = threading.Event()
        self.slot, self.release, self.settings = slot, release, settings
        self.args = (input_ids, pixel_values, settings)
        self.abandoned = False  # the client left before the end
        self.started = time.monotonic()
        threading.Thread(target=self._run, name="minimind-serve", daemon=True).start()

    def _run(self):
        finished = Finished()
        try:
            _answer, finished.stats = generate_answer(self.slot, *self.args, self.stop_event, self._hand_over)
        except BaseException as error:  # handed to the request's task, which answers with an error
            finished.error = error
        self.loop.call_soon_threadsafe(self._finish, finished)

    def _hand_over(self, piece: str):
        self.loop.call_soon_threadsafe(self.events.put_nowait, piece)

    def _finish(self, finished: Finished):
        if self.abandoned and finished.stats is not None:
            log.info(f"client left: generation stopped after {finished.stats.tokens} of "
                     f"{self.settings.max_new_tokens} tokens")
        answered = finished.stats is not None and not self.abandoned  # a stopped run says little about answer times
        self.release(self.slot, time.monotonic() - self.started if answered else None)
        self.events.put_nowait(finished)

    def stop(self):
        self.stop_event.set()
