"""`make demo` end to end: it is the first thing a new user runs, so the suite runs it too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from l4q_export.demo import EXPORT_RUNS


@pytest.mark.slow
@pytest.mark.runtime
def test_demo_trains_exports_and_verifies_every_target(tmp_path):
    work = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "l4q_export.demo", "--work", str(work), "--steps", "12"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for zp in ("float", "integer"):
        fold = json.loads((work / f"fold_{zp}.json").read_text())
        assert fold["passed"] and fold["n_bit_identical"] == fold["n_layers"] > 0
    for label, *_ in EXPORT_RUNS:
        verdict = json.loads((work / f"verify_{label}.json").read_text())
        assert verdict["passed"], (label, verdict.get("summary"))
        assert label in res.stdout
