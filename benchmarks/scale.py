"""Scale: whole-process time and peak memory at 10k, 40k and 160k examples.

The tests' tiny model and tokenizer (a random 2-layer Llama, hidden 32, and a 400-token BPE trained on the
bundled sample) score generated GSM8K-style examples, so the pipeline around the model weighs: reading and
tokenising, the score cache, the selection, the parquet writer, the report. Each arm is a process of its own,
started by a small wrapper that reports its wall time and peak RSS (`getrusage` of its children):

* `score`: `xtf score` into an empty cache;
* `rescore`: the same data with a selection setting changed (`--set drop_ratio=0.3`): every score from the cache;
* `report`: `xtf report --html`, and `browser`: the page opened and painted in headless Chromium, less the
  browser's own start on an empty page;
* `axolotl`: `axolotl preprocess` with an `xtf:` block (axolotl's `load_datasets` path), when axolotl imports,
  up to `--axolotl-max` examples, and `axolotl_alone`: the same without the `xtf:` block (axolotl's own
  tokenising, one process, takes most of that arm's time): XTF's share is the difference;
* `loaded`: a process that imports xtf_plugin and loads the model, nothing else: memory "above the loaded
  model" is an arm's peak minus this one.

    python benchmarks/scale.py            # 10k, 40k, 160k examples; writes results/scale.json
    python benchmarks/scale.py --quick    # 1k and 4k examples; prints only, unless --out is given
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, ROOT, machine_info, markdown_table, measure_process, write_json

sys.path.insert(0, str(ROOT / "tests"))
from conftest import build_model, build_tokenizer, gsm8k_rows  # noqa: E402  (the tests' tiny model)

SIZES = (10_000, 40_000, 160_000)
QUICK_SIZES = (1_000, 4_000)

LOAD_ONLY = """
import sys
import xtf_plugin.cli  # noqa: F401
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1])
"""


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "XTF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "AXOLOTL_DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def write_rows(path: Path, n: int) -> None:
    """n Alpaca rows: the bundled GSM8K sample's questions and answers, numbered past its 200 rows."""
    base = gsm8k_rows(200)
    with path.open("w") as handle:
        for i in range(n):
            row = base[i % len(base)]
            handle.write(json.dumps({"instruction": f"Variant {i // len(base)}: {row['question']}", "input": "",
                                     "output": row["answer"]}) + "\n")


def axolotl_config(folder: Path, model: Path, data: Path, xtf: bool = True) -> Path:
    """A CPU `axolotl preprocess` config for the tiny model, XTF with its defaults (or without the `xtf:` block)."""
    name = "axolotl" if xtf else "axolotl-alone"
    cfg = {
        "base_model": str(model), "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(folder / f"{name}-prepared"), "val_set_size": 0, "sequence_len": 1024,
        "sample_packing": False, "micro_batch_size": 2, "num_epochs": 1, "learning_rate": 1e-3,
        "optimizer": "adamw_torch", "bf16": False, "fp16": False, "tf32": False,
        "output_dir": str(folder / f"{name}-out"), "dataset_num_proc": 1, "plugins": ["xtf_plugin.XTFPlugin"],
        **({"xtf": {"cache_dir": str(folder / "axolotl-cache")}} if xtf else {}),
    }
    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def browser_seconds(page: Path, profile: Path) -> dict[str, Any]:
    """Headless Chromium opening the page until it has rendered and painted it (`--screenshot`), against the same
    browser opening an empty page: `seconds` is the page's share, `blank_seconds` the browser's start. (`--dump-dom`
    would also time writing out the whole DOM, the embedded data included: most of its time at 5,000 examples.)
    The examples rendered on the first page are counted from a `--dump-dom` run that is not timed."""
    chromium = shutil.which("chromium")
    if chromium is None:
        return {"seconds": None, "note": "chromium not installed"}
    blank = page.with_name("blank.html")
    blank.write_text("<!doctype html><title>blank</title>")

    def run(*flags: str, target: Path, folder: str) -> tuple[float, str]:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile / folder}", *flags, target.as_uri()]
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True, cwd=page.parent).stdout
        return time.perf_counter() - started, out

    shot = ["--window-size=1280,1024", f"--screenshot={page.with_name('page.png')}"]
    blank_seconds, _ = run(*shot, target=blank, folder="blank")
    seconds, _ = run(*shot, target=page, folder="page")
    _, dom = run("--dump-dom", target=page, folder="dom")
    return {"seconds": round(max(seconds - blank_seconds, 0.0), 2), "open_seconds": round(seconds, 2),
            "blank_seconds": round(blank_seconds, 2), "page_mib": round(page.stat().st_size / 2**20, 1),
            "examples_rendered": dom.count('class="example"')}


