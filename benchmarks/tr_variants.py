"""Which task-relevance variant separates off-task tokens best?

Injects one off-task sentence into a known share of GSM8K answers, scores them with the demo model under each
TR variant and reports the AUROC of "TR is lower on injected tokens than on the original response tokens"
(0.5 = no separation, 1.0 = perfect), plus the spread of the cosines. Writes benchmarks/results/tr_variants.json.

    python benchmarks/tr_variants.py [--examples 60] [--model demo]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from xtf_plugin.config import XTFConfig
from xtf_plugin.data import read_records, tokenize_records
from xtf_plugin.demo import DEMO_DATA
from xtf_plugin.models import load_model, load_tokenizer
from xtf_plugin.pipeline import score_dataset

OFF_TASK = [
    "By the way, the weather in Paris is lovely at this time of year.",
    "My favourite band released a new album last week and it sounds great.",
    "Remember to water the plants on the balcony before you leave.",
    "The museum downtown has a new exhibition about ancient Egyptian pottery.",
    "Cats usually sleep for most of the day and hunt at night.",
    "I think the new phone has a really beautiful camera and screen.",
]

VARIANTS = {
    "hidden, centred (default)": {"tr_space": "hidden", "tr_center": True},
    "hidden, uncentred (official code)": {"tr_space": "hidden", "tr_center": False},
    "embedding, centred": {"tr_space": "embedding", "tr_center": True},
    "embedding, uncentred": {"tr_space": "embedding", "tr_center": False},
    "hidden, centred, paper words": {
        "tr_space": "hidden",
        "tr_center": True,
        "tr_domain_words": ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "+", "-", "*", "/", "=", "maths"],
    },
    "prompt gain": {"tr_method": "prompt_gain"},
}


def inject_noise(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[tuple[int, int] | None]]:
    """Insert one off-task sentence after a line of `share` of the answers; return the character span."""
    rng = random.Random(seed)
    noisy, spans = [], []
    for record in records:
        answer = record["answer"]
        if rng.random() >= share:
            noisy.append(record)
            spans.append(None)
            continue
        lines = answer.split("\n")
        cut = rng.randrange(0, max(1, len(lines) - 1))
        sentence = rng.choice(OFF_TASK)
        prefix = "\n".join(lines[: cut + 1]) + "\n"
        noisy.append({**record, "answer": prefix + sentence + "\n" + "\n".join(lines[cut + 1 :])})
        spans.append((len(prefix), len(prefix) + len(sentence)))
    return noisy, spans


def noise_token_mask(scored, records, spans) -> np.ndarray:
    """bool `[n_tokens]`: response tokens inside an injected sentence (located in the decoded response)."""
    mask = np.zeros(len(scored.input_ids), bool)
    for index, (part, span, record) in enumerate(zip(scored.scores.example_slices(), spans, records, strict=True)):
        if span is None:
            continue
        sentence = record["answer"][span[0] : span[1]]
        ids = scored.input_ids[part]
        pieces = scored.texts.of(ids.tolist())
        text = "".join(pieces)
        start = text.find(sentence)
        assert start >= 0, f"example {index}: injected sentence not found"
        ends = np.cumsum([len(p) for p in pieces])
        starts = ends - np.array([len(p) for p in pieces])
        mask[part] = (starts < start + len(sentence)) & (ends > start) & scored.response[part]
    return mask


def auroc_lower_is_positive(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive < score of a negative), ties counted half (Mann-Whitney)."""
    finite = np.isfinite(scores)
    pos, neg = scores[positive & finite], scores[~positive & finite]
    ranks = np.empty(len(pos) + len(neg))
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="stable")
    sorted_values = both[order]
    i = 0
    while i < len(both):
        j = i
        while j + 1 < len(both) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[: len(pos)].sum()
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return float(1 - u / (len(pos) * len(neg)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tr_variants.json"))
    args = parser.parse_args()

    records, spans = inject_noise(read_records(str(DEMO_DATA))[: args.examples], args.share, seed=0)
    tokenizer = load_tokenizer(args.model)
    data = tokenize_records(records, tokenizer, "alpaca")
    model = load_model(args.model)
    results = {}
    for name, settings in VARIANTS.items():
        started = time.perf_counter()
        scored = score_dataset(model, tokenizer, data, XTFConfig(**{"tr_method": "vector", **settings}), progress=False)
        noise = noise_token_mask(scored, records, spans)
        response = scored.response & np.isfinite(scored.scores.kn)
        tr = np.where(response, scored.scores.tr, np.nan)
        clean = tr[response & ~noise]
        results[name] = {
            "auroc_tr": round(auroc_lower_is_positive(tr, noise), 4),
            "tr_clean_p5_p50_p95": [round(float(q), 4) for q in np.nanquantile(clean, [0.05, 0.5, 0.95])],
            "tr_noise_median": round(float(np.nanmedian(tr[noise])), 4),
            "dropped_noise_tokens_tr": int(((scored.selection.reasons & 4) > 0)[noise].sum()),
            "dropped_clean_tokens_tr": int(((scored.selection.reasons & 4) > 0)[response & ~noise].sum()),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{name:36s} {results[name]}", flush=True)
    summary = {
        "model": args.model,
        "examples": args.examples,
        "noisy_share": args.share,
        "noise_tokens": int(noise.sum()),
        "response_tokens": int(response.sum()),
        "variants": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
