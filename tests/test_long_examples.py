"""One long example scores in memory linear in its length: the attention capture works in query chunks and the
LM head runs at response positions only, so nothing of size `[L, L]` or `[L, vocab]` is held whole. Measured
as the scoring's own peak RSS in a fresh process (the peak is reset after loading, as the benchmarks do)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer

REPO = Path(__file__).resolve().parent.parent

SCORE_ONE_EXAMPLE = r"""
import json, sys
from pathlib import Path
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import TokenizedData
from xtf_plugin.pipeline import score_dataset

def kib(key):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])

model_dir, length = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
sample = Path(__import__("xtf_plugin").__file__).parent / "sample_data" / "gsm8k_sample.jsonl"
text = "\n".join(json.loads(line)["answer"] for line in sample.read_text().splitlines()) * 4
ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][:length], np.int64)
assert len(ids) == length
labels = ids.copy()
labels[: length // 4] = -100
config = XTFConfig(preset="paper", max_length=length, tr_domain_words=["total", "each", "more"])  # RI: the capture
# one short example first: allocations made once per process (thread pools, caches) are not the example's
warm = np.where(np.arange(128) < 32, -100, ids[:128])
score_dataset(model, tokenizer, TokenizedData([ids[:128]], [warm]), config, progress=False, use_cache=False)
Path("/proc/self/clear_refs").write_text("5")  # VmHWM (the peak RSS) := the current RSS
before = kib("VmRSS")
scored = score_dataset(model, tokenizer, TokenizedData([ids], [labels]), config, progress=False, use_cache=False)
trained = scored.response & np.isfinite(scored.scores.kn)
print(json.dumps({"increment_kib": kib("VmHWM") - before, "scored": int(trained.sum()),
                  "finite_ri": bool(np.isfinite(scored.scores.ri[trained]).all())}))
"""


def peak_increment(model_dir: Path, length: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", SCORE_ONE_EXAMPLE, str(model_dir), str(length)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_32k_token_example_scores_in_memory_linear_in_its_length(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure the scoring's own peak")
    build_model(tmp_path, build_tokenizer(tmp_path), max_positions=32768)
    short, long = peak_increment(tmp_path, 8192), peak_increment(tmp_path, 32768)
    assert long["scored"] == 32768 - 32768 // 4 and long["finite_ri"] and short["finite_ri"]
    # 4x the tokens: about 4x the memory when linear, 16x when anything [L, L] is held (4 GiB of float32 here)
    assert long["increment_kib"] < 6 * max(short["increment_kib"], 16 * 1024), (short, long)
    assert long["increment_kib"] < 512 * 1024, long
