"""Does token filtering pay off downstream? LoRA fine-tuning of the demo model, clean and noisy, against what a
user would pick instead.

Two-step add/subtract word problems are generated with known answers; the model (SmolLM2-135M-Instruct) is
fine-tuned with LoRA (TRL's SFTTrainer) and scored by exact match of its greedy final answer on clean held-out
problems. Every run is one (data, method, seed):

* data: `clean` (the original responses; the paper's scenario) or `noisy` (off-task text inserted between the
  reasoning steps of the responses, or the reasoning said again: `--recipe`);
* method: `sft` (plain SFT), `dft` (TRL `loss_type="dft"`), `eaft` (axolotl's own `use_eaft` loss function,
  `axolotl.monkeypatch.loss.eaft.eaft_loss`, alpha 1, top-20, passed to TRL's SFTTrainer as axolotl's trainer
  builder passes it), `xtf:NAME` (what XTF with preset or variant NAME trains on: the selected tokens set to
  -100, or with `action: remove`, the spans preset's, also taken out of the input) and `random:NAME` (as many
  random response tokens per example as `xtf:NAME` selects, set to -100, never a protected one: the control that
  tells filtering from training on fewer tokens). The variant `spans-mask` is the spans preset with
  `action: mask`.

Every run stores each held-out problem's correctness, so arms are compared with paired tests over problems and
seeds (`paired.py`: a paired bootstrap over problems and an exact McNemar test). Finished runs are kept in the
results file and skipped when the same run (same settings) is asked for again, so an interrupted benchmark
resumes. Several processes may share one results file (say, one per task of runs): each write merges what the
others wrote since.

    python benchmarks/downstream.py                          # the whole matrix (make bench-downstream)
    python benchmarks/downstream.py --runs noisy/xtf:paper --seeds 0 1 2
    python benchmarks/downstream.py --variant tr='{"mode": "union", "weights": {"reasoning": 0}}' --runs noisy/xtf:tr
    python benchmarks/downstream.py --quick                  # smoke test, tiny settings, nothing kept
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).parent))
from paired import compare  # noqa: E402
from tasks import DEFAULT_TASK, TASKS, Task, TaskExample  # noqa: E402

from xtf_plugin.config import XTFConfig, load_xtf_config  # noqa: E402
from xtf_plugin.data import TokenizedData  # noqa: E402
from xtf_plugin.demo import resolve_model_path  # noqa: E402
from xtf_plugin.pipeline import ScoredDataset, score_dataset  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "downstream.json"

# ---------------------------------------------------------------------------------------------------------
# noise


@dataclass(frozen=True)
class Recipe:
    """How noise is injected.

    Attributes:
        kind: `salad` (random English words from the tokenizer's vocabulary), `chatter` (off-task sentences
            assembled from templates, with a distractor number) or `loop` (the reasoning so far said again, word
            for word: a looping response).
        share: fraction of the training responses that get noise.
        slots: where insertions go: 0 = before the first step, 1 = between the steps, 2 = before the answer
            line; one insertion per listed slot.
        length: words per `salad` insertion (min, max).
        distractor: `salad` only: put a value of the task's kind in the middle of each insertion (a number
            for arithmetic, where a step copies the previous result; a field value for records).
        repeats: `loop` only: how many times the lines before the slot are said again (min, max).
    """

    kind: str
    share: float
    slots: tuple[int, ...]
    length: tuple[int, int] = (4, 7)
    distractor: bool = False
    repeats: tuple[int, int] = (1, 2)


RECIPES: dict[str, Recipe] = {
    "salad-between": Recipe("salad", 0.9, (1,), (4, 7), distractor=True),
    "chatter-two": Recipe("chatter", 0.9, (1, 2)),
    "salad-two": Recipe("salad", 1.0, (1, 2), (4, 6), distractor=True),
    "loop": Recipe("loop", 0.9, (2,)),
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


def noise_text(recipe: Recipe, rng: random.Random, words: Sequence[str], task: Task, before: Sequence[str]) -> str:
    """One insertion, whole lines without the last newline; `before` are the response's lines before the slot."""
    if recipe.kind == "loop":
        if not before:
            raise ValueError("a loop needs a line before its slot: slot 0 cannot loop")
        return "\n".join([*before] * rng.randint(*recipe.repeats))
    if recipe.kind == "chatter":
        return (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.randint(2, 99)} {rng.choice(_THINGS)} "
                f"{rng.choice(_PLACES)}.")
    picked = [rng.choice(words) for _ in range(rng.randint(*recipe.length))]
    if recipe.distractor:
        picked.insert(len(picked) // 2, task.distractor(rng))
    text = " ".join(picked)
    return text[0].upper() + text[1:] + "."


@dataclass
class Example:
    """A training example: prompt, completion, and the character spans of injected noise in the
    completion."""

    prompt: str
    completion: str
    noise: list[tuple[int, int]]


def inject(problems: Sequence[TaskExample], recipe: Recipe | None, seed: int, words: Sequence[str], task: Task
           ) -> list[Example]:
    """Training examples for the task's examples; with a recipe, noise lines go into a `share` of them."""
    rng = random.Random(seed)
    examples = []
    for problem in problems:
        lines = problem.lines()
        noisy = recipe is not None and rng.random() < recipe.share
        inserts = {slot: noise_text(recipe, rng, words, task, lines[:slot])
                   for slot in recipe.slots} if noisy and recipe else {}
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
    """What XTF dropped, against the injected noise (none on clean data): precision, recall, the most dropped
    tokens."""
    flat_noise = np.concatenate(noise)
    response = scored.response
    drop = scored.selection.reasons != 0
    dropped, injected = int(drop.sum()), int((flat_noise & response).sum())
    hit = int((drop & flat_noise).sum())
    by_attribute = {}
    for name, bit in (("reasoning", 1), ("novelty", 2), ("relevance", 4)):
        mask = (scored.selection.reasons & bit) != 0
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
        "precision_on_noise": round(hit / max(1, dropped), 4) if injected else None,
        "recall_of_noise": round(hit / max(1, injected), 4) if injected else None,
        "by_attribute": by_attribute,
        "most_dropped": [[text, n] for text, n in top],
        "scoring_seconds": scored.stats.get("total_seconds"),
    }


