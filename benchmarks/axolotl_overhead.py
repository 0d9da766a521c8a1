"""Training overhead of XTF in axolotl: `axolotl train` step time with `XTFPlugin` against the same run without.

Two configs that differ only in `plugins: [xtf_plugin.XTFPlugin]` + the `xtf:` block (demo model, LoRA r=16 on
every linear layer, the first 40 bundled GSM8K examples, batch 4, sequence_len 256, seed 0, 10 steps: the settings
of `training_overhead.py`). Both are preprocessed first (`axolotl preprocess`: tokenising, and for the XTF arm
scoring into the score cache), then both `axolotl train` runs start at once, one CPU thread each, so that they run
side by side under the same machine load (`--repeats` runs more pairs and pools their steps); a benchmark-only
plugin (`axolotl_step_timer.py`) records when every step ends. A step's time runs from the previous step's end (or
the start of training) to its own, so data loading and logging are included. The first 2 steps are warm-up in every
run; the ratio is the median over all timed steps of the paired per-step ratio XTF / baseline.

    python benchmarks/axolotl_overhead.py [--quick] [--steps 10] [--repeats 1] [--examples 40]

Writes benchmarks/results/axolotl_overhead.json (with --quick: a file in the temporary folder) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, ROOT, machine_info, markdown_table, median, write_json

ARMS = ("baseline", "XTFPlugin")
HERE = Path(__file__).resolve().parent


def write_configs(workdir: Path, model: str, examples: int, steps: int) -> dict[str, Path]:
    """One axolotl config per arm, identical but for the XTF plugin and its block."""
    from xtf_plugin.data import read_records
    from xtf_plugin.demo import DEMO_DATA

    data = workdir / "gsm8k.jsonl"
    rows = read_records(str(DEMO_DATA))[:examples]
    data.write_text("".join(json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n"
                            for r in rows))
    configs = {}
    for arm in ARMS:
        cfg: dict[str, Any] = {
            "base_model": model,
            "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
            "dataset_prepared_path": str(workdir / f"prepared-{arm}"),
            "val_set_size": 0, "sequence_len": 256, "sample_packing": False,
            "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True,
            "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
            "micro_batch_size": 4, "gradient_accumulation_steps": 1, "num_epochs": 1, "max_steps": steps,
            "optimizer": "adamw_torch", "lr_scheduler": "linear", "learning_rate": 2e-4,
            "bf16": False, "fp16": False, "tf32": False, "gradient_checkpointing": False, "attn_implementation": "sdpa",
            "output_dir": str(workdir / f"out-{arm}"), "logging_steps": 1, "save_strategy": "no", "seed": 0,
            "dataset_num_proc": 1,
            "plugins": ["axolotl_step_timer.StepTimerPlugin"],
        }
        if arm == "XTFPlugin":
            cfg["plugins"] = ["xtf_plugin.XTFPlugin", *cfg["plugins"]]
            cfg["xtf"] = {"protect": ["^#### .*"], "cache_dir": str(workdir / "xtf-cache")}
        configs[arm] = workdir / f"{arm}.yml"
        configs[arm].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return configs


def axolotl_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def axolotl(*args: str | Path, log: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "axolotl"), *map(str, args)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=axolotl_env(), cwd=ROOT)


def wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path], what: str) -> None:
    for arm, process in processes.items():
        if process.wait():
            tail = logs[arm].read_text()[-3000:]
            raise SystemExit(f"axolotl {what} failed for the {arm} arm (exit {process.returncode}):\n{tail}")


def step_seconds(out: Path) -> list[float]:
    """Seconds of each step, from the step timer's events."""
    events = [json.loads(line) for line in (out / "step_times.jsonl").read_text().splitlines() if line.strip()]
    begin = next(e["time"] for e in events if e["event"] == "train_begin")
    ends = [e["time"] for e in events if e["event"] == "step_end"]
    return [round(b - a, 4) for a, b in zip([begin, *ends[:-1]], ends, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of train runs (the ratio pools their steps)")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="3 steps of 12 examples, a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.examples, args.repeats = 3, 1, 12, 1
    args.out = args.out or str(Path(tempfile.gettempdir()) / "axolotl_overhead.json" if args.quick
                               else RESULTS / "axolotl_overhead.json")
    from xtf_plugin.demo import resolve_model_path

    started = time.perf_counter()
    machine = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="xtf-bench-axolotl-"))
    configs = write_configs(workdir, str(resolve_model_path(args.model)), args.examples, args.steps)
    logs = {arm: workdir / f"{arm}-preprocess.log" for arm in ARMS}
    # preprocessing (for XTF: scoring into the cache) is not timed; `train` then reuses it, as in real use
    wait_all({arm: axolotl("preprocess", configs[arm], log=logs[arm]) for arm in ARMS}, logs, "preprocess")
    times: dict[str, list[list[float]]] = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        logs = {arm: workdir / f"{arm}-train-{repeat}.log" for arm in ARMS}
        wait_all({arm: axolotl("train", configs[arm], "--launcher", "python", log=logs[arm]) for arm in ARMS}, logs, "train")
        for arm in ARMS:
            times[arm].append(step_seconds(workdir / f"out-{arm}"))
    pairs = [(x, b) for xs, bs in zip(times["XTFPlugin"], times["baseline"], strict=True)
             for x, b in list(zip(xs, bs, strict=False))[args.warmup :]]
    paired = [x / b for x, b in pairs]
    summary = {
        "steps_timed": len(paired),
        "median_step_seconds": {"baseline": median([b for _, b in pairs]), "XTFPlugin": median([x for x, _ in pairs])},
        "ratio_vs_baseline": round(median(paired), 4),
        "paired_ratio_range": [round(min(paired), 4), round(max(paired), 4)],
    }
    payload = {
        "machine": machine,
        "settings": {"model": args.model, "examples": args.examples, "steps": args.steps, "repeats": args.repeats,
                     "warmup_steps_discarded": args.warmup,
                     "micro_batch_size": 4, "sequence_len": 256, "lora": "r=16 all linear", "threads": "1 per process, 2 processes",
                     "xtf_config": "defaults + protect '^#### .*'"},
        "summary": summary,
        "raw": {"step_seconds": times},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(Path(args.out), payload)
    print(markdown_table(
        ["arm", "steps timed", "median step s", "step time ratio vs baseline (paired median)", "single steps"],
        [["baseline", len(paired), f"{summary['median_step_seconds']['baseline']:.3f}", "**1.000**", ""],
         ["XTFPlugin", len(paired), f"{summary['median_step_seconds']['XTFPlugin']:.3f}", f"**{summary['ratio_vs_baseline']:.3f}**",
          f"{min(paired):.2f} - {max(paired):.2f}"]],
    ))
    print(f"wrote {args.out} ({payload['wall_seconds']:.0f} s; work files in {workdir})", file=sys.stderr)


if __name__ == "__main__":
    main()
