"""Clean data in two styles: does the default selection leave a minority style alone?

Real SFT sets mix styles: math answers next to API documentation, chat next to code. A selection that judges
spans only against the whole dataset's surprise sees the more surprising style as off-task. This benchmark mixes
the 200 bundled GSM8K answers (`xtf_plugin/sample_data/gsm8k_sample.jsonl`) with 0 to 200 clean examples of a
second, more surprising style, generated here from the installed Python's standard library: the question
`Explain what \\`json.dumps\\` does in Python.` and, as the response, the first paragraphs of that object's
docstring (120 to 700 characters, at least two sentences). Nothing in either set is noise, so every masked token
is a loss. The set is scored once by the demo model (`preset: spans`; the score cache in a temporary folder, or
`--score-cache DIR`) and each mixture selects from the same scores.

    python benchmarks/mixed_styles.py            # writes benchmarks/results/mixed_styles.json
    python benchmarks/mixed_styles.py --quick    # 60 GSM8K answers, up to 60 docstrings; prints only
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import GAIN_EVERYWHERE, RESULTS, ROOT, machine_info, markdown_table, write_json

from xtf_plugin.config import XTFConfig
from xtf_plugin.data import read_records, tokenize_records
from xtf_plugin.pipeline import ScoredDataset, score_dataset
from xtf_plugin.selection import select_tokens
from xtf_plugin.spans import find_spans
from xtf_plugin.token_scores import TokenScores
from xtf_plugin.tokens import TokenTexts, special_token_ids

MODULES = (
    "json", "os", "re", "collections", "itertools", "functools", "pathlib", "string", "textwrap", "random",
    "math", "statistics", "shutil", "subprocess", "tempfile", "csv", "argparse", "logging", "datetime",
    "decimal", "fractions", "heapq", "bisect", "difflib", "hashlib", "base64", "zipfile", "tarfile", "gzip",
    "pickle", "copy", "pprint", "enum", "typing", "dataclasses", "contextlib", "threading", "queue", "socket",
    "urllib.parse", "html", "email.utils", "inspect", "ast", "dis", "tokenize", "unittest", "doctest",
    "sqlite3", "calendar", "time", "locale", "gettext", "codecs", "io", "struct", "array", "weakref", "abc",
    "numbers", "operator", "glob", "fnmatch",
)
GSM8K = ROOT / "xtf_plugin" / "sample_data" / "gsm8k_sample.jsonl"
DOC_COUNTS = (0, 25, 50, 100, 200)


def docstring_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` question/answer rows from the standard library's docstrings (first two paragraphs, doctest and
    signature lines left out), shuffled with `seed`."""
    rows, seen = [], set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            paragraphs = [p for p in doc.split("\n\n")[:2]
                          if not p.lstrip().startswith((">>>", "Usage", "..", "|")) and "(" not in p.split("\n")[0][: len(name) + 1]]
            text = " ".join(" ".join(paragraphs).split())
            if not 120 <= len(text) <= 700 or text.count(".") < 2 or text in seen:
                continue
            seen.add(text)
            rows.append({"question": f"Explain what `{module_name}.{name}` does in Python.", "answer": text})
    random.Random(seed).shuffle(rows)
    if len(rows) < n:
        raise SystemExit(f"mixed_styles: only {len(rows)} docstrings found, {n} needed")
    return rows[:n]


def subset(scored: ScoredDataset, examples: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, TokenScores]:
    """Flat ids, labels, offsets and scores of the chosen examples, in order."""
    parts = [scored.example_slice(i) for i in examples]
    lengths = [p.stop - p.start for p in parts]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def cut(flat: np.ndarray) -> np.ndarray:
        return np.concatenate([flat[p] for p in parts])

    scores = TokenScores(offsets, cut(scored.scores.ri), cut(scored.scores.kn), cut(scored.scores.tr))
    return cut(scored.input_ids), cut(scored.labels), offsets, scores


