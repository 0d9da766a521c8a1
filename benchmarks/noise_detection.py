"""Does XTF find injected noise? Token-level noise detection on GSM8K answers with the demo model.

Injects one of five kinds of noise into a seeded, known fraction of GSM8K answers (filler phrases at sentence
starts, an off-task sentence between reasoning lines, assistant boilerplate, random vocabulary strings, a
reasoning line said again right after itself as a looping response does),
records the injected character spans, scores everything with the real pipeline at default `XTFConfig` (what
`xtf score` does, cache off) and reports, per noise kind:

* AUROC of each attribute score (and of weighted mode's combined score) for noise vs clean tokens, where a
  LOW score is the noise signal for all three (RI: attention received; KN: 1 - p(token); TR: cosine to the
  domain vector) -- 0.5 = no separation, 1.0 = every noise token scores below every clean token;
* precision / recall / F1 of the dropped set, overall and per reason bit, for union mode at the defaults, the
  union tests before caps and ceiling, and weighted mode with `drop_ratio` = the noise-token fraction;
* how many tokens of GSM8K's own calculator annotations (`<<48/2=24>>`, in the clean answers) are dropped.

Token rule: a response token is noise when at least half of its characters were injected (the tokenizer's
offset mapping over the answer text). A BPE token that only borrows the space of an injected span
(" Natalia" after "basically, ") stays clean; " Well" whose space is original counts as noise. The same rule
decides which tokens belong to a calculator annotation (`<<`, `>>` and everything between).

    python benchmarks/noise_detection.py [--quick] [--data PATH] [--seed 0] [--noisy-fraction 0.5] [--out PATH]
    python benchmarks/noise_detection.py --kinds markup url garbled foreign pasted \
        --out benchmarks/results/noise_detection_unseen.json

`--kinds` picks other kinds, among them five written after every selection rule was chosen (scraped-page markup
inside sentences, a URL or forum-signature line, a garbled character string, a sentence in another language, a
reasoning line of another problem).

`--quick` uses the first 60 rows and writes nothing unless `--out` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import GAIN_EVERYWHERE

from xtf_plugin.config import REASON_BITS, XTFConfig
from xtf_plugin.data import read_records, tokenize_records
from xtf_plugin.demo import DEMO_DATA
from xtf_plugin.models import load_model, load_tokenizer
from xtf_plugin.pipeline import ScoredDataset, score_dataset
from xtf_plugin.selection import Selection, combined_scores, select_tokens
from xtf_plugin.spans import Spans, find_spans
from xtf_plugin.tokens import special_token_ids

RESULTS = Path(__file__).parent / "results" / "noise_detection.json"
QUICK_ROWS = 60
KINDS = ("filler", "off_task", "boilerplate", "random_tokens", "repetition")
"""The kinds of the default run, a fifth of the noisy answers each."""
UNSEEN_KINDS = ("markup", "url", "garbled", "foreign", "pasted")
"""Kinds written after the surprise rules were chosen (`--kinds`); the prompt-grounding rule was then designed
on them, so they are no longer a held-out test of it."""
FRESH_KINDS = ("advert", "code", "chat", "hashtags", "emoji")
"""Kinds written after the prompt-grounding rule was chosen and never used to choose any rule (`--kinds`)."""
ALL_KINDS = KINDS + UNSEEN_KINDS + FRESH_KINDS
HELD_OUT = ("filler", "boilerplate", *FRESH_KINDS)
"""Kinds kept aside while every rule of the spans selection was designed: their numbers are the test of rules
that were not tuned on them."""
CLEAN, NOT_RESPONSE = 0, -1
"""Token kind codes: 0 = clean, 1.. = index into ALL_KINDS plus one, -1 = not a trained token."""

FILLERS = [
    "Well, you know, basically,",
    "Um, so, like,",
    "Okay, so, honestly,",
    "I mean, to be fair,",
    "Alright, let me think, so",
    "Hmm, well, actually,",
]
OFF_TASK = [
    "By the way, the weather in Paris is lovely at this time of year.",
    "The local football team won their match last night in extra time.",
    "To make a good risotto, stir the rice slowly and add the broth a little at a time.",
    "It looks like it is going to rain all weekend, so bring an umbrella.",
    "My favourite tennis player finally won the tournament after five sets.",
    "Fresh basil and a drizzle of olive oil make any tomato sauce taste better.",
]
OPENERS = [
    "As an AI language model, I am happy to help.",
    "Sure! I would be glad to help you with this question.",
    "Great question! Let me walk you through it step by step.",
]
DISCLAIMER = "Please note that I am an AI and my answers may contain mistakes, so always double-check them."
MARKUP = ['<div class="note">', "</span>", "&nbsp;", "<br/>", "[edit]", "<p>", "</td><td>", "{{cite}}"]
URL_LINES = ["Source: https://www.example.org/threads/48213?page=2", "See http://mathhelp.example.com/q/1177 for more.",
             "Posted by user_8812 on 2019-03-14 at 10:42"]
FOREIGN = ["Je pense que le ciel est très bleu aujourd'hui.", "Ich habe heute leider keine Zeit für Sport.",
           "El perro de mi vecino duerme todo el día.", "Oggi il mercato è chiuso per la festa."]
GARBLE = "abcdefghijklmnopqrstuvwxyz0123456789#@!%&*"
ADVERTS = ["Get 20% off your first order at BestDeals with the code SAVE20!",
           "Subscribe to our newsletter for daily tips and exclusive offers.",
           "Download our free app today and never miss a deal again."]
CODE_LINES = ["for i in range(len(items)): total += items[i]", "import numpy as np; x = np.zeros(10)",
              "console.log(JSON.stringify(data));", "SELECT name, price FROM products WHERE id = 42;"]
CHAT_LINES = ["User: can you also write me a poem about cats?",
              "Thanks, that was helpful! Can you help me with my essay next?",
              "Assistant: Of course! Here is a short story about a dragon."]
HASHTAGS = ["#math #homework #studytips", "#blessed #mondaymotivation", "#learning #education #kids"]
EMOJI = ["\U0001f60a\U0001f44d", "\U0001f914", "\U0001f389\U0001f389", "\u2728\U0001f680"]
ANNOTATION = re.compile(r"<<[^<>]*>>")


@dataclass
class NoisyAnswer:
    """An answer after injection: its text, the injected character spans and the kind (None = clean)."""

    text: str
    spans: list[tuple[int, int]]
    kind: str | None


# ----------------------------------------------------------------------------------------------------
# injection


def insert_all(text: str, insertions: list[tuple[int, str]]) -> NoisyAnswer:
    """Insert strings at positions of the original text; spans are positions in the result."""
    out, spans, last = [], [], 0
    for position, piece in sorted(insertions):
        out.append(text[last:position])
        start = sum(len(p) for p in out)
        out.append(piece)
        spans.append((start, start + len(piece)))
        last = position
    out.append(text[last:])
    return NoisyAnswer("".join(out), spans, None)


def _body_end(answer: str) -> int:
    """Where the final `#### N` line starts (the answer's end if it has none): noise goes before it so the
    graded answer line stays the last line."""
    index = answer.rfind("\n####")
    return index + 1 if index >= 0 else len(answer)


def _sentence_starts(answer: str) -> list[int]:
    """Positions where a sentence of the reasoning starts: line starts and after '. ' within a line."""
    body = answer[: _body_end(answer)]
    starts = (
        [0] + [m.end() for m in re.finditer(r"\n(?=\S)", body)] + [m.end() for m in re.finditer(r"\. (?=[A-Z])", body)]
    )
    return sorted(p for p in set(starts) if p < len(body))


def word_vocabulary(tokenizer: Any) -> list[str]:
    """Vocabulary entries that are a leading space plus 3+ ASCII letters: random strings that still look
    like words, so the test is not only about odd byte pieces."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return sorted(
        {p[1:] for p in pieces if p and p.startswith("Ġ") and p[1:].isascii() and p[1:].isalpha() and len(p) >= 4}
    )


