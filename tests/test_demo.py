"""The demo runs end to end (a few steps, tiny model) and writes its comparison."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_reports_both_optimizers(tmp_path):
    out = tmp_path / "demo.json"
    env = dict(os.environ, MLORC_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--steps", "8",
                             "--model", "tiny", "--batch-size", "2", "--seq-len", "32",
                             "--vocab-size", "512", "--threads", "1", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| adamw |" in result.stdout and "| mlorc |" in result.stdout
    report = json.loads(out.read_text())
    text = json.dumps(report)
    assert "adamw" in text and "mlorc" in text