def score_xtf(model: Any, tokenizer: Any, data: TokenizedData, config: XTFConfig, cache_dir: str | None = None
              ) -> ScoredDataset:
    """XTF scored by the frozen base model; with `cache_dir`, through the score cache, else recomputed."""
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


def eaft_loss_function() -> Any:
    """axolotl's EAFT loss with axolotl's defaults (alpha 1.0, top-20 entropy), as its trainer builder passes
    it to the trainer for `use_eaft: true`."""
    from functools import partial

    from axolotl.monkeypatch.loss.eaft import eaft_loss

    return partial(eaft_loss, alpha=1.0, k=20)


def train(
    model_path: str, tokenizer: Any, data: TokenizedData, labels: Sequence[np.ndarray], seed: int,
    settings: TrainSettings, workdir: Path, loss: str = "nll",
) -> Any:
    """LoRA (all linear layers) with TRL's SFTTrainer on pre-tokenised input_ids + labels; `seed` sets the
    LoRA init and the data order; `loss` is `nll`, `dft` (TRL's) or `eaft` (axolotl's)."""
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
        loss_type="dft" if loss == "dft" else "nll",
    )
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=load_base(model_path), args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora, compute_loss_func=eaft_loss_function() if loss == "eaft" else None,
    )
    trainer.train()
    return trainer.model.eval()


class AnswerGiven(StoppingCriteria):
    """Stopping criterion: a row is done once its first answer is complete. Greedy decoding of the other rows
    is unaffected, so accuracy is the same as generating to `max_new_tokens`, in a fraction of the time for
    arms that ramble after the answer."""

    def __init__(self, tokenizer: Any, prompt_length: int, task: Task) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.task = task

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.task.answered(text) for text in texts], device=input_ids.device)


# Generation on one CPU thread: 300 problems in batches of 128 took 169 s, of 64 193 s, of 16 258 s (same
# answers); larger batches use the matrix units better than waiting less on a batch's slowest row saves.
EVAL_BATCH = 150


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, task: Task, problems: Sequence[TaskExample], batch: int = EVAL_BATCH
             ) -> tuple[str, list[str]]:
    """Correctness of the greedy final answer (the task's check of the first answer) per problem, as a string
    of 0/1, and the generations."""
    tokenizer.padding_side = "left"
    correct, outputs = [], []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        encoded = tokenizer([p.prompt() for p in chunk], return_tensors="pt", padding=True)
        generated = model.generate(
            **encoded, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([AnswerGiven(tokenizer, encoded["input_ids"].shape[1], task)]),
        )
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        for problem, text in zip(chunk, texts, strict=True):
            correct.append("1" if problem.correct(text) else "0")
            outputs.append(text)
    return "".join(correct), outputs


