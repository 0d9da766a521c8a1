"""Training overhead of XTF masks: SFT step time with XTF against the same SFT without it.

Arms (TRL, LoRA r=16 on every linear layer of the demo model, same tokenised GSM8K data, same seed, hence the
same LoRA initialisation and the same batches in the same order):

* `baseline`: TRL's `SFTTrainer`, prompt tokens masked, every response token trained;
* `XTFSFTTrainer`: XTF's masked labels baked into the training set before training (the mechanism axolotl's
  `XTFPlugin` uses too: masked `labels` from `load_datasets` plus a log callback, nothing else per step);
* `XTFCallback`: the stock `SFTTrainer` with `XTFCallback`, which swaps labels in the collate function of
  every batch (the only arm with per-step XTF work).

The arms' `train()` loops run in one process, each in its own thread, and take turns step by step (a baton
passed at `on_step_end`; the others wait, so only one trains at a time): step k of every arm runs under the
same machine load. A step's time runs from the moment its arm gets the baton to its next `on_step_end`, so it
includes fetching and collating the batch and the logging of the previous step. Scoring is not part of any
step: the score cache is filled before the clock starts (training reuses it, as `axolotl preprocess` +
`train` does). The first steps are discarded as warm-up; the ratio is the median over steps of the paired
per-step ratio arm / baseline.

    python benchmarks/training_overhead.py [--quick] [--steps 10] [--examples 40]

Writes benchmarks/results/training_overhead.json (with --quick: a file in the temporary folder) and prints a
markdown table. Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, device_name, machine_info, markdown_table, median, set_threads, write_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARMS = ("baseline", "XTFSFTTrainer", "XTFCallback")


class Baton:
    """Lets threads run one at a time, in a fixed round-robin order; finished threads leave the rotation."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.turn = 0
        self.done: set[str] = set()
        self.cond = threading.Condition()
        self.ready = threading.Barrier(len(names))

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.names[self.turn] == name)

    def _advance(self) -> None:
        for _ in range(len(self.names)):
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                break
        self.cond.notify_all()

    def pass_on(self, name: str) -> None:
        with self.cond:
            if self.names[self.turn] == name:
                self._advance()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.names[self.turn] == name and len(self.done) < len(self.names):
                self._advance()


