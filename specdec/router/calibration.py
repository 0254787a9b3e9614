"""A route's calibration: raw confidence -> the probability that the answer is correct.

A file `specdec eval` writes from labelled answers (JSON):

    {"method": "isotonic", "points": [[0.0, 0.05], [0.4, 0.31], [0.8, 0.77], [1.0, 0.93]]}

`points` are (raw confidence, P(correct)) pairs, raw strictly increasing over [0, 1] and P
non-decreasing (isotonic: a surer answer is never judged less likely right); between points the map
is linear, outside them flat. With a calibration a route's `confidence_below` threshold applies to
the calibrated value - a probability of being right - and the route record reports both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdec.errors import SpecdecError


@dataclass(frozen=True)
class Calibration:
    raw: tuple[float, ...]
    calibrated: tuple[float, ...]
    source: str = ""

    @staticmethod
    def load(path: str | Path) -> Calibration:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise SpecdecError(f"{path}: cannot read the calibration file ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise SpecdecError(f"{path}: not valid JSON ({e})") from None
        return Calibration.from_dict(data, str(path))

    @staticmethod
    def from_dict(data: object, source: str = "calibration") -> Calibration:
        if not isinstance(data, dict) or data.get("method") != "isotonic":
            raise SpecdecError(f'{source}: expected {{"method": "isotonic", "points": [[raw, p], ...]}}')
        points = data.get("points")
        if not isinstance(points, list) or len(points) < 2:
            raise SpecdecError(f"{source}: points: at least two [raw, p] pairs")
        raw, cal = [], []
        for i, point in enumerate(points):
            if (
                not isinstance(point, list)
                or len(point) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
                or not all(math.isfinite(v) and 0 <= v <= 1 for v in point)
            ):
                raise SpecdecError(f"{source}: points[{i}]: a pair of numbers in [0, 1], got {point!r}")
            if raw and point[0] <= raw[-1]:
                raise SpecdecError(
                    f"{source}: points[{i}]: raw confidences must increase ({point[0]} after {raw[-1]})"
                )
            if cal and point[1] < cal[-1]:
                raise SpecdecError(
                    f"{source}: points[{i}]: calibrated values must not decrease ({point[1]} after {cal[-1]})"
                )
            raw.append(float(point[0]))
            cal.append(float(point[1]))
        return Calibration(tuple(raw), tuple(cal), source)

    def __call__(self, confidence: float) -> float:
        return float(np.interp(confidence, self.raw, self.calibrated))

    def to_dict(self) -> dict:
        return {"method": "isotonic", "points": [list(p) for p in zip(self.raw, self.calibrated)]}