def reasoning_lines(answer: str) -> list[str]:
    """The answer's reasoning lines (before the `####` line) of 6 words or more, each with its newline."""
    return [m.group(0) for m in re.finditer(r"[^\n]+\n", answer[: _body_end(answer)]) if len(m.group(0).split()) >= 6]


def inject(answer: str, kind: str, rng: random.Random, vocabulary: list[str], pool: list[str]) -> NoisyAnswer:
    """One kind of noise in one answer; `pool` holds reasoning lines of the dataset's answers (for `pasted`)."""
    body_end = _body_end(answer)
    gaps = [m.end() for m in re.finditer("\n", answer[:body_end])] or [body_end]
    spaces = [m.start() for m in re.finditer(" ", answer[:body_end])] or [body_end]
    if kind == "filler":
        starts = _sentence_starts(answer)
        chosen = rng.sample(starts, min(2, len(starts)))
        result = insert_all(answer, [(p, rng.choice(FILLERS) + " ") for p in chosen])
    elif kind == "off_task":
        # between reasoning lines, or between the last one and the answer line
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(OFF_TASK) + "\n")])
    elif kind == "boilerplate":
        # the same opener / disclaimer recur across the dataset: boilerplate is repetition, not content
        result = insert_all(answer, [(0, rng.choice(OPENERS) + "\n"), (body_end, DISCLAIMER + "\n")])
    elif kind == "repetition":
        # a looping response: its longest reasoning line said again once or twice, right after itself
        lines = [m for m in re.finditer(r"[^\n]+\n", answer[:body_end])]
        if not lines:
            raise ValueError("an answer without a reasoning line cannot loop")
        line = max(lines, key=lambda m: len(m.group(0).split()))
        result = insert_all(answer, [(line.end(), line.group(0))] * rng.randint(1, 2))
    elif kind == "random_tokens":
        words = "".join(" " + rng.choice(vocabulary) for _ in range(rng.randint(4, 8)))
        result = insert_all(answer, [(rng.choice(spaces), words)])
    elif kind == "markup":
        # scraped-page residue inside the sentences
        result = insert_all(answer, [(p, " " + rng.choice(MARKUP)) for p in rng.sample(spaces, min(2, len(spaces)))])
    elif kind == "url":
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(URL_LINES) + "\n")])
    elif kind == "garbled":
        garbage = "".join(rng.choice(GARBLE) for _ in range(rng.randint(8, 14)))
        result = insert_all(answer, [(rng.choice(spaces), " " + garbage)])
    elif kind == "foreign":
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(FOREIGN) + "\n")])
    elif kind == "advert":
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(ADVERTS) + "\n")])
    elif kind == "code":
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(CODE_LINES) + "\n")])
    elif kind == "chat":
        # a turn of another conversation left in the answer
        result = insert_all(answer, [(rng.choice(gaps), rng.choice(CHAT_LINES) + "\n")])
    elif kind == "hashtags":
        # social-media tags at the end of a line
        ends = [m.start() for m in re.finditer("\n", answer[:body_end])] or [body_end]
        result = insert_all(answer, [(rng.choice(ends), " " + rng.choice(HASHTAGS))])
    elif kind == "emoji":
        result = insert_all(answer, [(p, " " + rng.choice(EMOJI)) for p in rng.sample(spaces, min(2, len(spaces)))])
    elif kind == "pasted":
        # a reasoning line of another problem: on-topic, fluent, and wrong here
        own = set(reasoning_lines(answer))
        result = insert_all(answer, [(rng.choice(gaps), rng.choice([line for line in pool if line not in own]))])
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    result.kind = kind
    return result


