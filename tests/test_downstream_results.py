"""The downstream benchmark's results file (`benchmarks/downstream.py`): processes that share it lose no run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from downstream import merge_results  # noqa: E402


def test_a_merge_keeps_the_other_process_runs_and_its_own_where_both_have_one():
    on_disk = {"runs": {"clean/sft/0": {"accuracy": 0.5}, "noisy/sft/0": {"accuracy": 0.1}},
               "xtf": {"noisy/spans": {"dropped": 3}}, "base": {"accuracy": 0.0}}
    result = {"runs": {"clean/sft/0": {"accuracy": 0.4}, "noisy/dft/0": {"accuracy": 0.2}}, "xtf": {}}
    merge_results(on_disk, result, {"runs": {"noisy/dft/0"}, "xtf": set(), "base": set()})
    # clean/sft/0 was read before the other process rewrote it: the file's newer entry wins
    assert result["runs"] == {"clean/sft/0": {"accuracy": 0.5}, "noisy/sft/0": {"accuracy": 0.1},
                              "noisy/dft/0": {"accuracy": 0.2}}
    assert result["xtf"] == {"noisy/spans": {"dropped": 3}} and result["base"] == {"accuracy": 0.0}
    result["runs"]["clean/sft/0"] = {"accuracy": 0.7}
    merge_results(on_disk, result, {"runs": {"clean/sft/0", "noisy/dft/0"}, "xtf": set(), "base": set()})
    assert result["runs"]["clean/sft/0"] == {"accuracy": 0.7}


WRITER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from downstream import merge_results, results_lock
    out, name, other = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    # both start writing at once, so their read-merge-write steps interleave
    (out.parent / name).touch()
    while not (out.parent / other).exists():
        time.sleep(0.01)
    result = {"runs": {}, "xtf": {}}
    mine = {"runs": set(), "xtf": set(), "base": set()}
    for k in range(40):
        result["runs"][f"{name}/{k}"] = {"seed": k}
        mine["runs"].add(f"{name}/{k}")
        with results_lock(out):
            merge_results(json.loads(out.read_text()) if out.is_file() else {}, result, mine)
            time.sleep(0.005)  # the window in which an unlocked writer would lose the other's run
            temporary = out.with_suffix(f".{name}.tmp")
            temporary.write_text(json.dumps(result))
            temporary.replace(out)
    """
)


def test_two_processes_writing_one_results_file_lose_no_run(tmp_path):
    out = tmp_path / "results.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(BENCHMARKS), str(out), name, other])
               for name, other in (("a", "b"), ("b", "a"))]
    assert [writer.wait(timeout=300) for writer in writers] == [0, 0]
    runs = json.loads(out.read_text())["runs"]
    assert sorted(runs) == sorted(f"{name}/{k}" for name in ("a", "b") for k in range(40))


def detect(model: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / "downstream.py"), "--quick", "--detect", "--model", str(model),
                           "--out", str(out), "--score-cache", str(cache), *extra],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def without_timings(row: dict) -> dict:
    return {variant: {k: v for k, v in report.items() if k != "scoring_seconds"} if isinstance(report, dict) else report
            for variant, report in row.items()}


def test_detect_sets_redoes_the_rows_it_names_and_keeps_the_others(tiny_model_dir, tmp_path):
    out, cache = tmp_path / "detection.json", tmp_path / "cache"
    assert detect(tiny_model_dir, out, cache).returncode == 0
    first = json.loads(out.read_text())
    assert {"clean", "loop"} <= set(first["detection"])
    marked = json.loads(out.read_text())
    for name in ("clean", "loop"):
        marked["detection"][name]["spans"]["dropped_tokens"] = -1  # what a rerun of the row would overwrite
    out.write_text(json.dumps(marked))
    result = detect(tiny_model_dir, out, cache, "--detect-sets", "loop")
    assert result.returncode == 0, result.stderr
    second = json.loads(out.read_text())
    assert second["detection"]["clean"]["spans"]["dropped_tokens"] == -1
    assert without_timings(second["detection"]["loop"]) == without_timings(first["detection"]["loop"])
    assert set(second["detection"]) == set(first["detection"])
    # rows of other settings are not mixed into one file
    other = detect(tiny_model_dir, out, cache, "--detect-sets", "loop", "--variant", 'k2={"span_fence_k": 2}')
    assert other.returncode != 0 and "other settings" in other.stderr
    task = detect(tiny_model_dir, out, cache, "--detect-sets", "loop", "--task", "records")
    assert task.returncode != 0 and "other settings" in task.stderr
    assert json.loads(out.read_text()) == second
