"""`benchmarks/gpu_check.py --device cpu --quick`: the GPU check's own code paths, on a CPU, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_quick_runs_every_check_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "XTF_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                             "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == {"scoring", "scores_4bit", "train_qlora", "fused_losses"}
    assert all(check["ok"] for check in checks.values())
    assert checks["scores_4bit"]["quantized"] and checks["train_qlora"]["quantized"]
    assert checks["train_qlora"]["rows_with_xtf_labels"] == checks["train_qlora"]["rows_seen"] > 0
    assert checks["scoring"]["rows"] and all(row["scores_finite"] for row in checks["scoring"]["rows"])