# ---------------------------------------------------------------------------------------------------------
# runs


DATA = ("clean", "noisy")
PLAIN_METHODS = {"sft": "nll", "dft": "dft", "eaft": "eaft"}
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_RUNS = ("noisy/sft", "noisy/xtf:spans", "noisy/random:spans", "clean/sft", "clean/xtf:spans", "noisy/dft",
                "noisy/xtf:spans-mask", "clean/dft", "noisy/xtf:paper", "clean/xtf:paper", "noisy/eaft", "clean/eaft")
MASK_SUFFIX = "-mask"
"""`xtf:NAME-mask` is preset NAME with `action: mask`; it is compared with `xtf:NAME`."""


@dataclass(frozen=True)
class RunSpec:
    """One training run: `data/method/seed`, e.g. `noisy/xtf:paper/0`."""

    data: str
    method: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.data}/{self.method}/{self.seed}"

    @property
    def arm(self) -> str:
        return f"{self.data}/{self.method}"

    @property
    def variant(self) -> str | None:
        """The XTF preset or variant whose selection the run uses (`xtf:` and `random:` methods)."""
        return self.method.split(":", 1)[1] if ":" in self.method else None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        data, method, seed = text.split("/")
        return cls(data, method, int(seed))


def parse_arm(text: str, variants: dict[str, XTFConfig]) -> str:
    """Check an arm `data/method` (methods: sft, dft, eaft, xtf:NAME, random:NAME)."""
    try:
        data, method = text.split("/")
    except ValueError:
        raise SystemExit(f"downstream: --runs {text}: expected data/method, e.g. noisy/xtf:paper") from None
    kind, _, name = method.partition(":")
    if data not in DATA:
        raise SystemExit(f"downstream: --runs {text}: data must be one of {', '.join(DATA)}")
    if method not in PLAIN_METHODS and not (kind in ("xtf", "random") and name):
        raise SystemExit(f"downstream: --runs {text}: method must be sft, dft, eaft, xtf:NAME or random:NAME")
    if name and name not in variants:
        raise SystemExit(f"downstream: --runs {text}: unknown preset or variant {name!r} (known: {', '.join(variants)})")
    return text


def xtf_variants(extra: Sequence[str]) -> dict[str, XTFConfig]:
    """The package's presets, the spans preset with `action: mask` (`spans-mask`), plus `--variant NAME=JSON`
    settings (a JSON object of `xtf:` keys)."""
    from xtf_plugin.config import PRESETS

    variants = {name: XTFConfig(preset=name) for name in PRESETS}
    variants["spans" + MASK_SUFFIX] = XTFConfig(preset="spans", action="mask")
    for item in extra:
        name, _, raw = item.partition("=")
        try:
            variants[name] = load_xtf_config(json.loads(raw), source=f"--variant {name}")
        except json.JSONDecodeError as error:
            raise SystemExit(f"downstream: --variant {name}: not a JSON object ({error})") from None
    return variants


@dataclass
class Setup:
    """Everything shared by the runs of one invocation."""

    model_path: str
    tokenizer: Any
    task: Task
    train_problems: list[TaskExample]
    eval_problems: list[TaskExample]
    words: list[str]
    settings: TrainSettings
    workdir: Path
    data_seed: int
    recipe: str


def training_set(setup: Setup, data: str) -> tuple[TokenizedData, list[np.ndarray]]:
    """The clean or noisy training set, tokenised, with the per-example noise masks."""
    recipe = RECIPES[setup.recipe] if data == "noisy" else None
    return tokenize(inject(setup.train_problems, recipe, setup.data_seed + 1, setup.words, setup.task),
                    setup.tokenizer)


def labels_path(setup: Setup, data: str, variant: str) -> Path:
    return setup.workdir / f"labels-{data}-{variant}.npz"


