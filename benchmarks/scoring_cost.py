"""What scoring costs: XTF's scoring (`score_dataset`, cache off) against the floor and against the released XTF
procedure (`official_xtf.py`); how its time scales with examples and sequence length; what a re-run with only
selection settings changed costs (cache on); `xtf score` as a whole process against the floor's process; and the
parts of the cost on a model of Llama-3.2-1B's shape, from which whole 1B and 8B models are computed.

The floor (`_common.floor_forward`) is the least any KN scorer must do: the decoder forward, then the LM head and a
float32 log-probability only at the response positions, in length-sorted batches of at most 2,048 tokens, no
mask where a batch has no padding.

Every arm times the default (`XTFConfig()`: RI, KN, and the prompt gain's second pass over the spans that the
selection reads it for); the whole-process arm also times `tr_method: vector` (RI, KN and the vector TR table, one
pass).

Every (arm, workload) runs in a child process of its own that loads the model once and then runs the workload once
per repeat; repeats are interleaved (the arm order rotates every repeat), so the arms see the same machine load.
Peak memory is taken from each process's first run, so it is the arm's own from a fresh start. Ratios are medians
of the per-repeat paired ratios. Inputs are real GSM8K text (the bundled sample, repeated) cut into windows of exactly
the target length, or of a mix of lengths (`MIXED_LENGTHS`); the second half of each window is the response.

    python benchmarks/scoring_cost.py [--quick] [--repeats 3] [--model demo]

Writes benchmarks/results/scoring_cost.json (with --quick: a file in the temporary folder) and prints markdown
tables. Runs unchanged on CUDA (memory is then `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    SHAPES,
    MemoryProbe,
    Worker,
    child_env,
    device_name,
    emit,
    examples_of_lengths,
    floor_forward,
    machine_info,
    markdown_table,
    measure_process,
    median,
    random_model,
    ratio,
    run_child,
    serve_requests,
    set_threads,
    synthetic_examples,
    write_json,
)

HERE = Path(__file__).resolve()
# real data mixes short and long examples: one workload does too (6,144 tokens, most examples short)
MIXED_LENGTHS = [2048, 1024, 512, 512, 256, 256, 256, 256] + [128] * 8
DEFAULT_EXAMPLES: dict[int | str, list[int]] = {256: [256] * 2, 1024: [1024], 4096: [4096], "mixed": MIXED_LENGTHS}
QUICK_EXAMPLES: dict[int | str, list[int]] = {64: [64] * 2, 128: [128], "mixed": [128, 64, 32, 32]}
ARMS = ("floor", "xtf", "official")
# output_attentions=True at 4096 tokens: 30 layers x 9 heads x 4096^2 fp32 = 18 GiB for the attentions alone
OFFICIAL_MAX_LENGTH = 1024


# --- child side ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def child_arm(spec: dict[str, Any]) -> None:
    """Worker of one arm at one length: load, warm up, then on every request time the workload and record its
    peak memory (the process's own only on the first request: later ones reuse what the allocator kept)."""
    import torch

    from xtf_plugin.config import XTFConfig
    from xtf_plugin.data import TokenizedData
    from xtf_plugin.models import load_model, load_tokenizer
    from xtf_plugin.pipeline import score_dataset

    device = device_name()
    arm, length, lengths = spec["arm"], spec["length"], spec["lengths"]
    tokenizer = load_tokenizer(spec["model"])
    if arm == "official":
        from official_xtf import load_official_model, score_official

        model = load_official_model(spec["model"], device)
    else:
        model = load_model(spec["model"], device=device)
    ids, labels = examples_of_lengths(tokenizer, lengths)
    config = XTFConfig()
    with torch.no_grad():  # warm-up: kernels, thread pools, allocator
        model(input_ids=torch.as_tensor(ids[0][:16], device=model.device)[None], use_cache=False)
    _sync(device)

    def workload(request: int) -> dict[str, Any]:
        probe = MemoryProbe(device)
        probe.start()
        started = time.perf_counter()
        extra: dict[str, Any] = {}
        if arm == "floor":
            extra["forward_passes"] = floor_forward(model, ids, labels)
        elif arm == "xtf":
            scored = score_dataset(model, tokenizer, TokenizedData(ids, labels), config, progress=False, use_cache=False)
            extra.update({k: scored.stats[k] for k in ("scoring_seconds", "forward_passes", "prompt_gain_seconds",
                                                         "prompt_gain_tokens")})
        else:
            result = score_official(model, tokenizer, ids)
            extra.update({"forward_passes": result["forward_passes"], "distinct_strings": result["distinct_strings"]})
        _sync(device)
        seconds = time.perf_counter() - started
        return {"arm": arm, "length": length, "examples": len(lengths), "tokens": sum(lengths), "seconds": round(seconds, 3), "memory": probe.stop(),
                "process_request": request, **extra}

    serve_requests(workload)


def child_scaling(spec: dict[str, Any]) -> dict[str, Any]:
    """Scoring time (cache off) and the floor's time for 1x, 4x, 16x examples of one length; sizes and arms
    interleaved within each repeat, so each size's ratio is paired."""
    from xtf_plugin.config import XTFConfig
    from xtf_plugin.data import TokenizedData
    from xtf_plugin.models import load_model, load_tokenizer
    from xtf_plugin.pipeline import score_dataset

    device = device_name()
    tokenizer = load_tokenizer(spec["model"])
    model = load_model(spec["model"], device=device)
    sizes, length = spec["sizes"], spec["length"]
    data = {n: TokenizedData(*synthetic_examples(tokenizer, n, length)) for n in sizes}
    score_dataset(model, tokenizer, data[sizes[0]], XTFConfig(), progress=False, use_cache=False)  # warm-up
    times: dict[int, list[float]] = {n: [] for n in sizes}
    floor_times: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(spec["repeats"]):
        order = sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]
        for n in order:
            arms = ("xtf", "floor") if rep % 2 == 0 else ("floor", "xtf")
            for arm in arms:
                _sync(device)
                started = time.perf_counter()
                if arm == "xtf":
                    score_dataset(model, tokenizer, data[n], XTFConfig(), progress=False, use_cache=False)
                else:
                    floor_forward(model, data[n].input_ids, data[n].labels)
                _sync(device)
                (times if arm == "xtf" else floor_times)[n].append(round(time.perf_counter() - started, 3))
    return {"length": length, "times": {str(n): t for n, t in times.items()},
            "floor_times": {str(n): t for n, t in floor_times.items()}}