def response_tokens(model: Path, data: Path) -> int:
    """The response tokens `xtf score` would count in `data` (when its arm does not run)."""
    from xtf_plugin.data import read_rows, tokenize_records
    from xtf_plugin.models import load_tokenizer

    tokenized = tokenize_records(read_rows(str(data)), load_tokenizer(str(model)))
    return int(sum((labels != -100).sum() for labels in tokenized.labels))


def run_size(work: Path, model: Path, n: int, with_axolotl: bool, with_cli: bool = True) -> dict[str, Any]:
    folder = work / f"n{n}"
    folder.mkdir()
    data = folder / "rows.jsonl"
    write_rows(data, n)
    env = environment(folder / "cache")
    cli = [sys.executable, "-m", "xtf_plugin.cli"]
    score = [*cli, "score", "--model", str(model), "--data", str(data), "--quiet"]
    arms: dict[str, Any] = {}
    if with_cli:
        arms["score"] = measure_process([*score, "--out", str(folder / "out")], env)
        arms["rescore"] = measure_process([*score, "--out", str(folder / "out2"), "--set", "drop_ratio=0.3"], env)
        arms["report"] = measure_process([*cli, "report", str(folder / "out"), "--html", str(folder / "page.html")], env)
        arms["browser"] = browser_seconds(folder / "page.html", folder / "chromium-profile")
    if with_axolotl:
        axolotl = str(Path(sys.executable).parent / "axolotl")
        arms["axolotl_alone"] = measure_process([axolotl, "preprocess", str(axolotl_config(folder, model, data, False))],
                                                env)
        arms["axolotl"] = measure_process([axolotl, "preprocess", str(axolotl_config(folder, model, data))], env)
    if not with_cli:
        tokens = response_tokens(model, data)
        shutil.rmtree(folder)
        return {"examples": n, "response_tokens": tokens, "arms": arms}
    summary = json.loads((folder / "out" / "summary.json").read_text())
    rescored = json.loads((folder / "out2" / "summary.json").read_text())
    shutil.rmtree(folder)
    return {"examples": n, "response_tokens": summary["response_tokens"], "tokens": summary.get("tokens"),
            "rescore_forward_passes": rescored["forward_passes"], "arms": arms}