def make_timer(name: str, baton: Baton, times: list[float]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Takes the baton at the start of training and after every step; records each step's time."""

        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            baton.ready.wait()
            baton.wait_turn(name)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            _sync()
            times.append(time.perf_counter() - self.started)
            baton.pass_on(name)
            baton.wait_turn(name)
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            baton.finish(name)

    return StepTimer()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_trainers(args: argparse.Namespace, workdir: Path, baton: Baton, times: dict[str, list[float]]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from xtf_plugin.config import XTFConfig
    from xtf_plugin.data import read_records, tokenize_records
    from xtf_plugin.demo import DEMO_DATA, resolve_model_path
    from xtf_plugin.integrations.trl import XTFCallback, XTFSFTConfig, XTFSFTTrainer
    from xtf_plugin.models import load_tokenizer

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(args.model)
    data = tokenize_records(read_records(str(DEMO_DATA))[: args.examples], tokenizer, "alpaca", max_length=args.max_length)
    dataset = Dataset.from_dict({"input_ids": [x.tolist() for x in data.input_ids], "labels": [x.tolist() for x in data.labels]})
    cuda = device_name() == "cuda"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    xtf_config = XTFConfig(cache_dir=str(workdir / "cache"), protect=["^#### .*"])
    trainers = {}
    for arm in ARMS:
        settings = dict(
            output_dir=str(workdir / arm),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=2e-4,
            logging_steps=1,
            max_length=args.max_length,
            bf16=bf16,
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
            seed=0,
            data_seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        sft_args = XTFSFTConfig(**settings, xtf=xtf_config) if arm == "XTFSFTTrainer" else SFTConfig(**settings)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa")
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        timer = make_timer(arm, baton, times[arm])
        common = dict(model=model, processing_class=tokenizer, args=sft_args, train_dataset=dataset, peft_config=lora)
        if arm == "baseline":
            trainers[arm] = SFTTrainer(**common, callbacks=[timer])
        elif arm == "XTFSFTTrainer":
            # scores here (fills the cache the callback arm reads); not part of any step time
            trainers[arm] = XTFSFTTrainer(**common, callbacks=[timer])
        else:
            trainers[arm] = SFTTrainer(**common, callbacks=[timer, XTFCallback(xtf_config)])
    return trainers


def run(args: argparse.Namespace) -> dict[str, Any]:
    baton = Baton(list(ARMS))
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory(prefix="xtf-bench-train-") as tmp:
        started = time.perf_counter()
        trainers = build_trainers(args, Path(tmp), baton, times)
        setup_seconds = time.perf_counter() - started

        def train(arm: str) -> None:
            try:
                trainers[arm].train()
            except BaseException as error:  # noqa: BLE001 - reported after join
                errors.append(error)
                baton.finish(arm)
                baton.ready.abort()

        threads = [threading.Thread(target=train, args=(arm,), name=arm) for arm in ARMS]
        train_started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        losses = {arm: [h["loss"] for h in trainers[arm].state.log_history if "loss" in h] for arm in ARMS}
        kept = {arm: getattr(trainers[arm], "xtf_result", None) for arm in ARMS}
        kept["XTFCallback"] = next(
            (c.xtf_result for c in trainers["XTFCallback"].callback_handler.callbacks if hasattr(c, "xtf_result")), None
        )
        kept_fraction = {arm: (r.log_metrics.get("xtf/kept_fraction") if r is not None else 1.0) for arm, r in kept.items()}
    return {
        "step_seconds": {arm: [round(t, 4) for t in times[arm]] for arm in ARMS},
        "losses": losses,
        "kept_fraction": kept_fraction,
        "setup_seconds": round(setup_seconds, 1),
        "train_seconds": round(time.perf_counter() - train_started, 1),
    }


def summarize(raw: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    steps = raw["step_seconds"]
    base = steps["baseline"][warmup:]
    rows = []
    for arm in ARMS:
        mine = steps[arm][warmup:]
        paired = [a / b for a, b in zip(mine, base, strict=False)]
        rows.append(
            {
                "arm": arm,
                "steps_timed": len(mine),
                "median_step_seconds": round(median(mine), 4),
                "ratio_vs_baseline": round(median(paired), 4),
                "ratio_of_medians": round(median(mine) / median(base), 4),
                "kept_fraction_of_response_tokens": raw["kept_fraction"][arm],
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        ["arm", "steps timed", "median step s", "step time ratio vs baseline (paired median)", "ratio of medians", "response tokens trained"],
        [
            [r["arm"], r["steps_timed"], f"{r['median_step_seconds']:.3f}", f"**{r['ratio_vs_baseline']:.3f}**", f"{r['ratio_of_medians']:.3f}",
             f"{100 * (r['kept_fraction_of_response_tokens'] or 0):.1f}%"]
            for r in rows
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 10; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 2; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--examples", type=int, default=None, help="GSM8K examples (default steps x batch size)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (0: torch's default)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.quick:
        args.max_length = min(args.max_length, 96)
        args.batch_size = 2
    args.examples = args.examples or args.steps * args.batch_size
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "training_overhead.quick.json" if args.quick else RESULTS / "training_overhead.json")
    info = machine_info()
    started = time.perf_counter()
    raw = run(args)
    rows = summarize(raw, args.warmup)
    payload = {
        "machine": info,
        "settings": {
            "model": args.model,
            "toolkit": "TRL SFTTrainer / XTFSFTTrainer / SFTTrainer + XTFCallback, LoRA r=16 all-linear",
            "examples": args.examples,
            "steps": args.steps,
            "warmup_steps_discarded": args.warmup,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "seed": 0,
            "threads": args.threads,
            "xtf_config": "defaults + protect '^#### .*'",
            "axolotl": "measured separately by axolotl_overhead.py (`axolotl train`, XTFPlugin vs no plugin)",
            "quick": args.quick,
        },
        "summary": rows,
        "raw": raw,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(out, payload)
    print()
    print(table(rows))
    print(f"\nwrote {out} ({payload['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