def inject_dataset(records: list[dict[str, Any]], fraction: float, seed: int, tokenizer: Any,
                   kinds: Sequence[str] = KINDS) -> list[NoisyAnswer]:
    """Noise in `round(fraction * n)` seeded-random answers, the kinds dealt out in turn so each gets an equal
    share; the other answers stay as they are."""
    rng = random.Random(seed)
    noisy = rng.sample(range(len(records)), round(fraction * len(records)))
    kind_of = {index: kinds[k % len(kinds)] for k, index in enumerate(noisy)}
    vocabulary = word_vocabulary(tokenizer)
    pool = [line for record in records for line in reasoning_lines(str(record["answer"]))]
    answers = []
    for index, record in enumerate(records):
        answer = str(record["answer"])
        kind = kind_of.get(index)
        answers.append(inject(answer, kind, rng, vocabulary, pool) if kind else NoisyAnswer(answer, [], None))
    return answers


# ----------------------------------------------------------------------------------------------------
# character spans -> tokens


def majority_inside(offsets: list[tuple[int, int]], inside: np.ndarray) -> np.ndarray:
    """bool per token: at least half of the token's characters are marked in `inside` (chars past the end
    of `inside`, e.g. the end-of-turn token's, are unmarked)."""
    marked = np.concatenate([[0], np.cumsum(np.concatenate([inside, np.zeros(64, bool)]))])
    result = np.zeros(len(offsets), bool)
    for t, (start, end) in enumerate(offsets):
        if end > start:
            end = min(end, len(marked) - 1)
            result[t] = 2 * (marked[end] - marked[start]) >= end - start
    return result