def derived(sizes: list[dict[str, Any]], loaded_mib: float) -> dict[str, Any]:
    """Per-token time and peak memory above the loaded model, each against the smallest size."""
    first = sizes[0]
    out: dict[str, Any] = {}
    for arm in first["arms"]:
        if first["arms"][arm].get("seconds") is None or "peak_mib" not in first["arms"][arm]:
            continue
        base_time = first["arms"][arm]["seconds"] / first["response_tokens"]
        base_memory = first["arms"][arm]["peak_mib"] - loaded_mib
        present = [size for size in sizes if arm in size["arms"]]
        out[arm] = [{
            "examples": size["examples"],
            "per_token_time_vs_first": round(size["arms"][arm]["seconds"] / size["response_tokens"] / base_time, 3),
            "peak_above_loaded_mib": round(size["arms"][arm]["peak_mib"] - loaded_mib, 1),
            "peak_above_loaded_vs_first": round((size["arms"][arm]["peak_mib"] - loaded_mib) / base_memory, 3)
            if base_memory > 0 else None,
        } for size in present]
    with_alone = [size for size in sizes if "axolotl" in size["arms"] and "axolotl_alone" in size["arms"]]
    if with_alone:  # XTF's share of `axolotl preprocess`: the arm with the block less the arm without it
        def share(size: dict[str, Any], key: str) -> float:
            return size["arms"]["axolotl"][key] - size["arms"]["axolotl_alone"][key]

        first = with_alone[0]
        out["axolotl_xtf_share"] = [{
            "examples": size["examples"],
            "seconds": round(share(size, "seconds"), 1),
            "per_token_time_vs_first": round(share(size, "seconds") / size["response_tokens"]
                                             / (share(first, "seconds") / first["response_tokens"]), 3),
            "peak_mib": round(share(size, "peak_mib"), 1),
            "peak_vs_first": round(share(size, "peak_mib") / share(first, "peak_mib"), 3)
            if share(first, "peak_mib") > 0 else None,
            "anon_mib": round(share(size, "anon_mib"), 1),
            "anon_vs_first": round(share(size, "anon_mib") / share(first, "anon_mib"), 3)
            if share(first, "anon_mib") > 0 else None,
        } for size in with_alone]
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = []
    for size in result["sizes"]:
        for arm, values in size["arms"].items():
            rows.append([size["examples"], size["response_tokens"], arm, values.get("seconds"), values.get("peak_mib", "")])
    lines = [markdown_table(["examples", "response tokens", "arm", "wall s", "peak MiB"], rows), ""]
    lines.append(f"loaded model alone: {result['loaded_peak_mib']} MiB peak")
    for arm, points in result["derived"].items():
        lines.append(f"{arm}: per-token time vs first " + ", ".join(f"{p['per_token_time_vs_first']}" for p in points)
                     + "; peak MiB (above the loaded model, or XTF's share) "
                     + ", ".join(f"{p.get('peak_above_loaded_mib', p.get('peak_mib'))}" for p in points))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(map(str, QUICK_SIZES))} examples")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--axolotl-max", type=int, default=160_000,
                        help="largest size with the axolotl preprocess arm (0: none)")
    parser.add_argument("--axolotl-only", action="store_true",
                        help="only the axolotl arms (default output results/scale_axolotl.json)")
    parser.add_argument("--out", default=None, help="results JSON (default results/scale.json; --quick: none)")
    args = parser.parse_args()
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    with_axolotl = args.axolotl_max > 0 and importlib.util.find_spec("axolotl") is not None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xtf-scale-") as tmp:
        work = Path(tmp)
        model = work / "model"
        build_model(model, build_tokenizer(model))
        loaded = measure_process([sys.executable, "-c", LOAD_ONLY, str(model)], environment(work / "cache"))
        results = []
        for n in sizes:
            results.append(run_size(work, model, n, with_axolotl and n <= args.axolotl_max, not args.axolotl_only))
            print(f"[{n} examples] " + ", ".join(f"{arm} {v.get('seconds')} s / {v.get('peak_mib', '-')} MiB"
                                                 for arm, v in results[-1]["arms"].items()), flush=True)
    result = {"machine": machine_info(), "settings": {"model": "tests' tiny Llama (2 layers, hidden 32, vocab 400)",
                                                      "sizes": sizes, "threads_per_process": 1,
                                                      "axolotl_max": args.axolotl_max if with_axolotl else 0,
                                                      "axolotl_only": args.axolotl_only},
              "loaded_peak_mib": loaded["peak_mib"], "sizes": results,
              "derived": derived(results, loaded["peak_mib"]),
              "wall_seconds": round(time.perf_counter() - started, 1)}
    print(markdown(result))
    default = RESULTS / ("scale_axolotl.json" if args.axolotl_only else "scale.json")
    out = Path(args.out) if args.out else (None if args.quick else default)
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
