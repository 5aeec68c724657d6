"""The one results table `python -m bench` prints and writes as JSON.

A Figure is one row: the value (median of repeated runs, with its spread),
the baseline measured in the same run, their ratio, the goal and a verdict.
A figure whose prerequisite is missing carries the reason instead of numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spread:
    """Median and the p10..p90 range (min..max below 10 samples) of repeated runs."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            raise ValueError("no samples")
        v = sorted(values)
        if len(v) >= 10:
            q = statistics.quantiles(v, n=10, method="inclusive")
            low, high = q[0], q[-1]
        else:
            low, high = v[0], v[-1]
        return cls(statistics.median(v), low, high, len(v))


@dataclass
class Figure:
    """One row. ``goal`` reads "ratio <= 1.5", "value <= 20", "value >= 100" and so on.

    ``id`` is the row's stable name in bench/results.json (P1, P2, P2-flood, ...):
    a new figure (P7-restore, a containerd row) is one more Figure with its own id.
    """

    figure: str
    id: str = ""
    unit: str = ""
    value: Spread | None = None
    baseline: Spread | None = None
    baseline_label: str = ""
    goal: str = ""
    na: str = ""  # why there is no number
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or self.baseline.median == 0:
            return None
        return self.value.median / self.baseline.median

    @property
    def verdict(self) -> str:
        if self.na:
            return "n/a"
        if not self.goal or self.value is None:
            return "-"
        subject, op, limit_text = self.goal.split()
        got = self.ratio if subject == "ratio" else self.value.median
        if got is None:
            return "n/a"
        limit = float(limit_text)
        ok = got <= limit if op == "<=" else got >= limit
        return "PASS" if ok else "FAIL"

    def to_json(self) -> dict[str, Any]:
        d = {"id": self.id or self.figure, **asdict(self)}
        d["ratio"] = self.ratio
        d["verdict"] = self.verdict
        return d


def pair_ratios(values: list[float], baselines: list[float]) -> Spread | None:
    """Each interleaved run over its own baseline: drift in the machine's load
    moves both halves of a pair, so this spread shows what noise the
    ratio of medians hides."""
    pairs = [v / b for v, b in zip(values, baselines, strict=False) if b]
    return Spread.of(pairs) if pairs else None


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _cell(s: Spread | None, unit: str) -> str:
    if s is None:
        return "-"
    spread = "" if s.n == 1 else f" [{_num(s.low)}-{_num(s.high)}]"
    return f"{_num(s.median)} {unit}{spread}".strip()


def render(figures: list[Figure]) -> str:
    head = ("id", "figure", "value [spread]", "baseline (same run)", "ratio", "goal", "verdict")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for f in figures:
        if f.na:
            rows.append((f.id, f.figure, "n/a", "-", "-", f.goal or "-", "n/a"))
            notes.append(f"{f.figure}: n/a: {f.na}")
            continue
        base = _cell(f.baseline, f.unit)
        if f.baseline is not None and f.baseline_label:
            base = f"{base} ({f.baseline_label})"
        ratio = f"{f.ratio:.2f}x" if f.ratio is not None else "-"
        rows.append((f.id, f.figure, _cell(f.value, f.unit), base, ratio, f.goal or "-",
                     f.verdict))
        if f.note:
            notes.append(f"{f.figure}: {f.note}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*head), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    if notes:
        out += ["", "Notes (medians; [p10-p90], or [min-max] under 10 runs):", *notes]
    return "\n".join(out)


def write_json(figures: list[Figure], path: Path, *, meta: dict[str, Any],
               update: bool = False) -> None:
    """Write the table; with ``update``, rows of other ids already in the file stay
    (each keeps the ``meta`` of the run that measured it)."""
    rows = [{**f.to_json(), "run": meta["time"]} for f in figures]
    if update and path.is_file():
        old = json.loads(path.read_text())
        fresh = {r["id"] for r in rows}
        kept = [r for r in old.get("figures", []) if r.get("id") not in fresh]
        rows = kept + rows
        meta = {**old.get("meta", {}), "updated": meta}
    doc = {"meta": meta, "figures": rows}
    ids = [r["id"] for r in rows]
    if len(ids) != len(set(ids)):
        raise ValueError(f"bench: duplicate figure ids in {ids}")
    path.write_text(json.dumps(doc, indent=2) + "\n")