def prepare_labels(setup: Setup, data: str, variant: str, config: XTFConfig, cache_dir: str | None) -> dict[str, Any]:
    """Score the training set with the frozen base model, select with `config`, and store the XTF labels, the
    protected tokens and the drop counts for the runs that need them; returns XTF's report on the set."""
    base = load_base(setup.model_path).eval()
    tokens, noise = training_set(setup, data)
    scored = score_xtf(base, setup.tokenizer, tokens, config, cache_dir)
    report = xtf_report(scored, noise, setup.tokenizer)
    labels = scored.per_example(scored.filtered_labels)
    protected = scored.per_example(scored.protected)
    # `kept` (what stays in the input) only with action: remove, so that masking runs keep their stored keys
    _, _, kept = scored.training_examples()
    removal = {"kept": np.concatenate(kept)} if config.action == "remove" else {}
    np.savez(labels_path(setup, data, variant), offsets=scored.offsets, labels=np.concatenate(labels),
             protected=np.concatenate(protected), **removal)
    shown = f", precision on noise {report['precision_on_noise']:.3f}, recall {report['recall_of_noise']:.3f}" \
        if report["precision_on_noise"] is not None else ""
    print(f"[{data} xtf:{variant}] dropped {report['dropped_fraction']:.3f} of response tokens{shown}", flush=True)
    return report


HELD_OUT_RECIPES = ("chatter-two",)
"""Recipes kept aside while the spans selection was designed (on word salad): the test of a rule not tuned on
them."""


def detection(setup: Setup, variants: dict[str, XTFConfig], cache_dir: str | None,
              sets: Sequence[str] | None = None) -> dict[str, Any]:
    """What each preset / variant drops on the clean training set and on every recipe's noisy one (or only on
    `sets`, names of `clean` and recipes), against the injected noise, without training: the check that a
    selection sees a recipe's noise and leaves clean data alone."""
    base = load_base(setup.model_path).eval()
    out: dict[str, Any] = {}
    for recipe in (None, *sorted(RECIPES)):
        name = recipe or "clean"
        if sets is not None and name not in sets:
            continue
        tokens, noise = tokenize(inject(setup.train_problems, RECIPES[recipe] if recipe else None,
                                        setup.data_seed + 1, setup.words, setup.task), setup.tokenizer)
        out[name] = {"held_out": name in HELD_OUT_RECIPES}
        for variant, config in variants.items():
            report = xtf_report(score_xtf(base, setup.tokenizer, tokens, config, cache_dir), noise, setup.tokenizer)
            out[name][variant] = report
            shown = f", precision {report['precision_on_noise']:.3f}, recall {report['recall_of_noise']:.3f}" \
                if report["precision_on_noise"] is not None else ""
            print(f"[detect {name} xtf:{variant}] dropped {report['dropped_fraction']:.3f}{shown}", flush=True)
    return out


def nothing_dropped(setup: Setup, spec: RunSpec) -> bool:
    """Whether XTF's labels for the run's data are the original labels."""
    tokens, _ = training_set(setup, spec.data)
    stored = np.load(labels_path(setup, spec.data, str(spec.variant)))
    return bool(np.array_equal(stored["labels"], np.concatenate(tokens.labels)))


def run_examples(setup: Setup, spec: RunSpec, tokens: TokenizedData, noise: Sequence[np.ndarray]
                 ) -> tuple[TokenizedData, list[np.ndarray], dict[str, Any]]:
    """The examples and labels a run trains on, and what was dropped."""
    if spec.variant is None:
        return tokens, tokens.labels, {}
    stored = np.load(labels_path(setup, spec.data, spec.variant))
    cut = stored["offsets"][1:-1]
    xtf_labels = np.split(stored["labels"], cut)
    if spec.method.startswith("xtf:"):
        if "kept" not in stored.files:
            return tokens, xtf_labels, {}
        kept = np.split(stored["kept"], cut)
        cleaned = TokenizedData([ids[k] for ids, k in zip(tokens.input_ids, kept, strict=True)],
                                [old[k] for old, k in zip(tokens.labels, kept, strict=True)], format=tokens.format)
        return cleaned, [new[k] for new, k in zip(xtf_labels, kept, strict=True)], {}
    protected = np.split(stored["protected"], cut)
    counts = [int((new == -100).sum() - (old == -100).sum()) for new, old in zip(xtf_labels, tokens.labels, strict=True)]
    labels = random_drop_labels(tokens.labels, counts, protected, seed=1000 + spec.seed)
    dropped = np.concatenate([(new == -100) & (old != -100) for new, old in zip(labels, tokens.labels, strict=True)])
    hits = float((dropped & np.concatenate(noise)).sum() / max(1, dropped.sum()))
    return tokens, labels, {"random_precision_on_noise": round(hits, 4)}


