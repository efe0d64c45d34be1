"""Early stopping on a validation figure: stop after `patience` evaluations without improvement (0 = never)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    patience: int = 0
    higher_is_better: bool = True
    best: float | None = None
    since_best: int = 0

    def update(self, value: float) -> bool:
        """Record one evaluation; True when it is the best so far."""
        better = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        if better:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return better

    @property
    def stop(self) -> bool:
        return bool(self.patience) and self.since_best >= self.patience

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None, patience: int, higher_is_better: bool) -> "EarlyStopping":
        d = d or {}
        return cls(patience, higher_is_better, d.get("best"), int(d.get("since_best", 0)))
