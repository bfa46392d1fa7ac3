"""The papers' published numbers, one JSON file per paper (`stitching.json`, ...): each number
with the setting it was measured in and its source in the paper, so the analysis reports can
print them beside raysae's own figures. Data only: no torch, no ray, no mlflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DIRECTION_LABELS = {"forward": "fwd", "backward": "bwd"}
"""How a transfer direction is filed. In code and config a direction is `forward`
(SAE_{i<-i-1}) or `backward` (SAE_{i<-i+1}); the papers' numbers here (`at.direction`) and every
run (tag `raysae.direction`, run names like `L3←L2 fwd`) carry these short labels, which the
reports match up. Stored values: kept as they are, so runs logged before still match."""


def load(name: str) -> dict[str, Any]:
    """The reference file `<name>.json` of this folder (FileNotFoundError naming the choices)."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in HERE.glob("*.json"))
        raise FileNotFoundError(f"no reference numbers {name!r} in {HERE}; known: {known}")
    return json.loads(path.read_text())


def settings_of(number: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings a number was measured in (its `setting`: one dict, or a list of them)."""
    setting = number.get("setting", {})
    return setting if isinstance(setting, list) else [setting]


def lookup(ref: dict[str, Any], name: str, setting: dict[str, Any]) -> dict[str, Any] | None:
    """The number `name` of `ref` measured in `setting` (every key of one of the number's
    settings has the same value in `setting`); None when the paper has none for it."""
    for number in ref["numbers"]:
        if number["name"] == name and any(
            all(setting.get(k) == v for k, v in alt.items()) for alt in settings_of(number)
        ):
            return number
    return None