def execute(setup: Setup, spec: RunSpec) -> dict[str, Any]:
    """Train one run and evaluate it on the held-out problems."""
    started = time.perf_counter()
    tokens, noise = training_set(setup, spec.data)
    tokens, labels, extra = run_examples(setup, spec, tokens, noise)
    loss = PLAIN_METHODS.get(spec.method, "nll")
    model = train(setup.model_path, setup.tokenizer, tokens, labels, spec.seed, setup.settings, setup.workdir, loss)
    trained = time.perf_counter()
    correct, outputs = evaluate(model, setup.tokenizer, setup.task, setup.eval_problems)
    done = time.perf_counter()
    accuracy = correct.count("1") / len(correct)
    print(f"[{spec.id}] accuracy {accuracy:.3f}  train {trained - started:.0f}s  eval {done - trained:.0f}s"
          f"  e.g. {outputs[0]!r}", flush=True)
    return {
        "data": spec.data, "method": spec.method, "seed": spec.seed, "accuracy": round(accuracy, 4),
        "correct": correct, "train_seconds": round(trained - started, 1), "eval_seconds": round(done - trained, 1),
        "samples": outputs[:3], **extra,
    }


def evaluate_base(setup: Setup) -> dict[str, Any]:
    correct, outputs = evaluate(load_base(setup.model_path).eval(), setup.tokenizer, setup.task,
                                setup.eval_problems)
    return {"accuracy": round(correct.count("1") / len(correct), 4), "correct": correct, "samples": outputs[:3]}


# ---------------------------------------------------------------------------------------------------------
# statistics and tables


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation over seeds and standard error of the mean."""
    stdev = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "stdev": round(stdev, 4),
            "sem": round(stdev / len(values) ** 0.5, 4), "seeds": len(values)}


def arm_runs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Arm -> seed -> run."""
    arms: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs.values():
        arms.setdefault(f"{run['data']}/{run['method']}", {})[run["seed"]] = run
    return arms


def paired(arms: dict[str, dict[int, dict[str, Any]]], a: str, b: str) -> dict[str, Any] | None:
    """Paired test of arm a against arm b over the seeds both have."""
    if a not in arms or b not in arms:
        return None
    seeds = sorted(set(arms[a]) & set(arms[b]))
    if not seeds:
        return None
    return {"a": a, "b": b, **compare([arms[a][s]["correct"] for s in seeds], [arms[b][s]["correct"] for s in seeds])}


