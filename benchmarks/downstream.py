"""Does XTF's token filtering pay off downstream? LoRA fine-tuning of the demo model on noisy arithmetic.

Two-step add/subtract word problems are generated with known answers; the model (SmolLM2-135M-Instruct) is
fine-tuned with LoRA on four versions of the same training set and scored by exact match of its greedy final
answer on a clean held-out set:

* (a) clean: the original responses;
* (b) noisy: a calibrated share of the responses gets off-task text inserted between the reasoning steps;
* (c) noisy + XTF: the noisy set, with the tokens that XTF (default settings, the package's `score_dataset`)
  drops set to label -100;
* (d) noisy + random: the noisy set with, in every example, as many random response tokens dropped as XTF
  dropped there (never a token XTF protects, nor the final EOS): the control that tells filtering from merely
  training on fewer tokens.

Writes benchmarks/results/downstream.json and prints a markdown table.

    python benchmarks/downstream.py                     # the full run: 4 arms x 2 seeds + the base model
    python benchmarks/downstream.py --calibrate         # (a) vs (b) at one seed for every noise recipe
    python benchmarks/downstream.py --quick             # smoke test, tiny settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from xtf_plugin.cli import build_config
from xtf_plugin.config import XTFConfig
from xtf_plugin.data import TokenizedData
from xtf_plugin.demo import resolve_model_path
from xtf_plugin.pipeline import ScoredDataset, score_dataset

RESULTS = Path(__file__).parent / "results" / "downstream.json"

NAMES = [
    "Tom", "Ana", "Ravi", "Mia", "Leo", "Sara", "Ken", "Nora", "Omar", "Lily", "Ben", "Zoe", "Ivan", "Emma",
    "Yuki", "Carl", "Dina", "Paul", "Rosa", "Sam",
]
OBJECTS = [
    "apples", "stickers", "marbles", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies",
    "balloons", "candies", "toys", "eggs", "flowers",
]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more", "receives {n} more", "wins {n} more"]
LOSS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}", "eats {n}"]


@dataclass(frozen=True)
class Problem:
    """A two-step problem: start with `start`, then apply `deltas` (signed) in order."""

    name: str
    obj: str
    start: int
    deltas: tuple[int, int]
    verbs: tuple[int, int]

    @property
    def answer(self) -> int:
        return self.start + sum(self.deltas)

    @property
    def key(self) -> tuple[int, int, int]:
        """What makes two problems the same arithmetic (names and objects aside)."""
        return (self.start, *self.deltas)

    def prompt(self) -> str:
        actions = []
        for delta, verb in zip(self.deltas, self.verbs, strict=True):
            templates = GAIN if delta > 0 else LOSS
            actions.append(templates[verb].format(n=abs(delta)))
        return (
            f"Question: {self.name} has {self.start} {self.obj}. {self.name} {actions[0]}, then {actions[1]}. "
            f"How many {self.obj} does {self.name} have now?\nAnswer:\n"
        )

    def steps(self) -> list[str]:
        lines, total = [], self.start
        for delta in self.deltas:
            new = total + delta
            lines.append(f"{total} {'+' if delta > 0 else '-'} {abs(delta)} = {new}.")
            total = new
        return lines

    def completion(self) -> str:
        return "\n".join([*self.steps(), f"The answer is {self.answer}."])


def random_problem(rng: random.Random) -> Problem:
    """One problem whose intermediate and final counts stay between 1 and 150."""
    while True:
        start = rng.randint(10, 80)
        deltas = tuple(rng.choice((1, -1)) * rng.randint(2, 40) for _ in range(2))
        partial = start + deltas[0]
        if 1 <= partial <= 150 and 1 <= partial + deltas[1] <= 150:
            return Problem(
                rng.choice(NAMES), rng.choice(OBJECTS), start, deltas,  # type: ignore[arg-type]
                (rng.randrange(len(GAIN)), rng.randrange(len(LOSS))),
            )


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems; no arithmetic (start, deltas) is shared between or within them. The held-out
    problems are drawn first, so they do not depend on `n_train`."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    problems: list[Problem] = []
    while len(problems) < n_eval + n_train:
        problem = random_problem(rng)
        if problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    return problems[n_eval:], problems[:n_eval]


# ---------------------------------------------------------------------------------------------------------
# noise


@dataclass(frozen=True)
class Recipe:
    """How noise is injected.

    Attributes:
        kind: `salad` (random English words from the tokenizer's vocabulary) or `chatter` (off-task sentences
            assembled from templates, with a distractor number).
        share: fraction of the training responses that get noise.
        slots: where insertions go: 0 = before the first step, 1 = between the steps, 2 = before the answer
            line; one insertion per listed slot.
        length: words per `salad` insertion (min, max).
        number: `salad` only: put a random number in the middle of each insertion (a distractor for the
            step that has to copy the previous result).
    """

    kind: str
    share: float
    slots: tuple[int, ...]
    length: tuple[int, int] = (4, 7)
    number: bool = False


RECIPES: dict[str, Recipe] = {
    "salad-between": Recipe("salad", 0.9, (1,), (4, 7), number=True),
    "chatter-two": Recipe("chatter", 0.9, (1, 2)),
    "salad-two": Recipe("salad", 1.0, (1, 2), (4, 6), number=True),
}
DEFAULT_RECIPE = "salad-two"

_SUBJECTS = ["My aunt", "Our neighbour", "The old captain", "A friend of mine", "My cousin", "The mayor",
             "Grandpa", "The baker", "My teacher", "A pirate", "The janitor", "Our coach"]
_VERBS = ["painted", "collects", "once counted", "photographed", "dreams about", "forgot", "sold", "hides"]
_THINGS = ["parrots", "violins", "kites", "lanterns", "umbrellas", "volcanoes", "trumpets", "castles",
           "robots", "spaceships", "tulips", "carpets"]
_PLACES = ["in Lisbon", "on Mars", "near the harbour", "in the attic", "last winter", "at the opera",
           "under the bridge", "in a dream"]


def salad_words(tokenizer: Any) -> list[str]:
    """Plain lowercase words that the tokenizer has as single tokens (thousands, so none becomes a frequent
    word of the responses, which would pull it into TR's automatic domain vector)."""
    words = [w[1:] for w in tokenizer.get_vocab() if re.fullmatch(r"Ġ[a-z]{4,9}", w)]
    return sorted(words)


def noise_text(recipe: Recipe, rng: random.Random, words: Sequence[str]) -> str:
    """One insertion, a full line."""
    if recipe.kind == "chatter":
        return (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.randint(2, 99)} {rng.choice(_THINGS)} "
                f"{rng.choice(_PLACES)}.")
    picked = [rng.choice(words) for _ in range(rng.randint(*recipe.length))]
    if recipe.number:
        picked.insert(len(picked) // 2, str(rng.randint(2, 99)))
    return " ".join(picked).capitalize() + "."


@dataclass
class Example:
    """A training example: prompt, completion, and the character spans of injected noise in the
    completion."""

    prompt: str
    completion: str
    noise: list[tuple[int, int]]


def inject(problems: Sequence[Problem], recipe: Recipe | None, seed: int, words: Sequence[str]) -> list[Example]:
    """Examples for the problems; with a recipe, noise lines go into a `share` of them."""
    rng = random.Random(seed)
    examples = []
    for problem in problems:
        lines = [*problem.steps(), f"The answer is {problem.answer}."]
        noisy = recipe is not None and rng.random() < recipe.share
        inserts = {slot: noise_text(recipe, rng, words) for slot in recipe.slots} if noisy and recipe else {}
        text, spans = "", []
        for index, line in enumerate(lines):
            if index in inserts:
                spans.append((len(text), len(text) + len(inserts[index])))
                text += inserts[index] + "\n"
            text += line + ("\n" if index < len(lines) - 1 else "")
        examples.append(Example(problem.prompt(), text, spans))
    return examples


# ---------------------------------------------------------------------------------------------------------
# tokens and masks


def tokenize(examples: Sequence[Example], tokenizer: Any) -> tuple[TokenizedData, list[np.ndarray]]:
    """prompt + completion + EOS with the completion trained (as `trl sft` and the package's
    prompt-completion format do), and per example a bool mask of the tokens overlapping injected noise."""
    data = TokenizedData([], [], format="prompt-completion")
    noise_masks = []
    for example in examples:
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        encoded = tokenizer(example.completion, add_special_tokens=False, return_offsets_mapping=True)
        completion_ids = [*encoded["input_ids"], tokenizer.eos_token_id]
        ids = np.asarray(prompt_ids + completion_ids, dtype=np.int64)
        labels = ids.copy()
        labels[: len(prompt_ids)] = -100
        noise = np.zeros(len(ids), bool)
        for k, (start, end) in enumerate(encoded["offset_mapping"]):
            noise[len(prompt_ids) + k] = any(start < b and end > a for a, b in example.noise)
        data.input_ids.append(ids)
        data.labels.append(labels)
        noise_masks.append(noise)
    return data, noise_masks


def random_drop_labels(
    labels: Sequence[np.ndarray], counts: Sequence[int], protected: Sequence[np.ndarray], seed: int
) -> list[np.ndarray]:
    """Labels with `counts[i]` random response tokens of example i set to -100.

    Like XTF, the control never drops a token XTF protects (`protected[i]`, bool `[L_i]`: EOS, end of turn,
    `protect` spans) nor the last response token: otherwise a `protect` setting would favour arm (c) by
    keeping, say, the answer line that arm (d) loses at random.
    """
    rng = np.random.default_rng(seed)
    out = []
    for row, count, keep in zip(labels, counts, protected, strict=True):
        row = row.copy()
        trained = row != -100
        candidates = np.flatnonzero(trained & ~keep)
        candidates = candidates[candidates != np.flatnonzero(trained)[-1]]
        row[rng.choice(candidates, size=min(count, len(candidates)), replace=False)] = -100
        out.append(row)
    return out


def xtf_report(scored: ScoredDataset, noise: Sequence[np.ndarray], tokenizer: Any) -> dict[str, Any]:
    """What XTF dropped, against the injected noise: precision, recall, and the most dropped tokens."""
    flat_noise = np.concatenate(noise)
    response = scored.response
    drop = scored.selection.drop != 0
    dropped, injected = int(drop.sum()), int((flat_noise & response).sum())
    hit = int((drop & flat_noise).sum())
    by_attribute = {}
    for name, bit in (("reasoning", 1), ("novelty", 2), ("relevance", 4)):
        mask = (scored.selection.drop & bit) != 0
        by_attribute[name] = {
            "dropped": int(mask.sum()),
            "precision": round(float((mask & flat_noise).sum() / max(1, mask.sum())), 3),
        }
    counts: dict[str, int] = {}
    for token in scored.input_ids[drop].tolist():
        text = tokenizer.decode([token])
        counts[text] = counts.get(text, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:15]
    return {
        "response_tokens": int(response.sum()),
        "injected_tokens": injected,
        "injected_fraction": round(injected / max(1, int(response.sum())), 4),
        "dropped_tokens": dropped,
        "dropped_fraction": round(dropped / max(1, int(response.sum())), 4),
        "precision_on_noise": round(hit / max(1, dropped), 4),
        "recall_of_noise": round(hit / max(1, injected), 4),
        "by_attribute": by_attribute,
        "most_dropped": [[text, n] for text, n in top],
        "scoring_seconds": scored.stats.get("total_seconds"),
    }


def score_xtf(model: Any, tokenizer: Any, data: TokenizedData, config: XTFConfig, cache_dir: str | None = None
              ) -> ScoredDataset:
    """XTF scored by the frozen base model; with `cache_dir`, through the score cache (the seed processes of
    one run share it, so the noisy set is scored once), else recomputed."""
    if cache_dir:
        config = config.model_copy(update={"cache_dir": cache_dir})
    # The base model's parameters still require grad (it is the same class that LoRA trains).
    with torch.no_grad():
        return score_dataset(model, tokenizer, data, config, progress=False, use_cache=bool(cache_dir))


# ---------------------------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class TrainSettings:
    lr: float = 5e-4
    epochs: float = 1.0
    batch_size: int = 8
    lora_r: int = 16
    lora_alpha: int = 32


def load_base(model_path: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


def train(
    model_path: str, tokenizer: Any, data: TokenizedData, labels: Sequence[np.ndarray], seed: int,
    settings: TrainSettings, workdir: Path,
) -> Any:
    """LoRA (all linear layers) with TRL's SFTTrainer on pre-tokenised input_ids + labels; `seed` sets the
    LoRA init and the data order."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(seed)
    dataset = Dataset.from_dict(
        {"input_ids": [ids.tolist() for ids in data.input_ids], "labels": [row.tolist() for row in labels]}
    )
    config = SFTConfig(
        output_dir=str(workdir / "trainer"),
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        lr_scheduler_type="linear",
        warmup_steps=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=load_base(model_path), args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    return trainer.model.eval()


ANSWER = re.compile(r"The answer is (-?\d+)")
# the first answer is complete once a non-digit follows it: nothing generated after it can change the score
ANSWER_GIVEN = re.compile(r"The answer is -?\d+\D")


class AnswerGiven(StoppingCriteria):
    """Stopping criterion: a row is done once its first answer is complete. Greedy decoding of the other rows
    is unaffected, so accuracy is the same as generating to `max_new_tokens`, in a fraction of the time for
    arms that ramble after the answer."""

    def __init__(self, tokenizer: Any, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([bool(ANSWER_GIVEN.search(text)) for text in texts], device=input_ids.device)


# Generation on one CPU thread: 300 problems in batches of 128 took 169 s, of 64 193 s, of 16 258 s (same
# answers); larger batches use the matrix units better than waiting less on a batch's slowest row saves.
EVAL_BATCH = 150


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, problems: Sequence[Problem], max_new_tokens: int, batch: int = EVAL_BATCH
             ) -> tuple[float, list[str]]:
    """Exact-match accuracy of the greedy final answer (the first `The answer is N`), and the generations."""
    tokenizer.padding_side = "left"
    correct, outputs = 0, []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        encoded = tokenizer([p.prompt() for p in chunk], return_tensors="pt", padding=True)
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([AnswerGiven(tokenizer, encoded["input_ids"].shape[1])]),
        )
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for problem, text in zip(chunk, texts, strict=True):
            match = ANSWER.search(text)
            correct += bool(match) and int(match.group(1)) == problem.answer  # type: ignore[union-attr]
            outputs.append(text)
    return correct / len(problems), outputs


# ---------------------------------------------------------------------------------------------------------
# driver


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, and spread as half the range (with two seeds: the distance of each seed from the mean)."""
    return {
        "mean": round(statistics.fmean(values), 4),
        "half_range": round((max(values) - min(values)) / 2, 4),
        "stdev": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
    }


def arm_summary(arms: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Accuracy mean and spread over the seeds of every arm that has run."""
    return {name: mean_spread([run["accuracy"] for run in runs]) for name, runs in arms.items() if runs}


def machine() -> dict[str, Any]:
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


@dataclass
class Setup:
    """Everything shared by the runs of one invocation."""

    model_path: str
    tokenizer: Any
    train_problems: list[Problem]
    eval_problems: list[Problem]
    words: list[str]
    settings: TrainSettings
    max_new_tokens: int
    workdir: Path
    data_seed: int


def run_arm(setup: Setup, data: TokenizedData, labels: Sequence[np.ndarray], seed: int, tag: str
            ) -> dict[str, Any]:
    """Train one arm at one seed and evaluate it."""
    started = time.perf_counter()
    model = train(setup.model_path, setup.tokenizer, data, labels, seed, setup.settings, setup.workdir)
    trained = time.perf_counter()
    accuracy, outputs = evaluate(model, setup.tokenizer, setup.eval_problems, setup.max_new_tokens)
    done = time.perf_counter()
    print(f"[{tag} seed {seed}] accuracy {accuracy:.3f}  train {trained - started:.0f}s  eval {done - trained:.0f}s"
          f"  e.g. {outputs[0]!r}", flush=True)
    return {
        "seed": seed, "accuracy": round(accuracy, 4), "train_seconds": round(trained - started, 1),
        "eval_seconds": round(done - trained, 1), "samples": outputs[:3],
    }


def noisy_set(setup: Setup, recipe_name: str) -> tuple[list[Example], TokenizedData, list[np.ndarray]]:
    examples = inject(setup.train_problems, RECIPES[recipe_name], setup.data_seed + 1, setup.words)
    data, noise = tokenize(examples, setup.tokenizer)
    return examples, data, noise


def calibrate(setup: Setup, recipes: Sequence[str], seed: int) -> dict[str, Any]:
    """(a) clean vs (b) noisy at one seed per recipe, plus XTF's precision on each recipe's noise."""
    clean_data, _ = tokenize(inject(setup.train_problems, None, 0, setup.words), setup.tokenizer)
    out: dict[str, Any] = {"seed": seed, "clean": run_arm(setup, clean_data, clean_data.labels, seed, "a clean")}
    base = load_base(setup.model_path).eval()
    for name in recipes:
        _, data, noise = noisy_set(setup, name)
        # Precision on the first 100 examples only: scoring is the slow part on a shared CPU.
        head = TokenizedData(data.input_ids[:100], data.labels[:100], format=data.format)
        report = xtf_report(score_xtf(base, setup.tokenizer, head, XTFConfig()), noise[:100], setup.tokenizer)
        print(f"[{name}] XTF dropped {report['dropped_fraction']:.3f}, precision {report['precision_on_noise']:.3f},"
              f" noise {report['injected_fraction']:.3f} of response tokens", flush=True)
        out[name] = {"recipe": asdict(RECIPES[name]), "xtf": report,
                     "noisy": run_arm(setup, data, data.labels, seed, f"b {name}")}
    return out


ARMS = ("a", "b", "c", "d")
ARM_NAMES = {"a": "a_clean", "b": "b_noisy", "c": "c_noisy_xtf", "d": "d_noisy_random"}


def precision_check(setup: Setup, recipes: Sequence[str], n_examples: int) -> dict[str, Any]:
    """Which tokens XTF drops on the first `n_examples` noisy training examples of each recipe, against the
    injected noise: the check that a recipe is noise XTF can see, before spending training runs on it."""
    base = load_base(setup.model_path).eval()
    out: dict[str, Any] = {}
    for name in recipes:
        _, data, noise = noisy_set(setup, name)
        head = TokenizedData(data.input_ids[:n_examples], data.labels[:n_examples], format=data.format)
        report = xtf_report(score_xtf(base, setup.tokenizer, head, XTFConfig()), noise[:n_examples], setup.tokenizer)
        counts = [int(n[:len(ids)].sum()) for n, ids in zip(noise[:n_examples], head.input_ids, strict=True)]
        report["examples"] = n_examples
        report["noisy_examples"] = int(sum(c > 0 for c in counts))
        print(f"[{name}] noise {report['injected_fraction']:.3f} of response tokens; XTF dropped "
              f"{report['dropped_fraction']:.3f}, precision {report['precision_on_noise']:.3f}, recall "
              f"{report['recall_of_noise']:.3f}; by attribute {report['by_attribute']}", flush=True)
        out[name] = {"recipe": asdict(RECIPES[name]), "xtf": report}
    return out


def full_run(setup: Setup, recipe_name: str, seeds: Sequence[int], arms: Sequence[str], base_eval: bool,
             checkpoint: Any, config: XTFConfig, score_cache: str | None = None, score_late: bool = False
             ) -> dict[str, Any]:
    """The four arms at every seed, then the base model once; `checkpoint(result)` is called after every run
    so that an interrupted benchmark keeps what finished. XTF scores the noisy set first (through
    `score_cache` if given), or with `score_late` only when an arm first needs it."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    base = load_base(setup.model_path).eval()
    clean_data, _ = tokenize(inject(setup.train_problems, None, 0, setup.words), setup.tokenizer)
    _, data, noise = noisy_set(setup, recipe_name)
    result: dict[str, Any] = {"arms": {ARM_NAMES[a]: [] for a in arms}, "timings": timings}
    xtf_labels: list[np.ndarray] = []
    protected: list[np.ndarray] = []
    counts: list[int] = []

    def score_noisy_set() -> None:
        scoring = time.perf_counter()
        scored = score_xtf(base, setup.tokenizer, data, config, score_cache)
        timings["xtf_scoring_seconds"] = round(time.perf_counter() - scoring, 1)
        timings["xtf_cached_shards"] = scored.stats.get("cached_shards", 0)
        report = xtf_report(scored, noise, setup.tokenizer)
        print(f"[xtf] dropped {report['dropped_fraction']:.3f} of response tokens, precision on noise "
              f"{report['precision_on_noise']:.3f}, recall {report['recall_of_noise']:.3f}", flush=True)
        xtf_labels.extend(scored.per_example(scored.filtered_labels))
        protected.extend(scored.per_example(scored.protected))
        counts.extend(int((new == -100).sum() - (old == -100).sum()) for new, old in zip(xtf_labels, data.labels, strict=True))
        result["xtf"] = report
        checkpoint(result)

    if not score_late and ("c" in arms or "d" in arms):
        score_noisy_set()
    random_precision = []
    for seed in seeds:
        for arm in arms:
            if arm in ("c", "d") and not xtf_labels:
                score_noisy_set()
            if arm == "a":
                run = run_arm(setup, clean_data, clean_data.labels, seed, "a clean")
            elif arm == "b":
                run = run_arm(setup, data, data.labels, seed, "b noisy")
            elif arm == "c":
                run = run_arm(setup, data, xtf_labels, seed, "c noisy+xtf")
            else:
                random_labels = random_drop_labels(data.labels, counts, protected, seed=1000 + seed)
                dropped = np.concatenate(
                    [(new == -100) & (old != -100) for new, old in zip(random_labels, data.labels, strict=True)]
                )
                random_precision.append(float((dropped & np.concatenate(noise)).sum() / max(1, dropped.sum())))
                result["xtf"]["random_control_precision_on_noise"] = round(statistics.fmean(random_precision), 4)
                run = run_arm(setup, data, random_labels, seed, "d noisy+random")
            result["arms"][ARM_NAMES[arm]].append(run)
            result["summary"] = arm_summary(result["arms"])
            checkpoint(result)
    if base_eval:
        evaluating = time.perf_counter()
        base_accuracy, base_outputs = evaluate(base, setup.tokenizer, setup.eval_problems, setup.max_new_tokens)
        timings["base_eval_seconds"] = round(time.perf_counter() - evaluating, 1)
        print(f"[base] accuracy {base_accuracy:.3f}  e.g. {base_outputs[0]!r}", flush=True)
        result["base_accuracy"] = round(base_accuracy, 4)
        result["base_samples"] = base_outputs[:3]
    timings["total_seconds"] = round(time.perf_counter() - started, 1)
    checkpoint(result)
    return result


def run_seeds_in_processes(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every seed in a child process of its own (one CPU thread each, at most `args.jobs` at once), merged
    into one result as `full_run` returns it. The children share a score cache: the first seed scores the
    noisy set while the others train their first arms, and they read its scores when they reach arm (c); the
    last seed's child evaluates the base model, which balances the two.

    On two cores two single-thread processes train faster than one two-thread process, and do not stall when
    the machine is shared (OpenMP barriers do).
    """
    import subprocess

    started = time.perf_counter()
    common = ["--train-size", str(args.train_size), "--eval-size", str(args.eval_size), "--recipe", args.recipe,
              "--model", args.model, "--threads", "1", "--jobs", "1", "--arms", *args.arms]
    for setting in args.set:
        common += ["--set", setting]
    outputs = {seed: workdir / f"seed{seed}.json" for seed in args.seeds}
    pending = list(args.seeds)
    running: list[tuple[int, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            extra = [] if seed == args.seeds[-1] and not args.no_base else ["--no-base"]
            extra += [] if seed == args.seeds[0] else ["--score-late"]
            command = [sys.executable, str(Path(__file__).resolve()), *common, "--seeds", str(seed), *extra,
                       "--score-cache", str(workdir / "scores"), "--out", str(outputs[seed])]
            running.append((seed, subprocess.Popen(command)))
        time.sleep(2)
        for seed, process in list(running):
            if process.poll() is not None:
                running.remove((seed, process))
                if process.returncode:
                    raise SystemExit(f"downstream: the seed-{seed} process failed (exit {process.returncode}); "
                                     f"what it finished is in {outputs[seed]}")
    parts = [json.loads(outputs[seed].read_text()) for seed in args.seeds]
    merged: dict[str, Any] = {"arms": {name: [run for part in parts for run in part["arms"][name]]
                                       for name in parts[0]["arms"]}}
    merged["summary"] = arm_summary(merged["arms"])
    if "xtf" in parts[0]:
        merged["xtf"] = dict(parts[0]["xtf"])
        controls = [part["xtf"]["random_control_precision_on_noise"] for part in parts
                    if "random_control_precision_on_noise" in part.get("xtf", {})]
        if controls:
            merged["xtf"]["random_control_precision_on_noise"] = round(statistics.fmean(controls), 4)
    for part in parts:
        for key in ("base_accuracy", "base_samples"):
            if key in part:
                merged[key] = part[key]
    merged["timings"] = {**{f"seed{seed}": part["timings"] for seed, part in zip(args.seeds, parts, strict=True)},
                         "processes": min(args.jobs, len(args.seeds)),
                         "total_seconds": round(time.perf_counter() - started, 1)}
    return merged


def markdown_table(result: dict[str, Any]) -> str:
    """Accuracy per arm and seed, mean and half-range, the base model first."""
    titles = {"a_clean": "(a) clean", "b_noisy": "(b) noisy", "c_noisy_xtf": "(c) noisy + XTF",
              "d_noisy_random": "(d) noisy + random drop"}
    seeds = sorted({run["seed"] for runs in result["arms"].values() for run in runs})
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | ± half-range |",
             "|---|" + "---|" * (len(seeds) + 2)]
    if "base_accuracy" in result:
        lines.append(f"| base model (no training) | {result['base_accuracy']:.3f} |" + " |" * (len(seeds) + 1))
    for name, runs in result["arms"].items():
        by_seed = {run["seed"]: f"{run['accuracy']:.3f}" for run in runs}
        cells = " | ".join(by_seed.get(s, "-") for s in seeds)
        summary = result.get("summary", {}).get(name)
        tail = f"{summary['mean']:.3f} | {summary['half_range']:.3f}" if summary else "- | -"
        lines.append(f"| {titles[name]} | {cells} | {tail} |")
    return "\n".join(lines)


# how make_splits draws: recorded in the results, so that a calibration made on other problems is not carried over
SPLIT = "held-out drawn first"


def calibration_on_same_problems(previous: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration of an earlier invocation (kept in the same results file), if it trained on the same
    problems as this run; None otherwise, as it would describe another training set."""
    calibration = previous.get("calibration") or {}
    made_on = calibration.get("settings", {})
    same = all(made_on.get(key) == settings[key] for key in ("train_size", "eval_size", "data_seed", "split"))
    return calibration if same else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sets, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=300)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    parser.add_argument("--calibrate", nargs="*", metavar="RECIPE", default=None,
                        help="instead of the full run: (a) vs (b) at the first seed for these recipes (default all)")
    parser.add_argument("--check-precision", type=int, metavar="N", default=0,
                        help="instead of training: XTF's precision on the injected noise of the first N examples "
                        "of each --calibrate recipe (default all)")
    parser.add_argument("--arms", nargs="*", choices=ARMS, default=list(ARMS), help="none: the base model only")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the untrained model")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="XTF setting for arms (c) and (d), as `xtf score --set` (default: the defaults)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the process (with --jobs > 1: 1 each)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="seeds run in this many processes at once, one CPU thread each (1: all in this process)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--score-cache", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score-late", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_size, args.eval_size = args.seeds[:1], 24, 16
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data_seed = 1234
    train_problems, eval_problems = make_splits(args.train_size, args.eval_size, seed=data_seed)
    workdir = Path(tempfile.mkdtemp(prefix="xtf-downstream-"))
    words = salad_words(tokenizer)
    # Room for the clean solution plus every insertion the noisiest recipe makes, so an arm that imitates the
    # noise is not cut off before its answer line merely for having learnt the noise.
    max_new_tokens = 68
    setup = Setup(model_path, tokenizer, train_problems, eval_problems, words, TrainSettings(), max_new_tokens,
                  workdir, data_seed)
    settings = {
        "model": args.model, "train_size": args.train_size, "eval_size": args.eval_size, "seeds": args.seeds,
        "data_seed": data_seed, "split": SPLIT, "train": asdict(setup.settings), "lora_targets": "all-linear",
        "max_new_tokens": max_new_tokens, "quick": args.quick,
        **({"threads": 1, "processes": min(args.jobs, len(args.seeds))} if args.jobs > 1 and len(args.seeds) > 1
           else {"threads": args.threads}),
        "xtf_config": "defaults (XTFConfig())" if not args.set else "defaults with " + ", ".join(args.set),
    }
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if args.check_precision:
        recipes = args.calibrate or sorted(RECIPES)
        checked = {**previous.get("precision_check", {}), **precision_check(setup, recipes, args.check_precision)}
        result = {**previous, "precision_check": checked}
    elif args.calibrate is not None:
        recipes = args.calibrate or sorted(RECIPES)
        result = {**previous, "calibration": {"settings": settings, **calibrate(setup, recipes, args.seeds[0]),
                                              "seconds": round(time.perf_counter() - started, 1)}}
    else:
        def checkpoint(run: dict[str, Any]) -> None:
            document = {
                "settings": settings,
                "recipe": {"name": args.recipe, **asdict(RECIPES[args.recipe])},
                **run,
                "calibration": calibration_on_same_problems(previous, settings),
                "machine": machine(),
                "seconds": round(time.perf_counter() - started, 1),
                "example_noisy_response": inject(train_problems[:1], RECIPES[args.recipe], 7, words)[0].completion,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(document, indent=2) + "\n")

        if args.jobs > 1 and len(args.seeds) > 1:
            run = run_seeds_in_processes(args, workdir)
            checkpoint(run)
        else:
            run = full_run(setup, args.recipe, args.seeds, args.arms, not args.no_base, checkpoint,
                           build_config(None, args.set), args.score_cache, args.score_late)
        print(markdown_table(run))
        print(f"wrote {out} in {time.perf_counter() - started:.0f}s (work files in {workdir})", file=sys.stderr)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s (work files in {workdir})", file=sys.stderr)


if __name__ == "__main__":
    main()
