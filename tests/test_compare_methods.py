"""The comparison harness at toy size: every method trains, pretraining then fine-tuning from
the harness's own AdamW-pretrained model, and the table, JSON and PNG are written."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_harness_runs_every_method_at_toy_size(tmp_path):
    out = tmp_path / "compare.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_methods.py"), "--preset", "toy",
                             "--threads", "1", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    from mlorc_dist.methods import METHODS
    for setting in ("pretrain", "finetune"):
        results = report["results"][setting]
        assert list(results) == list(METHODS)
        for method, entry in results.items():
            best = entry["best"]
            assert math.isfinite(best["eval_loss"]) and best["state_bytes"] > 0, method
            assert len(best["train_loss"]) == report["preset"][f"{setting}_steps"]
        adamw = results["adamw"]["best"]
        assert results["mlorc-adamw"]["best"]["state_bytes"] < adamw["state_bytes"]
        assert results["lora"]["best"]["trainable_params"] < adamw["trainable_params"] / 5
    # every fine-tuning run starts from the same pretrained model, seen through each method's
    # adapters (LoRA, SwitchLoRA leave its function unchanged): the same loss before training
    before = [e["best"]["eval_before"] for e in report["results"]["finetune"].values()]
    assert max(before) - min(before) <= 1e-4 * before[0]
    assert report["finetune_base"]["method"] == "adamw"
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| mofasgd |" in out.with_suffix(".md").read_text()