SHAPE_EXAMPLES: dict[int, int] = {256: 2, 1024: 1, 4096: 1}
SHAPE_LAYERS = 2
"""The model-shape arm keeps this many decoder layers of Llama-3.2-1B's shape (all of its vocabulary and LM head):
enough to measure a layer, the capture of one layer and the LM head apart, in minutes on two cores."""


def child_shape(spec: dict[str, Any]) -> dict[str, Any]:
    """XTF against the floor on a random-initialised model of a published shape with `SHAPE_LAYERS` layers, both
    presets, and the parts an estimate for the whole model needs: the LM head at the response positions, each
    preset's first pass (the paper's with the RI capture), the default's second pass (the prompt gain), the paper's
    relevance table, and what remains outside them."""
    import numpy as np
    import torch

    from xtf_plugin.config import XTFConfig
    from xtf_plugin.data import TokenizedData
    from xtf_plugin.models import load_tokenizer
    from xtf_plugin.pipeline import score_dataset
    from xtf_plugin.scoring.attention import resolve_layers
    from xtf_plugin.scoring.relevance import context_free_vectors

    device = device_name()
    tokenizer = load_tokenizer(spec["tokenizer"])
    # the tiny shape of --quick has fewer ids than the tokenizer: its vocabulary grows to the tokenizer's
    vocab = max(SHAPES[spec["shape"]]["vocab_size"], len(tokenizer))
    model = random_model(spec["shape"], torch.float32 if device == "cpu" else torch.bfloat16, device, "sdpa",
                         layers=spec["layers"], vocab=vocab)
    head = model.get_output_embeddings()
    configs = {"xtf": XTFConfig(), "paper": XTFConfig(preset="paper")}
    arms = ["floor", *configs]
    rows = []
    for length, n in spec["examples"].items():
        ids, labels = synthetic_examples(tokenizer, n, int(length))
        data = TokenizedData(ids, labels)
        response = np.concatenate(labels) != -100
        distinct = np.unique(np.concatenate(ids)[response])
        floor_forward(model, ids[:1], labels[:1])  # warm-up
        samples: dict[str, list[float]] = {key: [] for key in ("floor", "xtf", "xtf_forward", "prompt_gain", "paper",
                                                                "paper_forward", "head", "relevance")}
        fed = 0
        for rep in range(spec["repeats"]):
            for arm in arms[rep % 3:] + arms[: rep % 3]:
                _sync(device)
                started = time.perf_counter()
                if arm == "floor":
                    floor_forward(model, ids, labels)
                else:
                    stats = score_dataset(model, tokenizer, data, configs[arm], progress=False, use_cache=False).stats
                    gain = stats["prompt_gain_seconds"]
                    samples[f"{arm}_forward"].append(stats["scoring_seconds"] - gain)
                    if arm == "xtf":
                        samples["prompt_gain"].append(gain)
                        fed = stats["prompt_gain_tokens"]
                _sync(device)
                samples[arm].append(time.perf_counter() - started)
            with torch.no_grad():
                hidden = torch.randn(int(response.sum()), model.config.hidden_size, device=device,
                                     dtype=head.weight.dtype)
                started = time.perf_counter()
                logits = head(hidden).float()
                _ = logits.logsumexp(-1)
                _sync(device)
                samples["head"].append(time.perf_counter() - started)
                started = time.perf_counter()
                context_free_vectors(model, distinct, "hidden")
                _sync(device)
                samples["relevance"].append(time.perf_counter() - started)
        rows.append({"length": int(length), "examples": n, "response_tokens": int(response.sum()),
                     "prompt_gain_tokens": fed, "distinct_response_tokens": int(distinct.size),
                     **{f"{k}_seconds": median(v) for k, v in samples.items()},
                     "time_ratio": _paired_ratio(samples["xtf"], samples["floor"]),
                     "paper_time_ratio": _paired_ratio(samples["paper"], samples["floor"])})
    captured = len(resolve_layers(XTFConfig(preset="paper").ri_layers, spec["layers"]))
    return {"shape": spec["shape"], "layers": spec["layers"], "captured_layers": captured, "rows": rows}


