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


# --- models -------------------------------------------------------------------------------------------

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B and Llama-3.1-8B (layer counts as published; vocabulary 128,256)
    "1B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}


def random_model(shape: str, dtype: Any, device: str, attention: str, layers: int | None = None,
                 vocab: int | None = None) -> Any:
    """A random-initialised Llama of one of `SHAPES` (seed 0), in eval mode; `layers` keeps fewer decoder layers
    (each layer has the full shape, so a layer's cost is the real model's), `vocab` sets another vocabulary size.
    Random weights: for timing only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dims = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}), **({"vocab_size": vocab} if vocab else {})}
    config = LlamaConfig(**dims, max_position_embeddings=32768, attn_implementation=attention)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


GAIN_EVERYWHERE = {"preset": "paper", "tr_method": "prompt_gain"}
"""Scoring settings that give the prompt gain of every response token (union mode reads TR everywhere), for analyses
that select on parts of the data or with other settings than the scoring run's: a spans-mode run computes the gain
only where its own selection reads it (`selection.prompt_gain_wanted`)."""


FLOOR_BATCH_TOKENS = 2048
"""The floor's batches: length-sorted, at most this many tokens with their padding (a longer example alone)."""


def floor_forward(model: Any, input_ids: list[np.ndarray], labels: list[np.ndarray],
                  batch_tokens: int = FLOOR_BATCH_TOKENS) -> int:
    """The least any KN scorer must do, as the benchmarks' floor: the decoder forward (no mask when a batch has no
    padding), then the LM head and a float32 log-probability (gather minus logsumexp) only at the positions that
    predict a response token. Returns the number of forward passes.

    Args:
        input_ids: one int64 array `[L_i]` per example.
        labels: one int64 array `[L_i]` per example, -100 where the token is not trained.
    """
    import torch

    device = model.get_input_embeddings().weight.device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    order = sorted(range(len(input_ids)), key=lambda i: (-len(input_ids[i]), i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * len(input_ids[batches[-1][0]]) <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    with torch.no_grad():
        for batch in batches:
            length = len(input_ids[batch[0]])
            ids = torch.zeros(len(batch), length, dtype=torch.long)
            target = torch.full((len(batch), length), -100, dtype=torch.long)
            mask = torch.zeros(len(batch), length, dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(input_ids[i])] = torch.as_tensor(input_ids[i])
                target[row, : len(labels[i])] = torch.as_tensor(labels[i])
                mask[row, : len(input_ids[i])] = 1
            attention_mask = None if bool(mask.all()) else mask.to(device)
            hidden = decoder(input_ids=ids.to(device), attention_mask=attention_mask, use_cache=False).last_hidden_state
            where = (target[:, 1:] != -100).to(device)
            logits = head(hidden[:, :-1][where]).float()
            _ = logits.gather(1, ids[:, 1:].to(device)[where][:, None])[:, 0] - logits.logsumexp(-1)
    return len(batches)


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
    return examples_of_lengths(tokenizer, [length] * n, start=offset * length)


def examples_of_lengths(tokenizer: Any, lengths: Sequence[int], start: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One example per entry of `lengths`, of exactly that many tokens: consecutive windows of the repeated GSM8K
    sample from token `start` on, the second half of each the response, the first half the prompt (-100)."""
    stream = gsm8k_token_stream(tokenizer, start + sum(lengths))
    ids, labels = [], []
    for length in lengths:
        window = np.asarray(stream[start : start + length], dtype=np.int64)
        lab = window.copy()
        lab[: length // 2] = -100
        ids.append(window)
        labels.append(lab)
        start += length
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


_MEASURE = r"""
import json, resource, subprocess, sys, tempfile, time
started = time.perf_counter()
errors = tempfile.TemporaryFile(mode="w+")  # not a pipe: nobody reads it while the child runs
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=errors, text=True)
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():
    try:
        with open(f"/proc/{child.pid}/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in peaks:
                    peaks[key] = max(peaks[key], int(line.split()[1]))
    except OSError:
        pass
while child.poll() is None:
    sample()
    time.sleep(0.2)
errors.seek(0)
stderr = errors.read()
seconds = time.perf_counter() - started
if child.returncode:
    sys.exit(f"{sys.argv[1:]} failed ({child.returncode}):\n{stderr[-3000:]}")
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "anon_kib": peaks["RssAnon"], "file_kib": peaks["RssFile"]}))
"""
"""Runs argv[1:] and prints its wall seconds and peak RSS (the largest of its process tree), and the peaks of its
main process's anonymous and file-backed resident memory (sampled every 0.2 s, on Linux)."""


def measure_process(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall seconds and peak MiB of `command` in a fresh process tree (started by a small wrapper process);
    `anon_mib` / `file_mib`: the sampled peaks of the main process's anonymous memory and of its file-backed pages
    (memory-mapped datasets and libraries, which the kernel can drop)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env,
                          cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ...: {done.stderr.strip()[-3000:]}")
    result = json.loads(done.stdout)
    return {"seconds": round(result["seconds"], 2), "peak_mib": round(result["peak_kib"] / 1024, 1),
            "anon_mib": round(result["anon_kib"] / 1024, 1), "file_mib": round(result["file_kib"] / 1024, 1)}


def emit(result: dict[str, Any]) -> None:
    """Child side: hand a JSON result to the parent."""
    print(_MARK + json.dumps(result), flush=True)


def child_env(spec: dict[str, Any]) -> dict[str, str]:
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
        env=child_env(spec),
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
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=child_env(spec),
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