def mixture(scored: ScoredDataset, texts: TokenTexts, specials: set[int], n_math: int, n_docs: int,
            config: XTFConfig) -> dict[str, Any]:
    """Select on the first `n_math` GSM8K answers plus the first `n_docs` docstrings: what is masked per style."""
    examples = list(range(n_math)) + list(range(n_math, n_math + n_docs))
    ids, labels, offsets, scores = subset(scored, examples)
    response = labels != -100
    protected = np.concatenate([scored.protected[scored.example_slice(i)] for i in examples])
    spans = find_spans(ids, offsets, response, texts, specials)
    selection = select_tokens(scores, response, protected, config, spans)
    docs = np.repeat(np.arange(len(examples)) >= n_math, np.diff(offsets))
    masked = (selection.reasons > 0) & response

    def share(where: np.ndarray) -> float | None:
        return round(float(masked[where].sum() / response[where].sum()), 4) if response[where].any() else None

    touched = [bool(masked[offsets[e]:offsets[e + 1]].any()) for e in range(n_math, len(examples))]
    return {"math_examples": n_math, "doc_examples": n_docs,
            "doc_span_share": round(float((spans.example >= n_math).mean()), 4),
            "masked_math": share(~docs & response), "masked_docs": share(docs & response),
            "doc_examples_touched": int(sum(touched)),
            "fence": selection.thresholds["span_surprise_fence"], "spared_spans": selection.thresholds["spared_spans"],
            "off_task_spans": selection.thresholds["off_task_spans"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 GSM8K answers, up to 60 docstrings; no file")
    parser.add_argument("--out", default=None, help="results JSON (default results/mixed_styles.json)")
    parser.add_argument("--score-cache", default=None, help="score cache folder (default: a temporary one)")
    parser.add_argument("--span-fence-k", type=float, default=XTFConfig().span_fence_k,
                        help="the spans preset's span_fence_k (default: the package's)")
    args = parser.parse_args()
    started = time.perf_counter()
    from xtf_plugin.models import load_model, load_tokenizer

    n_math = 60 if args.quick else 200
    counts = [c for c in DOC_COUNTS if c <= (60 if args.quick else 200)]
    math_rows = [{"question": r["question"], "answer": r["answer"]} for r in read_records(str(GSM8K))[:n_math]]
    rows = math_rows + docstring_rows(max(counts))
    tokenizer = load_tokenizer("demo")
    with tempfile.TemporaryDirectory(prefix="xtf-mixed-") as temporary:
        config = XTFConfig(preset="spans", span_fence_k=args.span_fence_k)
        data = tokenize_records(rows, tokenizer, "auto", config.max_length, source="mixed_styles")
        # each mixture selects on a part of the data, so every token's prompt gain is scored
        scoring = XTFConfig(**GAIN_EVERYWHERE, cache_dir=args.score_cache or temporary)
        scored = score_dataset(load_model("demo"), tokenizer, data, scoring, progress=sys.stderr.isatty())
    texts, specials = TokenTexts(tokenizer), special_token_ids(tokenizer)
    mixtures = [mixture(scored, texts, specials, n_math, n, config) for n in counts]
    table = markdown_table(
        ["docstring examples", "their share of spans", "span fence", "masked: GSM8K tokens", "masked: docstring tokens",
         "docstring examples touched", "spans above the fence spared"],
        [[m["doc_examples"], f"{m['doc_span_share']:.0%}", m["fence"], f"{m['masked_math']:.1%}",
          "-" if m["masked_docs"] is None else f"{m['masked_docs']:.1%}", m["doc_examples_touched"], m["spared_spans"]]
         for m in mixtures])
    print(table)
    result = {"machine": machine_info(),
              "settings": {"model": "demo (SmolLM2-135M-Instruct)", "preset": "spans",
                           "span_fence_k": args.span_fence_k, "math_examples": n_math,
                           "doc_counts": counts, "python": sys.version.split()[0]},
              "mixtures": mixtures, "wall_seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out) if args.out else (None if args.quick else RESULTS / "mixed_styles.json")
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
    print(json.dumps({"wall_seconds": result["wall_seconds"]}))


if __name__ == "__main__":
    main()