def _paired_ratio(arm: list[float], floor: list[float]) -> float:
    """Median of the per-repeat ratios arm / floor."""
    return round(median([x / f for x, f in zip(arm, floor, strict=True)]), 3)


def _layer_macs(shape: dict[str, Any]) -> float:
    """Multiply-adds per token of one decoder layer's projections and MLP (attention scores left out)."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return hidden * (2 * hidden + 2 * kv) + 3 * hidden * inner


def estimate_full(measured: dict[str, Any], shape: str) -> list[dict[str, Any]]:
    """XTF / floor for the whole model of `shape` (all its layers), both presets, computed from the parts measured
    on the shortened model of `measured["shape"]`: per layer, the floor's decoder time (measured minus the LM head,
    over the layers kept) and the capture (the paper preset's first pass minus the floor, over the layers captured);
    the LM head scales with the hidden size, the capture with heads x head size, a layer and the relevance table
    with a layer's multiply-adds, and the default's second pass stays the same share of the floor (a plain forward
    over the same tokens). Computed, not measured."""
    from xtf_plugin.scoring.attention import resolve_layers

    base, target = SHAPES[measured["shape"]], SHAPES[shape]
    layers = target["num_hidden_layers"]
    captured = len(resolve_layers("middle", layers))
    layer_scale = _layer_macs(target) / _layer_macs(base)
    head_scale = target["hidden_size"] / base["hidden_size"]  # same vocabulary
    capture_scale = target["hidden_size"] / base["hidden_size"]  # heads x head size = hidden size
    out = []
    for row in measured["rows"]:
        layer = (row["floor_seconds"] - row["head_seconds"]) / measured["layers"]
        floor = layers * layer * layer_scale + row["head_seconds"] * head_scale
        gain_share = row["prompt_gain_seconds"] / row["floor_seconds"]
        rest = max(row["xtf_seconds"] - row["xtf_forward_seconds"] - row["prompt_gain_seconds"], 0.0)
        xtf = floor * (1 + gain_share) + rest
        capture = max(row["paper_forward_seconds"] - row["floor_seconds"], 0.0) / measured["captured_layers"]
        relevance = layers * row["relevance_seconds"] / measured["layers"] * layer_scale
        paper_rest = max(row["paper_seconds"] - row["paper_forward_seconds"] - row["relevance_seconds"], 0.0)
        paper = floor + captured * capture * capture_scale + relevance + paper_rest
        out.append({"shape": shape, "layers": layers, "captured_layers": captured, "length": row["length"],
                    "examples": row["examples"], "time_ratio_computed": round(xtf / floor, 3),
                    "paper_time_ratio_computed": round(paper / floor, 3),
                    "lm_head_share_of_floor": round(row["head_seconds"] * head_scale / floor, 3),
                    "prompt_gain_share_of_floor": round(gain_share, 3),
                    "capture_share_of_floor": round(captured * capture * capture_scale / floor, 3),
                    "relevance_share_of_floor": round(relevance / floor, 3)})
    return out


SELECTION_CHANGES = [
    {"drop_ratio": 0.1},
    {"action": "mask", "drop_ratio": 0.3},
    {"span_fence_k": 2.5, "span_ungrounded_k": 2.2, "protect": ["^#### .*"]},
]


def child_cache(spec: dict[str, Any]) -> dict[str, Any]:
    """First scoring run into an empty cache, then a re-run with only selection settings changed."""
    from xtf_plugin.config import XTFConfig
    from xtf_plugin.data import read_records, tokenize_records
    from xtf_plugin.demo import DEMO_DATA
    from xtf_plugin.models import load_model, load_tokenizer
    from xtf_plugin.pipeline import score_dataset

    device = device_name()
    tokenizer = load_tokenizer(spec["model"])
    model = load_model(spec["model"], device=device)
    data = tokenize_records(read_records(str(DEMO_DATA))[: spec["examples"]], tokenizer, "alpaca")
    runs = []
    for rep in range(spec["repeats"]):
        with tempfile.TemporaryDirectory(prefix="xtf-bench-cache-") as cache_dir:
            started = time.perf_counter()
            first = score_dataset(model, tokenizer, data, XTFConfig(cache_dir=cache_dir), progress=False)
            first_s = time.perf_counter() - started
            change = SELECTION_CHANGES[rep % len(SELECTION_CHANGES)]
            started = time.perf_counter()
            again = score_dataset(model, tokenizer, data, XTFConfig(cache_dir=cache_dir, **change),
                                  progress=False)
            again_s = time.perf_counter() - started
            runs.append(
                {
                    "first_seconds": round(first_s, 3),
                    "rerun_seconds": round(again_s, 3),
                    "rerun_forward_passes": again.stats["forward_passes"],
                    "first_forward_passes": first.stats["forward_passes"],
                    "changed": change,
                }
            )
    return {"examples": spec["examples"], "tokens": int(sum(len(x) for x in data.input_ids)), "runs": runs}


def child_floor_process(spec: dict[str, Any]) -> None:
    """The whole-process floor: what any KN scorer's process must do for a dataset file. Import torch and
    transformers, load the tokenizer and the model, read and tokenise the rows as `xtf score` does, then
    `floor_forward`; nothing written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtf_plugin.data import read_records, resolve_format, tokenize_records
    from xtf_plugin.demo import resolve_model_path

    path = resolve_model_path(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = device_name()  # the dtype `xtf score` picks: bfloat16 on a GPU, float32 on a CPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16" if device == "cuda" else "float32",
                                                 attn_implementation="sdpa").to(device).eval()
    records = read_records(spec["data"])
    data = tokenize_records(records, tokenizer, resolve_format(records, "auto", source=spec["data"]), 2048,
                            source=spec["data"])
    floor_forward(model, data.input_ids, data.labels)


def whole_process(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`xtf score` (cache off) against the whole-process floor on the first `--process-examples` rows of the
    bundled GSM8K sample, each a fresh process tree, interleaved; wall time and peak RSS."""
    from xtf_plugin.data import read_records
    from xtf_plugin.demo import DEMO_DATA

    n = 8 if args.quick else args.process_examples
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in read_records(str(DEMO_DATA))[:n]))
    env = child_env({"threads": args.threads})
    score = [sys.executable, "-m", "xtf_plugin.cli", "score", "--model", args.model, "--data", str(data),
             "--no-cache", "--quiet", "--overwrite", "--out", str(work / "out")]
    commands = {
        "xtf": score,
        # the default scores the prompt gain in a second pass over the responses; this arm leaves it out
        "xtf_vector": [*score[:-2], "--set", "tr_method=vector", "--out", str(work / "out-vector")],
        "floor": [sys.executable, str(HERE), "--child", json.dumps({"task": "floor_process", "model": args.model,
                                                                    "data": str(data), "threads": args.threads})],
    }
    arms = list(commands)
    runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for rep in range(args.repeats):
        for arm in arms[rep % 3:] + arms[: rep % 3]:
            runs[arm].append(measure_process(commands[arm], env))
            print(f"  whole process, repeat {rep} {arm:10s} {runs[arm][-1]}", flush=True)
    summary = json.loads((work / "out" / "summary.json").read_text())
    return {"examples": n, "tokens": summary["tokens_scored_by_model"], "runs": runs}


# --- parent side --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    examples = QUICK_EXAMPLES if args.quick else DEFAULT_EXAMPLES
    official_max = max(k for k in examples if isinstance(k, int)) if args.quick else OFFICIAL_MAX_LENGTH
    started = time.perf_counter()
    samples: list[dict[str, Any]] = []
    for length, lengths in examples.items():
        arms = [a for a in ARMS if a != "official" or (isinstance(length, int) and length <= official_max)]
        # the workers load side by side (not timed); then one workload at a time
        workers = {arm: Worker(HERE, {"task": "arm", "arm": arm, "length": length, "lengths": lengths, "model": args.model,
                                      "threads": args.threads}) for arm in arms}
        try:
            for worker in workers.values():
                worker.wait_ready()
            for rep in range(args.repeats):
                shift = rep % len(arms)
                for arm in arms[shift:] + arms[:shift]:
                    result = workers[arm].request()
                    result["repeat"] = rep
                    samples.append(result)
                    print(f"  repeat {rep} L={length} {arm:8s} {result['seconds']:8.2f} s  {result['memory']}", flush=True)
        finally:
            for worker in workers.values():
                worker.close()
    scaling_length = 32 if args.quick else 64
    sizes = [1, 2, 4] if args.quick else [args.scaling_base, 4 * args.scaling_base, 16 * args.scaling_base]
    scaling = run_child(HERE, {"task": "scaling", "length": scaling_length, "sizes": sizes, "repeats": args.repeats, "model": args.model, "threads": args.threads})
    print(f"  scaling {scaling}", flush=True)
    cache = run_child(HERE, {"task": "cache", "examples": 4 if args.quick else args.cache_examples, "repeats": args.repeats, "model": args.model, "threads": args.threads})
    print(f"  cache {cache}", flush=True)
    shape = run_child(HERE, {"task": "shape", "shape": "tiny" if args.quick else "1B",
                             "layers": 2 if args.quick else SHAPE_LAYERS, "tokenizer": args.model,
                             "examples": {"64": 1, "128": 1} if args.quick else {str(k): v for k, v in SHAPE_EXAMPLES.items()},
                             "repeats": args.repeats, "threads": args.threads})
    print(f"  shape {shape}", flush=True)
    with tempfile.TemporaryDirectory(prefix="xtf-bench-process-") as work:
        process = whole_process(args, Path(work))
    return {
        "samples": samples,
        "scaling": scaling,
        "cache": cache,
        "shape": shape,
        "whole_process": process,
        "examples_per_length": {str(k): len(v) for k, v in examples.items()},
        "mixed_lengths": examples["mixed"],
        "official_max_length": official_max,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _by(samples: list[dict[str, Any]], arm: str, length: int) -> dict[int, dict[str, Any]]:
    return {s["repeat"]: s for s in samples if s["arm"] == arm and s["length"] == length}


def process_summary(process: dict[str, Any]) -> dict[str, Any]:
    """Medians and paired ratios of the whole-process arms (a file from before the `xtf_vector` arm has none)."""
    runs = process["runs"]
    row = {"examples": process["examples"], "tokens": process["tokens"],
           "floor_seconds": median([r["seconds"] for r in runs["floor"]]),
           "floor_peak_mib": median([r["peak_mib"] for r in runs["floor"]])}
    for arm, name in (("xtf", ""), ("xtf_vector", "vector_")):
        if arm in runs:
            row[f"xtf_{name}seconds"] = median([r["seconds"] for r in runs[arm]])
            row[f"{name}time_ratio"] = round(median([x["seconds"] / f["seconds"]
                                                     for x, f in zip(runs[arm], runs["floor"], strict=True)]), 3)
            row[f"xtf_{name}peak_mib"] = median([r["peak_mib"] for r in runs[arm]])
            row[f"{name}peak_ratio"] = ratio(row[f"xtf_{name}peak_mib"], row["floor_peak_mib"])
    return row


def process_table(p: dict[str, Any]) -> list[str]:
    """The whole-process table (markdown lines)."""
    out = ["", f"### Whole process: `xtf score` vs the floor's process ({p['examples']} GSM8K rows, {p['tokens']} tokens)", ""]
    rows = [["default (prompt gain)", f"{p['floor_seconds']:.2f}", f"{p['xtf_seconds']:.2f}", f"**{p['time_ratio']:.3f}**",
             f"{p['floor_peak_mib']:.0f} / {p['xtf_peak_mib']:.0f}", f"{p['peak_ratio']:.3f}"]]
    if "vector_time_ratio" in p:
        rows.append(["`tr_method: vector`", f"{p['floor_seconds']:.2f}", f"{p['xtf_vector_seconds']:.2f}",
                     f"**{p['vector_time_ratio']:.3f}**", f"{p['floor_peak_mib']:.0f} / {p['xtf_vector_peak_mib']:.0f}",
                     f"{p['vector_peak_ratio']:.3f}"])
    out.append(markdown_table(["xtf score", "floor s", "xtf score s", "time ratio", "peak MiB floor / XTF", "peak ratio"], rows))
    return out


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    samples = raw["samples"]
    lengths = list(dict.fromkeys(s["length"] for s in samples))  # the workloads in the order they ran
    floor_rows, official_rows, length_rows = [], [], []
    for length in lengths:
        floor, xtf, official = (_by(samples, a, length) for a in ARMS)
        reps = sorted(set(floor) & set(xtf))
        n = xtf[reps[0]]["examples"]
        # memory from each process's first request only: later ones reuse memory the allocator kept
        mem = lambda arm, key: median([arm[r]["memory"][key] for r in arm if arm[r].get("process_request", 0) == 0])  # noqa: E731
        row = {
            "length": length,
            "examples": n,
            "tokens": xtf[reps[0]]["tokens"],
            "floor_seconds": median([floor[r]["seconds"] for r in reps]),
            "xtf_seconds": median([xtf[r]["seconds"] for r in reps]),
            "xtf_forward_seconds": median([xtf[r]["scoring_seconds"] for r in reps]),
            "time_ratio": round(median([xtf[r]["seconds"] / floor[r]["seconds"] for r in reps]), 3),
            "floor_peak_mib": mem(floor, "peak_mib"),
            "xtf_peak_mib": mem(xtf, "peak_mib"),
            "peak_ratio": ratio(mem(xtf, "peak_mib"), mem(floor, "peak_mib")),
            "floor_increment_mib": mem(floor, "increment_mib"),
            "xtf_increment_mib": mem(xtf, "increment_mib"),
            "increment_ratio": ratio(mem(xtf, "increment_mib"), mem(floor, "increment_mib")),
        }
        floor_rows.append(row)
        length_rows.append(
            {
                "length": length,
                "xtf_seconds_per_1k_tokens": round(1000 * row["xtf_seconds"] / row["tokens"], 3),
                "floor_seconds_per_1k_tokens": round(1000 * row["floor_seconds"] / row["tokens"], 3),
            }
        )
        if official:
            reps_o = sorted(set(official) & set(xtf))
            official_rows.append(
                {
                    "length": length,
                    "examples": n,
                    "official_seconds": median([official[r]["seconds"] for r in reps_o]),
                    "xtf_seconds": median([xtf[r]["seconds"] for r in reps_o]),
                    "speedup": round(median([official[r]["seconds"] / xtf[r]["seconds"] for r in reps_o]), 2),
                    "official_forward_passes": official[reps_o[0]]["forward_passes"],
                    "xtf_forward_passes": xtf[reps_o[0]]["forward_passes"],
                    "official_peak_mib": mem(official, "peak_mib"),
                    "xtf_peak_mib": mem(xtf, "peak_mib"),
                    "peak_ratio_xtf_over_official": ratio(mem(xtf, "peak_mib"), mem(official, "peak_mib")),
                    "official_increment_mib": mem(official, "increment_mib"),
                    "xtf_increment_mib": mem(xtf, "increment_mib"),
                    "increment_ratio_xtf_over_official": ratio(mem(xtf, "increment_mib"), mem(official, "increment_mib")),
                }
            )
    scaling = raw["scaling"]
    sizes = sorted(int(n) for n in scaling["times"])
    base = median(scaling["times"][str(sizes[0])]) / sizes[0]
    example_rows = [
        {
            "examples": n,
            "tokens": n * scaling["length"],
            "seconds": median(scaling["times"][str(n)]),
            "seconds_per_example_vs_1x": round(median(scaling["times"][str(n)]) / n / base, 3),
            "floor_seconds": median(scaling["floor_times"][str(n)]),
            "time_ratio": _paired_ratio(scaling["times"][str(n)], scaling["floor_times"][str(n)]),
        }
        for n in sizes
    ]
    cache_runs = raw["cache"]["runs"]
    cache_row = {
        "examples": raw["cache"]["examples"],
        "tokens": raw["cache"]["tokens"],
        "first_seconds": median([r["first_seconds"] for r in cache_runs]),
        "rerun_seconds": median([r["rerun_seconds"] for r in cache_runs]),
        "rerun_share": round(median([r["rerun_seconds"] / r["first_seconds"] for r in cache_runs]), 4),
        "rerun_forward_passes": max(r["rerun_forward_passes"] for r in cache_runs),
    }
    shape = raw["shape"]
    return {
        "whole_process": process_summary(raw["whole_process"]),
        "shape": shape["rows"],
        "shape_model": f"random {shape['shape']} shape, {shape['layers']} layers ({shape['captured_layers']} captured)",
        "shape_computed": [] if shape["shape"] == "tiny" else [*estimate_full(shape, "1B"), *estimate_full(shape, "8B")],
        "vs_floor": floor_rows,
        "vs_official": official_rows,
        "scaling_examples": example_rows,
        "scaling_length": length_rows,
        "cache": cache_row,
    }


def tables(summary: dict[str, Any], official_max: int) -> str:
    out = ["### Scoring cost vs the floor (decoder, then the LM head only at response positions)", ""]
    out.append(
        markdown_table(
            ["length", "examples", "floor s", "XTF s", "time ratio", "peak MiB floor / XTF", "peak ratio", "increment MiB floor / XTF", "increment ratio"],
            [
                [r["length"], r["examples"], f"{r['floor_seconds']:.2f}", f"{r['xtf_seconds']:.2f}", f"**{r['time_ratio']:.3f}**",
                 f"{r['floor_peak_mib']:.0f} / {r['xtf_peak_mib']:.0f}", f"**{r['peak_ratio']:.3f}**",
                 f"{r['floor_increment_mib']:.0f} / {r['xtf_increment_mib']:.0f}", f"{r['increment_ratio']:.3f}"]
                for r in summary["vs_floor"]
            ],
        )
    )
    out += ["", f"### Scoring cost vs the released procedure (official arm up to {official_max} tokens)", ""]
    out.append(
        markdown_table(
            ["length", "examples", "official s", "XTF s", "speed-up", "forward passes official / XTF", "peak MiB official / XTF", "increment MiB official / XTF"],
            [
                [r["length"], r["examples"], f"{r['official_seconds']:.2f}", f"{r['xtf_seconds']:.2f}", f"**{r['speedup']:.2f}x**",
                 f"{r['official_forward_passes']} / {r['xtf_forward_passes']}", f"{r['official_peak_mib']:.0f} / {r['xtf_peak_mib']:.0f}",
                 f"{r['official_increment_mib']:.0f} / {r['xtf_increment_mib']:.0f}"]
                for r in summary["vs_official"]
            ],
        )
    )
    out += ["", "### Scaling", ""]
    out.append(
        markdown_table(
            ["examples", "tokens", "XTF s", "s per example vs 1x", "floor s", "XTF / floor"],
            [[r["examples"], r["tokens"], f"{r['seconds']:.2f}", f"{r['seconds_per_example_vs_1x']:.3f}",
              f"{r['floor_seconds']:.2f}", f"{r['time_ratio']:.3f}"] for r in summary["scaling_examples"]],
        )
    )
    out.append("")
    out.append(
        markdown_table(
            ["length", "XTF s / 1k tokens", "floor s / 1k tokens", "XTF / floor"],
            [
                [r["length"], f"{r['xtf_seconds_per_1k_tokens']:.3f}", f"{r['floor_seconds_per_1k_tokens']:.3f}",
                 f"{r['xtf_seconds_per_1k_tokens'] / r['floor_seconds_per_1k_tokens']:.3f}"]
                for r in summary["scaling_length"]
            ],
        )
    )
    c = summary["cache"]
    out += ["", "### Cache: re-run with only selection settings changed", ""]
    out.append(
        markdown_table(
            ["examples", "tokens", "first run s", "re-run s", "re-run / first", "forward passes in re-run"],
            [[c["examples"], c["tokens"], f"{c['first_seconds']:.2f}", f"{c['rerun_seconds']:.3f}", f"**{100 * c['rerun_share']:.2f}%**", c["rerun_forward_passes"]]],
        )
    )
    out += process_table(summary["whole_process"])
    out += ["", f"### Model shape: {summary['shape_model']} (measured)", ""]
    out.append(markdown_table(
        ["length", "examples", "floor s", "XTF s", "time ratio", "second pass s (tokens)", "`paper` s",
         "`paper` ratio", "LM head s", "relevance table s"],
        [[r["length"], r["examples"], f"{r['floor_seconds']:.2f}", f"{r['xtf_seconds']:.2f}", f"**{r['time_ratio']:.3f}**",
          f"{r['prompt_gain_seconds']:.2f} ({r['prompt_gain_tokens']} of {r['response_tokens']})",
          f"{r['paper_seconds']:.2f}", f"{r['paper_time_ratio']:.3f}", f"{r['head_seconds']:.2f}",
          f"{r['relevance_seconds']:.2f}"] for r in summary["shape"]]))
    if summary["shape_computed"]:
        out += ["", "### Whole models, computed from the parts measured above (not measured)", ""]
        out.append(markdown_table(
            ["shape", "layers (captured by `paper`)", "length", "XTF / floor", "second pass share", "`paper` / floor",
             "capture share", "relevance table share", "LM head share"],
            [[r["shape"], f"{r['layers']} ({r['captured_layers']})", r["length"], f"**{r['time_ratio_computed']:.3f}**",
              f"{r['prompt_gain_share_of_floor']:.3f}", f"{r['paper_time_ratio_computed']:.3f}",
              f"{r['capture_share_of_floor']:.3f}", f"{r['relevance_share_of_floor']:.3f}",
              f"{r['lm_head_share_of_floor']:.3f}"]
             for r in summary["shape_computed"]]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per arm (default 3; --quick: 1)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--scaling-base", type=int, default=1, help="examples of 64 tokens at 1x (then 4x, 16x)")
    parser.add_argument("--cache-examples", type=int, default=12, help="GSM8K examples of the cache run")
    parser.add_argument("--process-examples", type=int, default=60, help="GSM8K rows of the whole-process arms")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads per process (0: torch's default)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only-process", action="store_true",
                        help="only the whole-process arms (results/scoring_cost_process.json unless --out)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        set_threads(spec.get("threads", 0))
        if spec["task"] == "arm":
            child_arm(spec)
        elif spec["task"] == "floor_process":
            child_floor_process(spec)
        else:
            emit({"scaling": child_scaling, "cache": child_cache, "shape": child_shape}[spec["task"]](spec))
        return
    args.repeats = args.repeats or (1 if args.quick else 3)
    name = "scoring_cost_process" if args.only_process else "scoring_cost"
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / f"{name}.quick.json" if args.quick else RESULTS / f"{name}.json")
    set_threads(args.threads)
    info = machine_info()
    if args.only_process:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="xtf-bench-process-") as work:
            process = whole_process(args, Path(work))
        process["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json(out, {"machine": info, "settings": {"model": args.model, "repeats": args.repeats,
                                                       "threads": args.threads, "quick": args.quick},
                         "summary": {"whole_process": process_summary(process)}, "raw": {"whole_process": process}})
        print("\n".join(process_table(process_summary(process))))
        print(f"\nwrote {out} ({process['wall_seconds']:.0f} s)")
        return
    raw = run(args)
    summary = summarize(raw)
    payload = {
        "machine": info,
        "settings": {
            "model": args.model,
            "repeats": args.repeats,
            "examples_per_length": raw["examples_per_length"],
            "official_max_length": raw["official_max_length"],
            "official_skipped_above": "output_attentions=True returns every layer's [heads, L, L] probabilities: at 4096 "
            "tokens 30 x 9 x 4096^2 x 4 B = 18 GiB for the demo model, more than the 2-core benchmark machine's memory",
            "xtf_config": "the defaults (spans preset: ri_layers middle, batch_size 8, tr_method prompt_gain with its "
                          "second pass over the spans the selection reads), cache off except the cache test; the "
                          "whole-process arms with the defaults and with tr_method vector (one pass)",
            "floor": "decoder forward (SDPA, no mask without padding), then the LM head and a float32 log-probability "
            "only at response positions, in length-sorted batches of at most 2,048 tokens (_common.floor_forward)",
            "shape": f"random-initialised Llama-3.2-1B shape with {SHAPE_LAYERS} of its 16 layers (timing only)",
            "threads": args.threads,
            "quick": args.quick,
        },
        "summary": summary,
        "raw": raw,
    }
    write_json(out, payload)
    print()
    print(tables(summary, raw["official_max_length"]))
    print(f"\nwrote {out} ({raw['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
