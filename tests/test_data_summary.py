"""The data summary counts each validation sample left out once: a held-out sample dropped as too long is on the
overlong validation line, one with no trained token on the 'left out of validation' line, never on both."""

from __future__ import annotations

import dataclasses
import json

from fasttune.config import get_experiment
from fasttune.data.corpus import holdout
from fasttune.data.pipeline import build_data


def test_a_dropped_validation_sample_is_counted_once(tmp_path):
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    keys = [str(i) for i in range(60)]
    _, held = holdout(keys, keys, 0.3)
    empty, long = held[0], held[1:]
    records = [{"instruction": "Add the numbers. " * (30 if str(i) in long else 1), "input": "",
                "output": "" if str(i) == empty else "5"} for i in range(60)]  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    cfg = get_experiment("sft")
    data = dataclasses.replace(cfg.data, path=str(path), max_length=64, val_fraction=0.3, overlong="drop")
    s = build_data(dataclasses.replace(cfg, data=data), tokenizer=build_tiny_tokenizer()).summary
    assert len(long) > 1 and s.held.dropped == len(long) and s.held.untrained == 1 and s.dropped == 0
    assert s.val_left_out == len(long) + 1  # every held-out sample not validated: what _say_no_validation reads
    lines = s.lines()
    assert f"  overlong validation samples: 0 truncated, 0 split, {len(long)} dropped" in lines
    left = [line for line in lines if line.startswith("  left out of validation")]
    assert left == ["  left out of validation: 1 held-out sample, by the same rules (no trained token left)"], lines
    assert s.train_samples + s.val_samples + s.held.dropped + 1 == len(records)  # each record once


def test_validation_samples_only_dropped_get_no_left_out_line(tmp_path):
    from fixtures.tiny_tokenizer import build_tiny_tokenizer

    keys = [str(i) for i in range(60)]
    _, held = holdout(keys, keys, 0.3)
    records = [{"instruction": "Add the numbers. " * (30 if str(i) in held[1:] else 1), "input": "", "output": "5"}
               for i in range(60)]  # fmt: skip
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    cfg = get_experiment("sft")
    data = dataclasses.replace(cfg.data, path=str(path), max_length=64, val_fraction=0.3, overlong="drop")
    lines = build_data(dataclasses.replace(cfg, data=data), tokenizer=build_tiny_tokenizer()).summary.lines()
    assert f"  overlong validation samples: 0 truncated, 0 split, {len(held) - 1} dropped" in lines
    assert not [line for line in lines if "left out of validation" in line], lines
