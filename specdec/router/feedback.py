"""Feedback on routed answers: which response an id names, and whose it is.

Every routed response gets an id the server draws (`secrets`, 128 bits: unguessable) and remembers
with the caller it answered (the API key, or the peer host without keys), its route and the tier
that answered. `Feedback` names a response by that id - never by the client-chosen `request_id`,
which any caller can repeat - and only the same caller can label it; an unknown id, another
caller's, or one too old to be remembered (the most recent `size` are) are the same NOT_FOUND, so
an id's existence leaks nothing. Each response takes one label.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from specdec.errors import InvalidRequestError, NotFoundError

LEDGER_SIZE = 100_000  # responses remembered for feedback (about 100 bytes each)


@dataclass(frozen=True)
class Answered:
    client: str
    route: str
    tier: str


class ResponseLedger:
    def __init__(self, size: int = LEDGER_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, Answered] = OrderedDict()

    def issue(self, client: str, route: str, tier: str) -> str:
        response_id = "resp_" + secrets.token_urlsafe(16)
        with self._lock:
            self._answers[response_id] = Answered(client, route, tier)
            while len(self._answers) > self.size:
                self._answers.popitem(last=False)
        return response_id

    def take(self, response_id: str, client: str) -> Answered:
        """The response `client` may label (once): NotFoundError otherwise."""
        with self._lock:
            answered = self._answers.get(response_id)
            if answered is None or answered.client != client:
                raise NotFoundError(
                    "response_id: no routed response with this id for this caller (unknown, another "
                    "caller's, already labelled, or too old)"
                )
            del self._answers[response_id]
        return answered

    def __len__(self) -> int:
        return len(self._answers)


def quality(score: float | None, correct: bool | None) -> float:
    """The label as a quality in [0, 1]: a score, or correct = 1 / incorrect = 0 (exactly one)."""
    if (score is None) == (correct is None):
        raise InvalidRequestError("score", "give exactly one of score (in [0, 1]) or correct")
    if correct is not None:
        return 1.0 if correct else 0.0
    if not math.isfinite(score) or not 0 <= score <= 1:
        raise InvalidRequestError("score", f"a quality in [0, 1], got {score}")
    return float(score)