def char_mask(length: int, spans: list[tuple[int, int]]) -> np.ndarray:
    """bool `[length]`: characters inside any span."""
    mask = np.zeros(length, bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def token_labels(
    scored: ScoredDataset, answers: list[NoisyAnswer], tokenizer: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat `[n_tokens]` arrays: kind code, calculator-annotation flag, and whether the example is noisy.

    The trained tokens of an `alpaca` example are exactly the answer followed by the end-of-turn token (the
    chat template adds nothing inside the turn), so re-tokenising that text gives each token's offsets;
    the ids are checked against the scored ones.
    """
    kinds = np.full(len(scored.input_ids), NOT_RESPONSE, np.int64)
    annotation = np.zeros(len(scored.input_ids), bool)
    noisy = np.zeros(len(scored.input_ids), bool)
    for index, (part, answer) in enumerate(zip(scored.scores.example_slices(), answers, strict=True)):
        response = scored.response[part]
        trained = scored.input_ids[part][response]
        encoded = tokenizer(answer.text + tokenizer.eos_token, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != trained.tolist():
            raise RuntimeError(f"example {index}: the trained tokens are not the answer + end-of-turn token")
        offsets = [tuple(o) for o in encoded["offset_mapping"]]
        is_noise = majority_inside(offsets, char_mask(len(answer.text), answer.spans))
        spans = [m.span() for m in ANNOTATION.finditer(answer.text)]
        code = ALL_KINDS.index(answer.kind) + 1 if answer.kind else CLEAN
        positions = np.flatnonzero(response) + part.start
        kinds[positions] = np.where(is_noise, code, CLEAN)
        annotation[positions] = majority_inside(offsets, char_mask(len(answer.text), spans)) & ~is_noise
        noisy[part] = answer.kind is not None
    return kinds, annotation, noisy


# ----------------------------------------------------------------------------------------------------
# metrics


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    boundaries = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate([[0], boundaries])
    stops = np.concatenate([boundaries, [len(values)]])
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat((starts + stops + 1) / 2.0, stops - starts)
    return ranks


def auroc_low_is_positive(scores: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float | None:
    """P(positive's score < negative's score), ties half (Mann-Whitney U); NaN scores are left out."""
    finite = np.isfinite(scores)
    pos, neg = scores[positive & finite], scores[negative & finite]
    if pos.size == 0 or neg.size == 0:
        return None
    # ranking the negated scores makes "lower" the high-rank side
    ranks = average_ranks(-np.concatenate([pos, neg]).astype(np.float64))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return round(float(u / (pos.size * neg.size)), 4)


def precision_recall(dropped: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> dict[str, Any]:
    """Precision / recall / F1 of `dropped` for positive vs negative tokens (others ignored)."""
    tp = int((dropped & positive).sum())
    fp = int((dropped & negative).sum())
    n_pos = int(positive.sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_pos if n_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "dropped": tp + fp}


def groups(kinds: np.ndarray) -> dict[str, np.ndarray]:
    """Positive token set per noise kind present, plus all noise together."""
    result = {kind: kinds == k + 1 for k, kind in enumerate(ALL_KINDS) if (kinds == k + 1).any()}
    result["all noise"] = kinds > CLEAN
    return result


def evaluate_drops(drop: np.ndarray, kinds: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per noise kind (vs every clean response token): P/R/F1 of any drop and of each reason bit."""
    clean = kinds == CLEAN
    reasons = {"any": drop > 0} | {name: (drop & bit) > 0 for name, bit in REASON_BITS.items()}
    return {
        group: {reason: precision_recall(mask, positive, clean) for reason, mask in reasons.items()}
        for group, positive in groups(kinds).items()
    }


def annotation_drops(drop: np.ndarray, kinds: np.ndarray, annotation: np.ndarray, noisy: np.ndarray) -> dict[str, Any]:
    """Dropped fraction of calculator-annotation tokens in the clean answers, next to all their tokens'."""
    in_clean = (kinds == CLEAN) & ~noisy
    reasons = {"any": drop > 0} | {name: (drop & bit) > 0 for name, bit in REASON_BITS.items()}

    def fraction(where: np.ndarray) -> dict[str, float]:
        return {reason: round(float(mask[where].mean()), 4) if where.any() else 0.0 for reason, mask in reasons.items()}

    return {
        "annotation_tokens": int((annotation & in_clean).sum()),
        "clean_answer_tokens": int(in_clean.sum()),
        "annotation_dropped_fraction": fraction(annotation & in_clean),
        "all_tokens_dropped_fraction": fraction(in_clean),
        "annotation_share_of_drops": round(
            float((annotation & in_clean & (drop > 0)).sum() / max(1, (in_clean & (drop > 0)).sum())), 4
        ),
    }


# ----------------------------------------------------------------------------------------------------
# run


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process: on a shared machine the wall time says more about the
    neighbours than about the benchmark."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 1)


def spans_selection(gained: ScoredDataset, spans: Spans, config: XTFConfig | None = None) -> Selection:
    """The spans preset's selection (or `config`'s) from `gained`'s scores, which hold the prompt gain of every token."""
    return select_tokens(gained.scores, gained.response, gained.protected, config or XTFConfig(), spans)


def selections(scored: ScoredDataset, gained: ScoredDataset, spans: Spans, noise_fraction: float,
               fence_ks: Sequence[float] = ()) -> dict[str, np.ndarray]:
    """Reason bits per token of each selection compared: `scored` has the paper preset's scores (vector TR),
    `gained` the same RI and KN with TR = the prompt gain of every token (`GAIN_EVERYWHERE`); every selection
    reads one of them, none rescoring. The spans preset also at each other `span_fence_k` of `fence_ks`, and
    without the prompt gain (what it selects from the paper preset's scores)."""
    drop_ratio = round(noise_fraction, 4)
    result = {
        "preset spans": spans_selection(gained, spans).reasons,
        "preset spans without the prompt gain (tr_method vector)": select_tokens(
            scored.scores, scored.response, scored.protected, XTFConfig(tr_method="vector"), spans).reasons,
        "preset paper (union)": scored.selection.reasons,
        "union tests before caps and ceiling": scored.selection.flagged,
    }
    for k in fence_ks:
        result[f"preset spans, span_fence_k={k:g}"] = spans_selection(gained, spans, XTFConfig(span_fence_k=k)).reasons
    for scope in ("example", "dataset"):
        config = XTFConfig(mode="weighted", drop_ratio=drop_ratio, scope=scope)
        name = f"weighted, {scope} scope, drop_ratio={drop_ratio}"
        result[name] = select_tokens(scored.scores, scored.response, scored.protected, config).reasons
    return result


def auroc_table(scored: ScoredDataset, gained: ScoredDataset, kinds: np.ndarray) -> dict[str, dict[str, float | None]]:
    """AUROC per noise kind of each attribute score, of the prompt gain and of weighted mode's combined score."""
    response = scored.response
    attributes = {"RI": scored.scores.ri, "KN": scored.scores.kn, "TR": scored.scores.tr, "gain": gained.scores.tr}
    for scope in ("example", "dataset"):
        combined, _ = combined_scores(scored.scores, response, XTFConfig(mode="weighted", scope=scope))
        attributes[f"combined ({scope})"] = combined
    clean = (kinds == CLEAN) & response
    return {
        group: {
            name: auroc_low_is_positive(np.where(response, values, np.nan), positive, clean)
            for name, values in attributes.items()
        }
        for group, positive in groups(kinds).items()
    }


def markdown(results: dict[str, Any]) -> str:
    """The result tables as markdown."""
    # a kind that left no noise token (a tiny --quick set) has no row
    rows = [*(kind for kind in results["settings"]["kinds"] if kind in results["auroc"]), "all noise"]
    counts = results["counts"]
    lines = [
        "| noise kind | noisy answers | noise tokens | base rate | AUROC RI | AUROC KN | AUROC TR | AUROC prompt gain | AUROC combined (example) | AUROC combined (dataset) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in rows:
        a = results["auroc"][group]
        cells = [
            f"{a[k]:.3f}" if a[k] is not None else "-"
            for k in ("RI", "KN", "TR", "gain", "combined (example)", "combined (dataset)")
        ]
        lines.append(
            f"| {group} | {counts['noisy_answers'][group]} | {counts['noise_tokens'][group]:,} | {counts['base_rate'][group]:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    for name, per_group in results["selections"].items():
        lines += [
            "",
            f"**{name}** (drops {results['drop_fraction'][name]:.1%} of response tokens): precision / recall / F1",
            "",
        ]
        lines += ["| noise kind | any reason | RI bit | KN bit | TR bit |", "|---|---|---|---|---|"]
        for group in rows:
            cells = [
                "{precision:.2f} / {recall:.2f} / {f1:.2f}".format(**per_group[group][r])
                for r in ("any", "reasoning", "novelty", "relevance")
            ]
            label = f"{group} (held out)" if group in HELD_OUT else group
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| selection | annotation tokens dropped (any / RI / KN / TR) | all clean-answer tokens dropped (any / RI / KN / TR) | annotation share of drops |",
        "|---|---|---|---:|",
    ]
    for name, a in results["calculator_annotations"].items():
        ann, every = a["annotation_dropped_fraction"], a["all_tokens_dropped_fraction"]
        fmt = " / ".join
        lines.append(
            f"| {name} | {fmt(f'{ann[r]:.1%}' for r in ann)} | {fmt(f'{every[r]:.1%}' for r in every)} | {a['annotation_share_of_drops']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_ROWS} rows; no file unless --out")
    parser.add_argument("--data", default=str(DEMO_DATA), help="GSM8K-style JSONL (question, answer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noisy-fraction", type=float, default=0.5, help="share of answers that get noise")
    parser.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=list(KINDS),
                        help=f"noise kinds, dealt out in turn (the {len(UNSEEN_KINDS)} unseen ones: {' '.join(UNSEEN_KINDS)})")
    parser.add_argument("--span-fence-k", type=float, nargs="+", default=[], metavar="K",
                        help="also select with the spans preset at these span_fence_k (the default is "
                        f"{XTFConfig().span_fence_k:g})")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/noise_detection.json)")
    args = parser.parse_args()
    if not 0 < args.noisy_fraction <= 1:
        parser.error("--noisy-fraction must be in (0, 1]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    machine = machine_info()

    records = read_records(args.data)
    if args.quick:
        records = records[:QUICK_ROWS]
    tokenizer = load_tokenizer("demo")
    answers = inject_dataset(records, args.noisy_fraction, args.seed, tokenizer, args.kinds)
    noisy_records = [{"question": r["question"], "answer": a.text} for r, a in zip(records, answers, strict=True)]
    config = XTFConfig(preset="paper")
    data = tokenize_records(noisy_records, tokenizer, "auto", config.max_length, source=args.data)
    model = load_model("demo")
    scored = score_dataset(model, tokenizer, data, config, progress=sys.stderr.isatty(), use_cache=False)
    gained = score_dataset(model, tokenizer, data, XTFConfig(**GAIN_EVERYWHERE), progress=sys.stderr.isatty(),
                           use_cache=False)
    kinds, annotation, noisy = token_labels(scored, answers, tokenizer)

    response_tokens = int(scored.response.sum())
    noise_fraction = float((kinds > CLEAN).sum() / response_tokens)
    spans = find_spans(scored.input_ids, scored.offsets, scored.response, scored.texts, special_token_ids(tokenizer))
    chosen = selections(scored, gained, spans, noise_fraction, args.span_fence_k)
    clean_count = int((kinds == CLEAN).sum())
    results: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "model": "demo (SmolLM2-135M-Instruct)",
            "data": args.data if args.data != str(DEMO_DATA) else "xtf_plugin/sample_data/gsm8k_sample.jsonl",
            "rows": len(records),
            "quick": args.quick,
            "seed": args.seed,
            "noisy_fraction": args.noisy_fraction,
            "xtf_config": "preset paper and preset spans (tr_method prompt_gain) each scored once, cache off; the other "
                          "selections read one of the two",
            "kinds": list(args.kinds),
            "held_out_kinds": [kind for kind in args.kinds if kind in HELD_OUT],
            "token_rule": "noise if >= half of the token's characters were injected",
        },
        "counts": {
            "response_tokens": response_tokens,
            "clean_tokens": clean_count,
            "noise_fraction": round(noise_fraction, 4),
            "noisy_answers": {g: sum(a.kind == g for a in answers) for g in args.kinds}
            | {"all noise": sum(a.kind is not None for a in answers)},
            "noise_tokens": {g: int(m.sum()) for g, m in groups(kinds).items()},
            "base_rate": {g: round(int(m.sum()) / (int(m.sum()) + clean_count), 4) for g, m in groups(kinds).items()},
        },
        "auroc": auroc_table(scored, gained, kinds),
        "drop_fraction": {name: round(float((d[scored.response] > 0).mean()), 4) for name, d in chosen.items()},
        "selections": {name: evaluate_drops(d, kinds) for name, d in chosen.items()},
        "calculator_annotations": {name: annotation_drops(d, kinds, annotation, noisy) for name, d in chosen.items()},
        "domain_words": scored.domain_words,
        "thresholds": scored.selection.thresholds,
        "spans_thresholds": spans_selection(gained, spans).thresholds,
        "runtime": {
            **scored.stats,
            "gain_everywhere_scoring_seconds": gained.stats["scoring_seconds"],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": cpu_seconds(),
        },
    }
    print(markdown(results))
    print(f"\nTR domain words: {', '.join(scored.domain_words)}")
    print(
        f"runtime: {results['runtime']['wall_seconds']} s wall, {results['runtime']['cpu_seconds']} s CPU (scoring {scored.stats['scoring_seconds']} s)"
    )
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
