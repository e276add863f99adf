"""Typed outcomes of teacher calls: failures are values, never exceptions or training data.

Every FBK/IMP call ends as exactly one :class:`CallOutcome`. The editing rules only
continue on ``ok``; anything else ends the trajectory as a recorded failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Generic, Literal, TypeVar

Status = Literal["ok", "parse_error", "api_error", "timeout", "refused", "over_budget"]
STATUSES: tuple[Status, ...] = ("ok", "parse_error", "api_error", "timeout", "refused", "over_budget")

T = TypeVar("T")


@dataclass
class CallOutcome(Generic[T]):
    """The result of one FBK or IMP call.

    ``value`` is the parsed Feedback (FBK) or updated attempt text (IMP) when ``status``
    is ``ok``, else None. ``raw`` is the teacher's raw reply text (when there was one).
    """

    status: Status
    value: T | None = None
    detail: str = ""
    raw: str | None = None
    role: Literal["fbk", "imp"] = "fbk"
    provider: str = "scripted"
    model: str = "scripted"
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    cached: bool = False
    latency_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record(self) -> dict:
        """A JSON-able record of the call (the value rendered as text)."""
        d = asdict(self)
        value = self.value
        d["value"] = getattr(value, "text", value) if value is not None else None
        return d