def comparisons(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every XTF arm against plain SFT on the same data, against its random control, against DFT and EAFT; the
    noisy arms also against clean SFT; and the alternatives against SFT."""
    arms = arm_runs(runs)
    pairs = []
    for arm in sorted(arms):
        data, method = arm.split("/")
        if method.startswith("xtf:"):
            others = ["sft", "random:" + method[4:], "dft", "eaft"]
            if method.endswith(MASK_SUFFIX):  # masking against the preset's removal
                others.insert(0, method.removesuffix(MASK_SUFFIX))
            pairs += [(arm, f"{data}/{other}") for other in others]
        if data == "noisy" and method.startswith("xtf:"):
            pairs.append((arm, "clean/sft"))  # how much of the clean-data accuracy the filter gets back
        elif method in ("dft", "eaft") or method.startswith("random:"):
            pairs.append((arm, f"{data}/sft"))
    pairs.append(("noisy/sft", "clean/sft"))
    return [result for a, b in pairs if (result := paired(arms, a, b)) is not None]


def gap_recovered(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per noisy XTF arm: (arm - noisy SFT) / (clean SFT - noisy SFT), from the seed means."""
    summary = {arm: statistics.fmean(r["accuracy"] for r in by_seed.values()) for arm, by_seed in arm_runs(runs).items()}
    if "clean/sft" not in summary or "noisy/sft" not in summary or summary["clean/sft"] <= summary["noisy/sft"]:
        return {}
    gap = summary["clean/sft"] - summary["noisy/sft"]
    return {arm: round((mean - summary["noisy/sft"]) / gap, 3) for arm, mean in summary.items()
            if arm.startswith("noisy/xtf:")}


@contextlib.contextmanager
def results_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the results file's folder while a process reads, merges and replaces the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # closing releases the lock


def merge_results(on_disk: dict[str, Any], result: dict[str, Any], mine: dict[str, set[str]]) -> None:
    """Take into `result` what the results file holds now (`on_disk`), written by another process since this one
    read it; where both have an entry, the one this process produced itself (keys in `mine["runs"]`,
    `mine["xtf"]`, `"base"` in `mine["base"]`) wins."""
    for part in ("runs", "xtf"):
        ours = {key: result[part][key] for key in mine[part]}
        result[part] = {**result[part], **on_disk.get(part, {}), **ours}
    if "base" in on_disk and not mine["base"]:
        result["base"] = on_disk["base"]


def markdown_tables(result: dict[str, Any]) -> str:
    """Accuracy per arm (seeds, mean ± SEM), then every paired comparison."""
    arms = arm_runs(result["runs"])
    seeds = sorted({run["seed"] for run in result["runs"].values()})
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± SEM | dropped |",
             "|---|" + "---|" * (len(seeds) + 2)]
    if "base" in result:
        lines.append(f"| base model (no training) | {result['base']['accuracy']:.3f} |" + " |" * (len(seeds) + 1))
    for arm in sorted(arms, key=lambda name: (name.split("/")[0] != "clean", name)):
        by_seed = arms[arm]
        cells = " | ".join(f"{by_seed[s]['accuracy']:.3f}" if s in by_seed else "-" for s in seeds)
        summary = result["summary"][arm]
        variant = arm.split("/")[1].partition(":")[2]
        report = result.get("xtf", {}).get(f"{arm.split('/')[0]}/{variant}") if variant else None
        dropped = f"{report['dropped_fraction']:.1%}" if report else ""
        lines.append(f"| {arm} | {cells} | {summary['mean']:.3f} ± {summary['sem']:.3f} | {dropped} |")
    lines += ["", "| A vs B | A - B | 95% CI | p (bootstrap) | p (McNemar) | A only / B only right |",
              "|---|---|---|---|---|---|"]
    def p(value: float) -> str:
        return "<0.001" if value < 0.001 else f"{value:.3f}"

    for c in result.get("comparisons", []):
        lines.append(f"| {c['a']} vs {c['b']} | {c['diff']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                     f"{p(c['p_bootstrap'])} | {p(c['p_mcnemar'])} | {c['a_only']} / {c['b_only']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# driver


def machine() -> dict[str, Any]:
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def run_settings(setup: Setup, spec: RunSpec, eval_size: int) -> dict[str, Any]:
    """What a run's result depends on: a stored run is reused only when these are equal. For `xtf:` and
    `random:` runs that includes a hash of the labels XTF chose, so a settings change that selects the same
    tokens reuses the run, and one that changes a single token does not."""
    settings: dict[str, Any] = {
        "model": "demo" if setup.model_path == resolve_model_path("demo") else setup.model_path,
        "train_size": len(setup.train_problems), "eval_size": eval_size, "data_seed": setup.data_seed,
        "recipe": setup.recipe if spec.data == "noisy" else None, "train": asdict(setup.settings),
        "max_new_tokens": setup.task.max_new_tokens,
    }
    if setup.task.name != DEFAULT_TASK:  # (added after the arithmetic runs, whose stored keys stay valid)
        settings["task"] = setup.task.name
    if spec.variant is not None:
        settings["xtf_labels"] = labels_hash(labels_path(setup, spec.data, spec.variant))
    return settings


def labels_hash(path: Path) -> str:
    """Hash of the arrays in a labels file (not of the file: an .npz records when it was written)."""
    digest = hashlib.sha256()
    with np.load(path) as stored:
        for name in sorted(stored.files):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(stored[name]).tobytes())
    return digest.hexdigest()[:16]


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_workers(args: argparse.Namespace, setup: Setup, todo: list[RunSpec], variants: dict[str, XTFConfig],
                done: Any, record: Any) -> None:
    """Every run in a child process of its own (one CPU thread each, at most `args.jobs` at once), in the
    order given; the XTF labels are prepared first, while runs that need none start. `done(spec)` says whether
    a stored result can be reused (asked once the run's labels exist); `record(spec, run)` gets each result.

    On two cores two single-thread processes train faster than one two-thread process, and do not stall when
    the machine is shared (OpenMP barriers do).
    """
    needed = list(dict.fromkeys((spec.data, spec.variant) for spec in todo if spec.variant is not None))
    prepared: set[tuple[str, str]] = set()
    pending = list(todo)
    running: list[tuple[RunSpec, subprocess.Popen, Path]] = []

    def unfinished(spec: RunSpec) -> bool:
        return any(other.id == spec.id for other in pending) or any(other.id == spec.id for other, _, _ in running)

    def launch(limit: int) -> None:
        for spec in list(pending):
            if len(running) >= limit:
                return
            if spec.variant is not None and (spec.data, spec.variant) not in prepared:
                continue
            # an XTF run that masks nothing is its plain-SFT run: wait for that instead of training it twice
            if (spec.method.startswith("xtf:") and unfinished(RunSpec(spec.data, "sft", spec.seed))
                    and nothing_dropped(setup, spec)):
                continue
            pending.remove(spec)
            if done(spec):
                continue
            out = setup.workdir / f"run-{spec.id.replace('/', '_').replace(':', '-')}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", spec.id, "--workdir",
                       str(setup.workdir), *forwarded(args), "--out", str(out)]
            running.append((spec, subprocess.Popen(command), out))

    def collect() -> None:
        for spec, process, out in list(running):
            if process.poll() is None:
                continue
            running.remove((spec, process, out))
            if process.returncode:
                raise SystemExit(f"downstream: run {spec.id} failed (exit {process.returncode})")
            record(spec, json.loads(out.read_text()))

    launch(max(1, args.jobs - 1) if needed else args.jobs)
    for data, variant in needed:
        report = prepare_labels(setup, data, variant, variants[variant], args.score_cache)
        prepared.add((data, variant))
        record(None, {"xtf": {f"{data}/{variant}": report}})
        collect()
        launch(max(1, args.jobs - 1))
    while pending or running:
        launch(args.jobs)
        time.sleep(2)
        collect()


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a worker process needs to rebuild the same setup."""
    out = ["--train-size", str(args.train_size), "--eval-size", str(args.eval_size), "--recipe", args.recipe,
           "--task", args.task,
           "--model", args.model, "--threads", "1"]
    for item in args.variant:
        out += ["--variant", item]
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sets, one seed, results not kept")
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), metavar="DATA/METHOD",
                        help="arms to run (data: clean, noisy; method: sft, dft, eaft, xtf:NAME, random:NAME)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="an XTF setting for xtf:NAME / random:NAME, as a JSON object of xtf: keys")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the untrained model")
    parser.add_argument("--detect", action="store_true",
                        help="instead of training: what each preset / --variant drops on the clean set and on every "
                        "recipe's noisy set (results/downstream_detection.json)")
    parser.add_argument("--detect-sets", nargs="+", choices=["clean", *sorted(RECIPES)], default=None, metavar="SET",
                        help="--detect only on these sets (clean, recipe names); the other rows of the results file "
                        "are kept, which needs its settings to be this run's")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each process")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each in a process of its own")
    parser.add_argument("--out", default=None, help="results file (default: results/downstream.json for the "
                        "arithmetic task, results/downstream_TASK.json for another)")
    parser.add_argument("--score-cache", default=None,
                        help="score cache folder (default: the package's, as xtf score uses it)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=sorted(TASKS), default=DEFAULT_TASK)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_size, args.eval_size = args.seeds[:1], 24, 16
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="xtf-downstream-quick-")) / "downstream.json")
    if args.detect_sets is not None and not args.detect:
        parser.error("--detect-sets needs --detect")
    args.out = args.out or results_path(TASKS[args.task])
    return args


def results_path(task: Task, kind: str = "") -> str:
    """results/downstream[_TASK][_KIND].json; the arithmetic task was the first and keeps the plain name."""
    parts = ["downstream", *([task.name] if task.name != DEFAULT_TASK else []), *([kind] if kind else [])]
    return str(RESULTS.with_name("_".join(parts) + ".json"))


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    variants = xtf_variants(args.variant)
    model_path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data_seed = 1234
    task = TASKS[args.task]
    train_problems, eval_problems = task.splits(args.train_size, args.eval_size, seed=data_seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xtf-downstream-"))
    setup = Setup(model_path, tokenizer, task, train_problems, eval_problems, salad_words(tokenizer),
                  TrainSettings(), workdir, data_seed, args.recipe)
    out = Path(args.out)
    if args.worker:
        out.write_text(json.dumps(execute(setup, RunSpec.parse(args.worker))) + "\n")
        return
    if args.score_cache is None:
        args.score_cache = str(XTFConfig().resolved_cache_dir())
    if args.detect:
        target = out if args.out != results_path(task) else Path(results_path(task, "detection"))
        # as JSON reads back (tuples as lists), to compare with a file's
        settings = json.loads(json.dumps({
            "task": args.task, "model": args.model, "train_size": args.train_size, "data_seed": data_seed,
            "recipes": {name: asdict(recipe) for name, recipe in RECIPES.items()},
            "variants": {name: config.model_dump(mode="json", exclude={"cache_dir"}) for name, config in variants.items()}}))
        kept: dict[str, Any] = {}
        if args.detect_sets is not None and target.is_file():
            previous = json.loads(target.read_text())
            # a file written before the task was recorded in it is of this task
            if {"task": args.task, **previous.get("settings", {})} != settings:
                raise SystemExit(f"--detect-sets: {target} was made with other settings; run --detect on every set, "
                                 "or write to another --out")
            kept = previous["detection"]
        found = detection(setup, variants, args.score_cache, args.detect_sets)
        document = {"settings": settings, "detection": {**kept, **found}, "machine": machine()}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {target} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        return
    arms = [parse_arm(text, variants) for text in args.runs]
    previous = json.loads(out.read_text()) if out.is_file() else {}
    result: dict[str, Any] = {"runs": {}, "xtf": {}, **{k: previous[k] for k in ("runs", "xtf", "base") if k in previous}}
    # seed by seed, so that every comparison has its first paired seed early
    todo = [RunSpec.parse(f"{arm}/{seed}") for seed in args.seeds for arm in arms]

    # what this process produced: on a write it wins over the file, where other processes may have written
    mine: dict[str, set[str]] = {"runs": set(), "xtf": set(), "base": set()}

    def done(spec: RunSpec) -> bool:
        key = fingerprint(run_settings(setup, spec, args.eval_size))
        if result["runs"].get(spec.id, {}).get("settings_key") == key:
            print(f"[{spec.id}] kept from {out}", flush=True)
            return True
        plain = result["runs"].get(f"{spec.data}/sft/{spec.seed}")
        if spec.method.startswith("xtf:") and plain and nothing_dropped(setup, spec):
            # the same labels as plain SFT: the same run, bit for bit on CPU
            result["runs"][spec.id] = {**plain, "method": spec.method, "settings_key": key,
                                       "same_run_as": f"{spec.data}/sft/{spec.seed}"}
            mine["runs"].add(spec.id)
            print(f"[{spec.id}] XTF dropped nothing: the run of {spec.data}/sft/{spec.seed}", flush=True)
            return True
        return False

    def write() -> None:
        with results_lock(out):
            on_disk = json.loads(out.read_text()) if out.is_file() else {}
            merge_results(on_disk, result, mine)
            result["summary"] = {arm: mean_spread([run["accuracy"] for run in by_seed.values()])
                                 for arm, by_seed in arm_runs(result["runs"]).items()}
            result["comparisons"] = comparisons(result["runs"])
            result["gap_recovered"] = gap_recovered(result["runs"])
            ours = {name: config.model_dump(mode="json", exclude={"cache_dir"}) for name, config in variants.items()}
            document = {
                "settings": {"model": args.model, "train_size": args.train_size, "eval_size": args.eval_size,
                             "data_seed": data_seed, "recipe": {"name": args.recipe, **asdict(RECIPES[args.recipe])},
                             "train": asdict(setup.settings), "lora_targets": "all-linear", "threads_per_process": 1,
                             "task": setup.task.name, "max_new_tokens": setup.task.max_new_tokens,
                             "variants": {**on_disk.get("settings", {}).get("variants", {}), **ours}},
                **result, "machine": machine(),
                "example_noisy_response": inject(train_problems[:1], RECIPES[args.recipe], 7, setup.words,
                                                 setup.task)[0].completion,
            }
            temporary = out.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(document, indent=1) + "\n")
            temporary.replace(out)

    def record(spec: RunSpec | None, run: dict[str, Any]) -> None:
        if spec is None:
            result["xtf"].update(run["xtf"])
            mine["xtf"].update(run["xtf"])
        else:
            run["settings_key"] = fingerprint(run_settings(setup, spec, args.eval_size))
            result["runs"][spec.id] = run
            mine["runs"].add(spec.id)
        write()

    run_workers(args, setup, todo, variants, done, record)
    if not args.no_base and result.get("base", {}).get("eval_size") != args.eval_size:
        result["base"] = {**evaluate_base(setup), "eval_size": args.eval_size}
        mine["base"].add("base")
        print(f"[base] accuracy {result['base']['accuracy']:.3f}", flush=True)
    write()
    print(markdown_tables(result))
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s (work files in {workdir})", file=sys.stderr)


if __name__ == "__main__":
    main()
