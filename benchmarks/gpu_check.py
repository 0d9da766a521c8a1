"""A GPU check for the day a GPU is lent: one command, about 8 minutes on one GPU, `results/gpu_check.json`.

    python benchmarks/gpu_check.py                         # on a GPU machine
    python benchmarks/gpu_check.py --device cpu --quick    # the script itself, in CI (under a minute)

What it checks (each entry of the JSON has `ok` and what was measured; a failing check does not stop the
others):

* `scoring`: XTF scoring against the floor (the decoder forward, then the LM head only at response positions
  and a float32 log-probability, in the same batches), on random-initialised Llama-3.2-1B- and
  Llama-3.1-8B-shaped bf16 models (random weights: timing only) at 1k, 4k and 16k tokens, with SDPA and, where
  it imports, flash-attention-2: time and `torch.cuda.max_memory_allocated` ratios.
* `scores_4bit`: scores of the same model loaded 4-bit nf4 (bitsandbytes, as QLoRA trains it) against bf16:
  finite, KN within tolerance.
* `train_qlora`: three steps of `XTFSFTTrainer` on the 4-bit model with LoRA: loss finite, and the labels that
  reached the loss are XTF's masks.
* `fused_losses`: whether Liger's fused linear cross entropy and Cut Cross Entropy import (their axolotl runs
  need a GPU and axolotl; listed as not run otherwise).

`--quick` uses a tiny random model (2 layers) and 128-token examples in float32, so the same code paths run on
a CPU in seconds; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHAPES, floor_forward, machine_info, random_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gpu_check.json"

def examples(vocab: int, n: int, length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n` random examples of `length` tokens; the second half is the response."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, vocab, length).astype(np.int64) for _ in range(n)]
    labels = []
    for row in ids:
        lab = row.copy()
        lab[: length // 2] = -100
        labels.append(lab)
    return ids, labels


def timed(device: str, work: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and peak allocated bytes (CUDA; 0 on CPU) of `work()`."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter() - started, int(torch.cuda.max_memory_allocated())
    return time.perf_counter() - started, 0


def check_scoring(device: str, quick: bool) -> dict[str, Any]:
    """The first pass of the default (KN, no RI) and of the paper preset (KN and RI: the attention capture) against
    the floor, and the prompt gain's second pass over every whole response (a default run feeds only the spans its
    selection reads, so this is its upper bound)."""
    from xtf_plugin.config import XTFConfig
    from xtf_plugin.scoring.engine import alone_log_probs, score_forward

    attentions = ["sdpa"]
    if not quick and device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            attentions.append("flash_attention_2")
        except ImportError:
            pass
    shapes = ["tiny"] if quick else ["1B", "8B"]
    lengths = [128] if quick else [1024, 4096, 16384]
    dtype = torch.float32 if quick else torch.bfloat16
    rows, ok = [], True
    for shape in shapes:
        for attention in attentions:
            model = random_model(shape, dtype, device, attention)
            for length in lengths:
                n = max(1, 16384 // length) if not quick else 4
                ids, labels = examples(SHAPES[shape]["vocab_size"], n, length)
                batch_size = max(1, 2048 // length)  # the floor's batches of 2,048 tokens
                default, paper = XTFConfig(batch_size=batch_size), XTFConfig(preset="paper", batch_size=batch_size)
                floor_forward(model, ids[:1], labels[:1])  # warm-up
                floor_s, floor_mem = timed(device, partial(floor_forward, model, ids, labels))
                with torch.no_grad():
                    xtf_s, xtf_mem = timed(device, partial(score_forward, model, ids, labels, default, progress=False))
                    ri_s, ri_mem = timed(device, partial(score_forward, model, ids, labels, paper, progress=False))
                    whole = [len(x) for x in ids]
                    gain_s, _ = timed(device, partial(alone_log_probs, model, ids, labels, whole, default,
                                                      progress=False))
                    scores = score_forward(model, ids, labels, paper, progress=False)
                response = np.concatenate(labels) != -100
                finite = bool(np.isfinite(scores.kn[response]).all() and np.isfinite(scores.ri[response]).all())
                ok &= finite

                def per_floor(value: float, floor: float) -> float | None:
                    return round(value / floor, 3) if floor else None

                rows.append({"shape": shape, "attention": attention, "tokens": length, "examples": n,
                             "floor_seconds": round(floor_s, 4), "xtf_seconds": round(xtf_s, 4),
                             "time_ratio": per_floor(xtf_s, floor_s), "memory_ratio": per_floor(xtf_mem, floor_mem),
                             "with_ri_seconds": round(ri_s, 4), "with_ri_time_ratio": per_floor(ri_s, floor_s),
                             "with_ri_memory_ratio": per_floor(ri_mem, floor_mem),
                             "whole_second_pass_time_ratio": per_floor(gain_s, floor_s),
                             "scores_finite": finite})
            model = None  # freed before the next shape loads
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return {"ok": ok, "rows": rows}


def tiny_checkpoint(folder: Path) -> Path:
    """A tiny random Llama with a real tokenizer built from a word list (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(SHAPES["tiny"]["vocab_size"] - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    model = random_model("tiny", torch.float32, "cpu", "sdpa")
    model.config.pad_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def check_4bit(device: str, quick: bool, checkpoint: Path) -> dict[str, Any]:
    from xtf_plugin.config import XTFConfig
    from xtf_plugin.models import load_model
    from xtf_plugin.scoring.engine import score_forward

    ids, labels = examples(SHAPES["tiny"]["vocab_size"], 4, 128)
    config = XTFConfig(batch_size=2)
    quantized_model = load_model(str(checkpoint), dtype="float32", load_in_4bit=True, device=device)
    with torch.no_grad():
        full = score_forward(load_model(str(checkpoint), dtype="float32", device=device), ids, labels, config,
                             progress=False)
        four = score_forward(quantized_model, ids, labels, config, progress=False)
    quantized = is_4bit(quantized_model)
    response = np.concatenate(labels) != -100
    drift = float(np.max(np.abs(full.kn[response] - four.kn[response])))
    finite = bool(np.isfinite(four.kn[response]).all())
    # 4-bit weights move probabilities; a scorer that broke would move them by far more
    return {"ok": quantized and finite and drift < 0.25, "quantized": quantized, "scores_finite": finite,
            "kn_max_abs_difference": round(drift, 4)}


def is_4bit(model: Any) -> bool:
    return any(type(module).__name__ == "Linear4bit" for module in model.modules())


def check_train(device: str, quick: bool, checkpoint: Path, workdir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig

    from xtf_plugin.integrations.trl import XTFSFTConfig, XTFSFTTrainer

    seen: list[torch.Tensor] = []

    class Recording(XTFSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            seen.append(inputs["labels"].detach().cpu())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    rows = [{"prompt": " ".join(f"w{(7 * i + j) % 500}" for j in range(12)),
             "completion": " " + " ".join(f"w{(11 * i + j) % 500}" for j in range(20))} for i in range(12)]
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32 if quick else torch.bfloat16)
    args = XTFSFTConfig(output_dir=str(workdir / "train"), max_steps=3, per_device_train_batch_size=4,
                        learning_rate=1e-3, logging_steps=1, bf16=not quick and device.startswith("cuda"),
                        use_cpu=not device.startswith("cuda"), report_to="none", save_strategy="no",
                        gradient_checkpointing=False, xtf={"preset": "paper", "cache_dir": str(workdir / "cache")})
    trainer = Recording(model=str(checkpoint), args=args, train_dataset=Dataset.from_list(rows),
                        processing_class=AutoTokenizer.from_pretrained(checkpoint), quantization_config=quantization,
                        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    expected = {tuple(row["input_ids"]): row["labels"] for row in trainer.train_dataset}
    loss = trainer.train().training_loss
    matched = 0
    for batch in seen:
        for row in batch.tolist():
            trained = [label for label in row if label != -100]
            matched += any(trained == [label for label in e if label != -100] for e in expected.values())
    rows_seen = sum(len(b) for b in seen)
    dropped = trainer.xtf_result.summary["dropped_tokens"]
    quantized = is_4bit(trainer.model)
    return {"ok": quantized and bool(np.isfinite(loss)) and rows_seen > 0 and matched == rows_seen and dropped > 0,
            "quantized": quantized, "loss": round(float(loss), 4), "rows_seen": rows_seen, "rows_with_xtf_labels": matched,
            "dropped_tokens": dropped}


def check_fused_losses() -> dict[str, Any]:
    found = {}
    for name, module in (("liger_fused_linear_cross_entropy", "liger_kernel"), ("cut_cross_entropy", "cut_cross_entropy")):
        try:
            __import__(module)
            found[name] = "installed (its axolotl run needs a GPU and axolotl: not run here)"
        except ImportError:
            found[name] = "not installed"
    return {"ok": True, **found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, short examples: the script's own test")
    parser.add_argument("--out", default=None, help="results file (default: results/gpu_check.json; --quick: a temp file)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --device cpu --quick to test the script")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) / "gpu_check.json" if args.quick else RESULTS)
    workdir = Path(tempfile.mkdtemp(prefix="xtf-gpu-check-"))
    checkpoint = tiny_checkpoint(workdir / "tiny")
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "scoring": lambda: check_scoring(args.device, args.quick),
        "scores_4bit": lambda: check_4bit(args.device, args.quick, checkpoint),
        "train_qlora": lambda: check_train(args.device, args.quick, checkpoint, workdir),
        "fused_losses": check_fused_losses,
    }
    results: dict[str, Any] = {}
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            results[name] = check()
        except Exception as error:  # one broken check must not hide the others' results
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[{name}] {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']}s", flush=True)
    document = {"device": args.device, "quick": args.quick, "checks": results, "machine": machine_info()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
