"""scripts/loss_curves.py: every variant trains on the same data and seed as the reference, so a setting that only
changes memory (an activation plan) gives the reference's curve on a CPU in fp32, and one that changes the numbers
(bf16 weights) does not."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("loss_curves", ROOT / "scripts/loss_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_plans_follow_the_reference_curve_and_precision_does_not(tmp_path):
    small = f"data.max_documents=40,data.cache_dir={tmp_path / 'cache'},training.device=cpu"
    args = ["--experiment", "quick", "--steps", "3", "--reference", f"model.memory=none,{small}",
            "--variant", f"every-2:model.memory=every:2,{small}", "--variant", f"bf16:model.dtype=bf16,{small}",
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert _script().main(args) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out/curves.json").read_text())["rows"]}
    assert list(rows) == ["plain", "plain, again", "every-2", "bf16"]
    assert all(len(r["losses"]) == 3 for r in rows.values())
    assert rows["plain, again"]["max_abs_diff"] == 0.0  # same data, seed and numbers on a CPU
    assert rows["every-2"]["max_abs_diff"] < 1e-5  # recomputation changes memory, not the model
    assert rows["bf16"]["max_abs_diff"] > 1e-4  # the comparison can see a real difference
    table = list(csv.reader((tmp_path / "out/curves.csv").open()))
    assert table[0] == ["step", "plain", "plain, again", "every-2", "bf16"] and len(table) == 4
    assert float(table[3][3]) == pytest.approx(rows["every-2"]["losses"][2], abs=1e-5)
    assert (tmp_path / "out/curves.png").stat().st_size > 0
