"""Shared helpers of the performance benchmarks: machine info, synthetic GSM8K sequences, memory probes, child
processes and small statistics.

Every timing arm runs in a child process of its own (`run_child`, or a `Worker` that loads once and runs the
workload on request), so that its peak memory is its own: on CPU the child's peak RSS (`getrusage`) and the
increment over the RSS right after the model is loaded (the peak is reset there through `/proc/self/clear_refs`,
so the increment is the workload's own peak); on CUDA `torch.cuda.max_memory_allocated`, in total and over what
was allocated after loading.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# this checkout's xtf_plugin, whatever the environment's editable install points at
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_MARK = "@@BENCH_RESULT@@ "


def machine_info() -> dict[str, Any]:
    """torch / transformers versions, device, threads, CPU count and the date (UTC)."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def set_threads(threads: int) -> None:
    """Intra-op CPU threads of this process (0: torch's default). Ignored on CUDA."""
    import torch

    if threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def device_name() -> str:
    """`cuda` when a GPU is visible, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- data ---------------------------------------------------------------------------------------------


def gsm8k_token_stream(tokenizer: Any, minimum: int) -> list[int]:
    """Token ids of the bundled GSM8K sample (question + answer, one after another), repeated until there are at
    least `minimum` of them."""
    from xtf_plugin.data import read_records
    from xtf_plugin.demo import DEMO_DATA

    records = read_records(str(DEMO_DATA))
    stream: list[int] = []
    while len(stream) < minimum:
        for record in records:
            text = record["question"] + "\n" + record["answer"] + "\n\n"
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(stream) >= minimum:
                break
    return stream


def synthetic_examples(tokenizer: Any, n: int, length: int, offset: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n` examples of exactly `length` tokens of real GSM8K text (consecutive windows of the repeated sample,
    starting `offset` windows in); the second half of each is the response (labels), the first half the prompt
    (-100)."""
    stream = gsm8k_token_stream(tokenizer, (offset + n) * length)
    ids, labels = [], []
    for index in range(offset, offset + n):
        window = np.asarray(stream[index * length : (index + 1) * length], dtype=np.int64)
        lab = window.copy()
        lab[: length // 2] = -100
        ids.append(window)
        labels.append(lab)
    return ids, labels


# --- memory -------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory of one workload in this process.

    `start()` right after the model is loaded (and warmed up); `stop()` right after the workload. On CUDA
    the numbers are `torch.cuda` allocations; on CPU resident set sizes.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base_mib = 0.0
        self.hwm_reset = False

    def start(self) -> None:
        """Record the memory in use now and reset the peak counters."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base_mib = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            return
        rss = _status_kib("VmRSS")
        self.base_mib = (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
        try:  # resets VmHWM (the peak RSS) to the current RSS, Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False

    def stop(self) -> dict[str, Any]:
        """Peak memory: `peak_mib` (the process's peak, everything included) and `increment_mib` (the
        workload's peak over the memory in use at `start`)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            return {
                "kind": "cuda max_memory_allocated",
                "after_load_mib": round(self.base_mib, 1),
                "peak_mib": round(peak, 1),
                "increment_mib": round(peak - self.base_mib, 1),
            }
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        hwm = _status_kib("VmHWM")
        workload_peak = hwm / 1024 if (self.hwm_reset and hwm is not None) else maxrss
        return {
            "kind": "cpu rss",
            "after_load_mib": round(self.base_mib, 1),
            "peak_mib": round(max(maxrss, workload_peak), 1),
            "workload_peak_mib": round(workload_peak, 1),
            "increment_mib": round(workload_peak - self.base_mib, 1),
        }


# --- child processes ----------------------------------------------------------------------------------


def emit(result: dict[str, Any]) -> None:
    """Child side: hand a JSON result to the parent."""
    print(_MARK + json.dumps(result), flush=True)


def _child_env(spec: dict[str, Any]) -> dict[str, str]:
    """Offline, quiet, this checkout first on the path; `spec["threads"]` (when > 0) sets OMP_NUM_THREADS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if spec.get("threads", 0) > 0:
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(script: Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `python script --child JSON` in a fresh process and return the result it `emit`s."""
    done = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_child_env(spec),
        timeout=timeout,
        check=False,
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise RuntimeError(f"child {spec} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def serve_requests(workload: Callable[[int], dict[str, Any]]) -> None:
    """Worker side: `emit` a ready mark, then run `workload(k)` for the k-th request line on stdin and `emit` each
    result, until stdin closes."""
    emit({"ready": True})
    for k, _ in enumerate(sys.stdin):
        emit(workload(k))


class Worker:
    """A child process (`python script --child JSON`) that loads its model once and then runs its workload on
    every `request()`, so that repeats do not pay for process start and model loading again.

    Start several at once (they load side by side, which is not timed), then `wait_ready()` each before the first
    request: only one workload runs at a time, the others wait on their stdin.
    """

    def __init__(self, script: Path, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker; closed in close())
        self._process = subprocess.Popen(
            [sys.executable, str(script), "--child", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=_child_env(spec),
        )

    def _result(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])
        self._process.wait()
        self._stderr.seek(0)
        raise RuntimeError(f"worker {self.spec} failed (exit {self._process.returncode}):\n{self._stderr.read()[-3000:]}")

    def wait_ready(self) -> None:
        """Block until the worker has loaded and warmed up."""
        self._result()

    def request(self) -> dict[str, Any]:
        """Run the workload once more and return its result."""
        assert self._process.stdin is not None
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        return self._result()

    def close(self) -> None:
        """End the worker (it exits when its stdin closes)."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait()
        self._stderr.close()


# --- statistics and output ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """Median (NaN for no values)."""
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b rounded to 3 decimals."""
    return round(a / b, 3) if b else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
