"""A row of `rshard bench suite`'s table, and the error a row fails with (its message is what the row shows)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    workload: str
    layout: str
    rshard: str
    anchor: str = "-"
    ratio: float | None = None
    target: str = "-"
    met: bool | None = None
    diff: str = "-"
    failed: str = ""  # why, when the row failed

    def cells(self) -> list:
        if self.failed:
            return [self.workload, self.layout, "FAILED: " + _one_line(self.failed), self.anchor, "-", self.target,
                    "failed", "-"]
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}x"
        met = "-" if self.met is None else ("yes" if self.met else "no")
        return [self.workload, self.layout, self.rshard, self.anchor, ratio, self.target, met, self.diff]


def _one_line(text: str, limit: int = 400) -> str:
    flat = " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat[-limit:].replace("|", "\\|")


class RowFailed(RuntimeError):
    """A row's job or anchor failed: the message is what the row shows."""
