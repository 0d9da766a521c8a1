"""Scores of `xtf_plugin.scoring` checked against slow, independent reference implementations.

The references share no code with the scorer: they run a float64 copy of the model with eager attention and
`output_attentions=True`, read full logits, score one example at a time (no padding) and, for TR, run one
forward pass per token occurrence. The scorer runs the float32 (SDPA) model batched, so agreement to 1e-5
checks the batching, padding, chunked LM head, attention capture (grouped-query heads included) and the
definitions themselves. Prompt gain and batch invariance are also checked with a float64 SDPA model, where
float32 rounding of the model itself cannot hide (or cause) a difference.

The tiny random models use larger-than-default weights (and a scaled LM head), and the examples are sampled
from the model (20% uniformly random tokens mixed in), so that attention is peaked and p(token) spans (0, 1):
with the default init and uniformly random ids every attention row and next-token distribution is nearly
uniform, p(token) ~ 1/vocab, and most mistakes would go unnoticed. `test_references_discriminate` checks that
the settings compared here really give different numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig
from transformers.modeling_utils import AttentionInterface

from xtf_plugin.config import XTFConfig
from xtf_plugin.data import tokenize_records
from xtf_plugin.errors import XTFError
from xtf_plugin.pipeline import score_dataset
from xtf_plugin.scoring import attention as attention_module
from xtf_plugin.scoring.attention import resolve_layers
from xtf_plugin.scoring.engine import PADDING_SHARE, alone_log_probs, batch_plan, score_forward
from xtf_plugin.scoring.relevance import domain_token_groups, relevance_table

ATOL = 1e-5
NAN = float("nan")

# name -> (LlamaConfig overrides, expected layer lists for each ri_layers spec, written out by hand)
MODELS = {
    # grouped-query attention: 6 query heads share 2 key/value heads (groups of 3)
    "gqa": (
        {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6,
         "num_key_value_heads": 2, "tie_word_embeddings": False},
        {"all": [0, 1, 2], "first": [0], "last": [2], "middle": [1], (0, -1): [0, 2]},
    ),
    # plain multi-head attention, tied embeddings, 4 layers
    "mha": (
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "tie_word_embeddings": True},
        {"all": [0, 1, 2, 3], "first": [0], "last": [3], "middle": [1], (0, -1): [0, 3]},
    ),
}
LAYER_SPECS = ["all", "first", "last", "middle", (0, -1)]

# (length, layout); layouts: "prompt" = prompt then response, "gap" = two trained spans, "all" = every token
# trained (position 0 included), "none" = nothing trained
EXAMPLES = [(40, "prompt"), (9, "prompt"), (27, "gap"), (33, "prompt"), (6, "none"), (14, "prompt"),
            (21, "all"), (38, "gap"), (12, "prompt"), (30, "prompt")]


# --------------------------------------------------------------------------------------------------------
# models and data


def build_tiny_model(
    directory: Path, tokenizer, overrides: dict, seed: int, init: float = 0.2, head_scale: float = 2.0, config_class=LlamaConfig
):
    """A tiny random model (Llama unless `config_class` says otherwise) with peaked attention and LM head, saved
    with its tokenizer in `directory`."""
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        initializer_range=init,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(directory: Path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    return {
        name: build_tiny_model(tmp_path_factory.mktemp(f"ref-{name}"), tiny_tokenizer, overrides, seed=k)
        for k, (name, (overrides, _)) in enumerate(MODELS.items())
    }


@pytest.fixture(scope="module")
def models(model_dirs) -> dict[str, torch.nn.Module]:
    """The models under test: float32, default (SDPA) attention."""
    loaded = {name: load(path) for name, path in model_dirs.items()}
    for model in loaded.values():
        assert model.config._attn_implementation == "sdpa"
        assert model.dtype == torch.float32
    return loaded


@pytest.fixture(scope="module")
def references(model_dirs) -> dict[str, torch.nn.Module]:
    """The same weights in float64 with eager attention."""
    return {name: load(path, dtype=torch.float64, attn_implementation="eager") for name, path in model_dirs.items()}


@pytest.fixture(scope="module")
def models64(model_dirs) -> dict[str, torch.nn.Module]:
    """The models under test in float64 (still SDPA): isolates the scorer's logic from float32 rounding."""
    loaded = {name: load(path, dtype=torch.float64) for name, path in model_dirs.items()}
    assert all(model.config._attn_implementation == "sdpa" for model in loaded.values())
    return loaded


@torch.no_grad()
def make_examples(ref: torch.nn.Module, seed: int = 0, layout=EXAMPLES) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids drawn from the (float64) model itself after a 2-token random start, with 20% of them replaced
    by uniformly random ids, so that p(token) spans (0, 1); labels -100 on the prompt part(s)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = ref.config.vocab_size
    ids, labels = [], []
    for n, kind in layout:
        x = torch.randint(3, vocab, (n,), generator=generator)
        for j in range(2, n):
            if torch.rand((), generator=generator) > 0.2:
                probs = torch.softmax(ref(input_ids=x[None, :j], use_cache=False).logits[0, -1], dim=-1)
                probs[:3] = 0  # no special tokens (id 0, the padding token, has a zero embedding row)
                x[j] = torch.multinomial(probs, 1, generator=generator)[0]
        x = x.numpy().astype(np.int64)
        y = x.copy()
        if kind == "none":
            y[:] = -100
        elif kind != "all":
            prompt = int(torch.randint(2, min(10, n - 2), (), generator=generator))
            y[:prompt] = -100
            if kind == "gap":  # a second prompt part inside the response
                y[prompt + 4 : prompt + 8] = -100
        ids.append(x)
        labels.append(y)
    return ids, labels


@pytest.fixture(scope="module")
def all_examples(references) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    return {name: make_examples(ref, seed=k) for k, (name, ref) in enumerate(references.items())}


@pytest.fixture(scope="module")
def examples(all_examples):
    """The examples of the grouped-query model."""
    return all_examples["gqa"]


# --------------------------------------------------------------------------------------------------------
# reference implementations (float64, eager, one example at a time)


@torch.no_grad()
def reference_forward(ref: torch.nn.Module, ids: np.ndarray) -> dict:
    """Full logits and every layer's attention probabilities of one example."""
    out = ref(input_ids=torch.as_tensor(ids)[None], output_attentions=True, use_cache=False)
    log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)  # [n, V]
    assert len(out.attentions) == ref.config.num_hidden_layers
    return {
        "log_probs": log_probs.numpy(),
        "attentions": [a[0].double().numpy() for a in out.attentions],  # each [heads, n, n]
    }


@pytest.fixture(scope="module")
def reference_outputs(references, all_examples) -> dict[str, list[dict]]:
    return {name: [reference_forward(ref, x) for x in all_examples[name][0]] for name, ref in references.items()}


def scored_positions(labels: np.ndarray) -> np.ndarray:
    mask = labels != -100
    mask[0] = False
    return mask


def reference_kn(forward: dict, ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.full(len(ids), NAN)
    for j in np.flatnonzero(scored_positions(labels)):
        out[j] = 1.0 - np.exp(forward["log_probs"][j - 1, ids[j]])
    return out


def reference_ri(forward: dict, labels: np.ndarray, layers: list[int], exclude_sink: bool) -> np.ndarray:
    n = len(labels)
    out = np.full(n, NAN)
    for j in np.flatnonzero(scored_positions(labels)):
        total = 0.0
        for layer in layers:
            a = forward["attentions"][layer]  # [heads, query i, key j]
            heads = a.shape[0]
            for h in range(heads):
                for i in range(j, n):
                    if exclude_sink:
                        total += a[h, i, j] / (1.0 - a[h, i, 0]) / heads
                    else:
                        total += a[h, i, j] / heads
        out[j] = total / len(layers) / (n - j)
    return out


@torch.no_grad()
def reference_vector(ref: torch.nn.Module, token: int, space: str) -> np.ndarray:
    """Context-free vector of one token: the token fed alone (no BOS), or its input-embedding row."""
    if space == "embedding":
        return ref.get_input_embeddings().weight[token].double().numpy()
    out = ref(input_ids=torch.tensor([[token]]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0, 0].double().numpy()


def reference_relevance(
    ref: torch.nn.Module, ids: list[np.ndarray], labels: list[np.ndarray], groups: list[list[int]], space: str, center: bool
) -> list[np.ndarray]:
    """TR at every response position (labels != -100), one forward per token occurrence; NaN elsewhere."""
    occurrences = {}  # (example, position) -> vector
    for k, (x, y) in enumerate(zip(ids, labels, strict=True)):
        for j in np.flatnonzero(y != -100):
            occurrences[k, j] = reference_vector(ref, int(x[j]), space)
    word_vectors = [np.mean([reference_vector(ref, t, space) for t in group], axis=0) for group in groups]
    domain = np.mean(word_vectors, axis=0)
    if center:
        distinct = {}
        for (k, j), vector in occurrences.items():
            distinct.setdefault(int(ids[k][j]), vector)
        for group in groups:
            for t in group:
                distinct.setdefault(t, reference_vector(ref, t, space))
        mean = np.mean(list(distinct.values()), axis=0)
        domain = domain - mean
    out = [np.full(len(x), NAN) for x in ids]
    for (k, j), vector in occurrences.items():
        v = vector - mean if center else vector
        out[k][j] = v @ domain / (np.linalg.norm(v) * np.linalg.norm(domain))
    return out


@torch.no_grad()
def reference_prompt_gain(ref: torch.nn.Module, forward: dict, ids: np.ndarray, labels: np.ndarray, anchor: int) -> np.ndarray:
    """log p(x_j | x_<j) - log p(x_j | [anchor] + x[first:j]), one forward per scored token."""
    out = np.full(len(ids), NAN)
    trained = np.flatnonzero(labels != -100)
    if not len(trained):
        return out
    first = int(trained[0])
    for j in np.flatnonzero(scored_positions(labels)):
        context = torch.as_tensor(np.concatenate([[anchor], ids[first:j]]))[None]
        alone = torch.log_softmax(ref(input_ids=context, use_cache=False).logits[0, -1].double(), dim=-1)[ids[j]]
        out[j] = forward["log_probs"][j - 1, ids[j]] - float(alone)
    return out


def per_example(scores, name: str) -> list[np.ndarray]:
    return scores.split(name)


def assert_close(actual: list[np.ndarray], expected: list[np.ndarray], atol: float = ATOL, what: str = "") -> None:
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what} NaN pattern, example {k}")
        np.testing.assert_allclose(a, e, atol=atol, rtol=0, err_msg=f"{what} example {k}")


# --------------------------------------------------------------------------------------------------------
# the definitions


def test_resolve_layers_table():
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("first", 5) == [0]
    assert resolve_layers("last", 5) == [4]
    assert resolve_layers("middle", 1) == [0]
    assert resolve_layers("middle", 3) == [1]
    assert resolve_layers("middle", 6) == [2, 3]
    assert resolve_layers("middle", 12) == [4, 5, 6, 7]
    assert resolve_layers([0, -1], 4) == [0, 3]
    assert resolve_layers([-1, 3], 4) == [3]
    with pytest.raises(ValueError):
        resolve_layers([4], 4)
    with pytest.raises(ValueError):
        resolve_layers([-5], 4)


@pytest.mark.parametrize("exclude_sink", [True, False], ids=["sink-excluded", "raw"])
@pytest.mark.parametrize("spec", LAYER_SPECS, ids=lambda s: "list" if isinstance(s, tuple) else s)
@pytest.mark.parametrize("name", list(MODELS))
def test_kn_and_ri_match_reference(name, spec, exclude_sink, models, reference_outputs, all_examples):
    ids, labels = all_examples[name]
    layers = MODELS[name][1][spec]
    ri_layers = list(spec) if isinstance(spec, tuple) else spec
    config = XTFConfig(ri_layers=ri_layers, ri_exclude_sink=exclude_sink, tr_method="vector", batch_size=4)
    scores = score_forward(models[name], ids, labels, config, progress=False)
    forwards = reference_outputs[name]
    assert_close(per_example(scores, "kn"), [reference_kn(f, x, y) for f, x, y in zip(forwards, ids, labels, strict=True)], what="KN")
    assert_close(per_example(scores, "ri"), [reference_ri(f, y, layers, exclude_sink) for f, y in zip(forwards, labels, strict=True)], what="RI")
    # vector TR is the caller's job: score_forward leaves it NaN
    assert np.isnan(scores.tr).all()


def test_references_discriminate(reference_outputs, examples):
    """The settings compared above give clearly different numbers, so a 1e-5 match is informative."""
    ids, labels = examples
    forwards = reference_outputs["gqa"]
    flat = lambda arrays: np.concatenate(arrays)[~np.isnan(np.concatenate(arrays))]  # noqa: E731
    kn = flat([reference_kn(f, x, y) for f, x, y in zip(forwards, ids, labels, strict=True)])
    assert kn.min() < 0.3 and kn.max() > 0.9  # p(token) spans (0, 1)
    ri = {
        (tuple(layers), sink): flat([reference_ri(f, y, layers, sink) for f, y in zip(forwards, labels, strict=True)])
        for layers in ([0], [2]) for sink in (True, False)
    }
    assert np.abs(ri[(0,), True] - ri[(2,), True]).max() > 1e-2
    assert np.abs(ri[(0,), True] - ri[(0,), False]).max() > 1e-2
    # heads differ (so a wrong query-head -> key/value-head assignment would show)
    attention = forwards[0]["attentions"][1]
    assert np.abs(attention[0] - attention[1]).max() > 0.1
    assert np.abs(attention[0] - attention[3]).max() > 0.1


@pytest.mark.parametrize("center", [True, False], ids=["centred", "raw"])
@pytest.mark.parametrize("space", ["hidden", "embedding"])
@pytest.mark.parametrize("name", list(MODELS))
def test_vector_relevance_matches_reference(name, space, center, models, references, all_examples):
    ids, labels = all_examples[name]
    groups = [[5, 17], [33], [120, 7, 250], [int(ids[0][-1])]]  # the last holds a scored token
    distinct = np.unique(np.concatenate([x[y != -100] for x, y in zip(ids, labels, strict=True)]))
    table = relevance_table(models[name], distinct, groups, space, center)
    assert sorted(table) == distinct.tolist()
    actual = [np.array([table[int(t)] if label != -100 else NAN for t, label in zip(x, y, strict=True)]) for x, y in zip(ids, labels, strict=True)]
    expected = reference_relevance(references[name], ids, labels, groups, space, center)
    assert_close(actual, expected, what=f"TR {space} center={center}")
    values = np.concatenate(expected)
    assert np.nanmax(values) - np.nanmin(values) > 0.3  # the cosines are spread out


@pytest.fixture(scope="module")
def reference_gains(references, reference_outputs, all_examples):
    """(model name, anchor) -> reference prompt gain of every example (computed once)."""
    memo = {}

    def gains(name: str, anchor: int) -> list[np.ndarray]:
        if (name, anchor) not in memo:
            ids, labels = all_examples[name]
            memo[name, anchor] = [
                reference_prompt_gain(references[name], f, x, y, anchor)
                for f, x, y in zip(reference_outputs[name], ids, labels, strict=True)
            ]
        return memo[name, anchor]

    return gains


def score_with_gain(model, ids, labels, config):
    """`score_forward`, then the second pass over every whole response: TR holds the prompt gain."""
    scores = score_forward(model, ids, labels, config, progress=False)
    scores.tr = scores.tr - alone_log_probs(model, ids, labels, [len(x) for x in ids], config, progress=False)
    return scores


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("anchor_from", ["bos", "eos"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prompt_gain_matches_reference(name, anchor_from, dtype, models, models64, reference_gains, reference_outputs, all_examples):
    ids, labels = all_examples[name]
    model = (models if dtype == "float32" else models64)[name]
    bos, eos = model.config.bos_token_id, model.config.eos_token_id
    assert bos is not None and bos != eos
    config = XTFConfig(tr_method="prompt_gain", ri_layers="all", batch_size=3)
    try:
        if anchor_from == "eos":
            model.config.bos_token_id = None
        scores = score_with_gain(model, ids, labels, config)
    finally:
        model.config.bos_token_id = bos
    expected = reference_gains(name, bos if anchor_from == "bos" else eos)
    # Prompt gain is a difference of log-probabilities of up to ~15 in magnitude; a float32 forward pass is
    # only good to ~1e-6 relative there (measured: up to 1.0e-5 absolute), hence the small rtol. With the
    # float64 model the plain 1e-5 holds (measured <= 4e-6: the scorer's log-softmax itself runs in float32).
    rtol = 2e-6 if dtype == "float32" else 0.0
    actual = per_example(scores, "tr")
    for k, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"prompt gain NaN pattern, example {k}")
        np.testing.assert_allclose(a, e, atol=ATOL, rtol=rtol, err_msg=f"prompt gain, example {k}")
    forwards = reference_outputs[name]
    assert_close(per_example(scores, "kn"), [reference_kn(f, x, y) for f, x, y in zip(forwards, ids, labels, strict=True)], what="KN")
    # the anchor matters: the other anchor gives clearly different numbers
    other = reference_gains(name, eos if anchor_from == "bos" else bos)
    assert max(np.nanmax(np.abs(o - e)) for o, e in zip(other, expected, strict=True) if not np.isnan(e).all()) > 1e-2


# --------------------------------------------------------------------------------------------------------
# batching, order, and leaving the model alone


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batch_size_does_not_change_scores(dtype, models, models64, references):
    """Batches of 1, 3 and 8 mixed-length (right-padded) examples give the same scores.

    1e-6 holds exactly for the scorer's own logic (float64 model). A float32 model is not batch-invariant to
    1e-6 by itself: SDPA over a padded batch and the LM head over a different number of rows round
    differently (measured ~3e-6 on hidden states and on log-probabilities of ~-14, outside xtf_plugin), so
    float32 gets 1e-5 (and 5e-5 on prompt gain, a difference of such log-probabilities).
    """
    rng = np.random.default_rng(7)
    layout = [(int(n), str(kind)) for n, kind in zip(rng.integers(5, 41, 11), rng.choice(["prompt", "gap", "all"], 11), strict=True)]
    layout = [(n, "prompt" if kind == "gap" and n < 16 else kind) for n, kind in layout]
    ids, labels = make_examples(references["gqa"], seed=3, layout=layout)
    model = (models if dtype == "float32" else models64)["gqa"]
    results = {
        size: score_with_gain(model, ids, labels, XTFConfig(ri_layers="all", tr_method="prompt_gain", batch_size=size))
        for size in (1, 3, 8)
    }
    tolerance = {"kn": 1e-6, "ri": 1e-6, "tr": 1e-6} if dtype == "float64" else {"kn": 1e-5, "ri": 1e-6, "tr": 5e-5}
    for size in (3, 8):
        np.testing.assert_array_equal(results[size].offsets, results[1].offsets)
        for field, atol in tolerance.items():
            a, b = getattr(results[size], field), getattr(results[1], field)
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
            np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"{field} batch {size}")


def test_batch_plan_fills_batches_up_to_the_token_budget():
    lengths = [int(n) for n in np.random.default_rng(0).integers(1, 120, 200)]
    plan = batch_plan(lengths, 8, 300)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    assert [i for batch in plan for i in batch] == order  # every example once, longest first
    for batch, following in zip(plan, [*plan[1:], None], strict=True):
        padded = len(batch) * lengths[batch[0]]
        padding = padded - sum(lengths[i] for i in batch)
        assert len(batch) <= 8 and (padded <= 300 or len(batch) == 1) and padding <= PADDING_SHARE * 300
        if following is not None:  # a batch closes only when the next example does not fit
            more = padding + lengths[batch[0]] - lengths[following[0]]
            assert len(batch) == 8 or (len(batch) + 1) * lengths[batch[0]] > 300 or more > PADDING_SHARE * 300
    assert batch_plan([500, 20, 10], 8, 300) == [[0], [1, 2]]  # too long for the budget: a batch of its own
    # a few long examples do not pad many short ones to their length: 40 padding tokens at most of 320
    assert batch_plan([80, 60, 20, 20, 20, 20], 8, 320) == [[0, 1], [2, 3, 4, 5]]
    assert batch_plan(lengths, 8) == [order[i : i + 8] for i in range(0, 200, 8)]  # no budget: by count


def test_token_budget_changes_the_batches_not_the_scores(models64, references):
    """Long examples a few at a time, short ones many at a time: the scores stay those of one example per batch;
    a budget that changes no batch changes no bit."""
    ids, labels = make_examples(references["gqa"], seed=5, layout=[(n, "all") for n in (40, 38, 12, 9, 30, 7, 6, 25)])
    model = models64["gqa"]

    def scores(**settings):
        return score_forward(model, ids, labels, XTFConfig(ri_layers="all", **settings), progress=False)

    alone, budget = scores(batch_size=1), scores(batch_size=8, batch_tokens=80)
    assert [len(b) for b in batch_plan([len(x) for x in ids], 8, 80)] == [2, 2, 3, 1]  # padding: 10 tokens at most
    for field in ("kn", "ri"):
        np.testing.assert_allclose(getattr(budget, field), getattr(alone, field), atol=1e-6, rtol=0, equal_nan=True)
    same_plan = scores(batch_size=8, batch_tokens=10_000)
    for field in ("kn", "ri"):
        np.testing.assert_array_equal(getattr(same_plan, field), getattr(scores(batch_size=8), field))


def test_results_come_back_in_input_order(models, examples):
    ids, labels = examples
    config = XTFConfig(ri_layers="all", batch_size=3)
    base = score_forward(models["gqa"], ids, labels, config, progress=False)
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = score_forward(models["gqa"], [ids[i] for i in order], [labels[i] for i in order], config, progress=False)
    np.testing.assert_array_equal(np.diff(shuffled.offsets), [len(ids[i]) for i in order])
    for field in ("kn", "ri"):
        expected = [per_example(base, field)[i] for i in order]
        assert_close(per_example(shuffled, field), expected, atol=1e-6, what=field)


def test_empty_input(models):
    scores = score_forward(models["gqa"], [], [], XTFConfig(), progress=False)
    assert scores.n_examples == 0 and scores.n_tokens == 0


def snapshot_mapping() -> dict:
    return dict(AttentionInterface._global_mapping)


def assert_mapping_is(before: dict) -> None:
    """Every entry registered before is the same function; the capture added at most its own names."""
    after = AttentionInterface._global_mapping
    assert all(key.startswith("xtf_capture_") for key in after.keys() - before.keys())
    for key, function in before.items():
        assert after[key] is function, key
    assert not attention_module._OBSERVERS


def test_model_left_alone(models, examples):
    """The model runs the capture's wrapper of SDPA (registered under its own name: the "sdpa" entry is never
    replaced), no module is asked for attention weights, the model gets SDPA back."""
    model = models["gqa"]
    ids, labels = examples
    before = snapshot_mapping()
    calls, problems = [], []
    decoder = model.get_decoder()

    def pre_hook(module, args, kwargs):
        calls.append(type(module).__name__)
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            problems.append(f"{type(module).__name__} called with {sorted(kwargs)}")
        if model.config._attn_implementation != "xtf_capture_sdpa":
            problems.append(f"attn implementation {model.config._attn_implementation}")
        if AttentionInterface._global_mapping["sdpa"] is not before["sdpa"]:
            problems.append("the global sdpa entry was replaced during scoring")

    def attention_hook(module, args, kwargs, output):
        if output[1] is not None:
            problems.append("attention weights were materialised by the model")

    watched = [decoder, *decoder.layers]
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in watched]
    handles += [layer.self_attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in decoder.layers]
    handles += [layer.self_attn.register_forward_hook(attention_hook, with_kwargs=True) for layer in decoder.layers]
    handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        model.train()  # scoring switches to eval and back
        score_forward(model, ids, labels, XTFConfig(ri_layers="all", tr_method="prompt_gain", batch_size=4), progress=False)
        assert model.training
    finally:
        model.eval()
        for handle in handles:
            handle.remove()
    # the prompt gain's second pass reads no attention (the model's own SDPA) and switches the mode back too
    model.train()
    alone_log_probs(model, ids, labels, [len(x) for x in ids], XTFConfig(batch_size=4), progress=False)
    assert model.training
    model.eval()
    assert not problems, problems[:5]
    assert "LlamaAttention" in calls
    assert model.config._attn_implementation == "sdpa"
    assert not model.config.output_attentions
    assert_mapping_is(before)


def test_mapping_restored_after_exception(models, examples):
    model = models["gqa"]
    ids, labels = examples
    before = snapshot_mapping()
    config = XTFConfig(ri_layers="all", batch_size=4)
    reference = score_forward(model, ids, labels, config, progress=False)

    def explode(module, args):
        raise RuntimeError("boom inside the forward pass")

    handle = model.get_decoder().layers[1].register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            score_forward(model, ids, labels, config, progress=False)
    finally:
        handle.remove()
    assert_mapping_is(before)
    with pytest.raises((IndexError, RuntimeError)):  # a token id outside the vocabulary
        score_forward(model, [np.array([1, 2, 10**6])], [np.array([-100, 2, 10**6])], config, progress=False)
    assert_mapping_is(before)
    again = score_forward(model, ids, labels, config, progress=False)  # nothing left over from the failures
    np.testing.assert_array_equal(again.kn, reference.kn)
    np.testing.assert_array_equal(again.ri, reference.ri)


# Gemma 2 runs eager attention (as recommended for it) with attention-logit soft-capping, and a sliding window
# (layer 0 here) shorter than the examples: both must be honoured by the scorer.
GEMMA2 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0,
          "sliding_window": 8}


def split_capture_into_chunks(monkeypatch, rows: int) -> None:
    """Make the RI capture work in chunks of `rows` query rows (real models get >= 64), so that examples of
    tens of tokens cross chunk boundaries: causal truncation, the diagonal block and the window per chunk."""
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(attention_module, "_MIN_CHUNK_ROWS", rows)


@pytest.mark.parametrize("rows", [5, 16])
@pytest.mark.parametrize("exclude_sink", [True, False], ids=["sink-excluded", "raw"])
def test_ri_in_chunks_matches_reference(rows, exclude_sink, monkeypatch, models, reference_outputs, all_examples):
    split_capture_into_chunks(monkeypatch, rows)
    ids, labels = all_examples["gqa"]
    config = XTFConfig(ri_layers="all", ri_exclude_sink=exclude_sink, batch_size=4)
    scores = score_forward(models["gqa"], ids, labels, config, progress=False)
    expected = [reference_ri(f, y, [0, 1, 2], exclude_sink) for f, y in zip(reference_outputs["gqa"], labels, strict=True)]
    assert_close(per_example(scores, "ri"), expected, what="RI")


def test_capture_refuses_left_padding():
    query, key = torch.zeros(1, 2, 4, 8), torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="right-padded"):
        attention_module.attention_received(query, key, torch.tensor([[False, True, True, True]]), 1.0, True)


@pytest.mark.parametrize("rows", [None, 5], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eager_models_match_reference(family, rows, model_dirs, tmp_path, tiny_tokenizer, monkeypatch):
    """A model loaded with eager attention is scored with its own eager attention; the mapping never gets an
    'eager' entry."""
    if rows:
        split_capture_into_chunks(monkeypatch, rows)
    if family == "llama":
        directory = model_dirs["gqa"]
        layers = [0, 1, 2]
    else:
        directory = build_tiny_model(tmp_path / "gemma2", tiny_tokenizer, GEMMA2, seed=5, config_class=Gemma2Config)
        layers = [0, 1]
    reference = load(directory, dtype=torch.float64, attn_implementation="eager")
    model = load(directory, attn_implementation="eager")
    if family == "gemma2":
        assert model.config.layer_types[0] == "sliding_attention"
    ids, labels = make_examples(reference, seed=9, layout=EXAMPLES[:5])
    assert max(len(x) for x in ids) > 4 * GEMMA2["sliding_window"]
    forwards = [reference_forward(reference, x) for x in ids]
    before = snapshot_mapping()
    assert "eager" not in before
    for sink in (True, False):
        scores = score_forward(model, ids, labels, XTFConfig(ri_layers="all", ri_exclude_sink=sink, batch_size=2), progress=False)
        assert_close(per_example(scores, "kn"), [reference_kn(f, x, y) for f, x, y in zip(forwards, ids, labels, strict=True)], what="KN")
        assert_close(per_example(scores, "ri"), [reference_ri(f, y, layers, sink) for f, y in zip(forwards, labels, strict=True)], what="RI")
    assert_mapping_is(before)
    assert model.config._attn_implementation == "eager"


# --------------------------------------------------------------------------------------------------------
# other precisions and broken models


def assert_loosely_close(low, high, field: str, max_diff: float, mean_diff: float) -> None:
    """Same NaN pattern, finite where scored, max and mean absolute differences bounded."""
    a, b = getattr(low, field), getattr(high, field)
    scored = ~np.isnan(b)
    np.testing.assert_array_equal(np.isnan(a), ~scored, err_msg=field)
    assert np.isfinite(a[scored]).all(), field
    difference = np.abs(a[scored] - b[scored])
    assert difference.max() <= max_diff, (field, float(difference.max()))
    assert difference.mean() <= mean_diff, (field, float(difference.mean()))


def test_bfloat16_close_to_float32(model_dirs, models, examples):
    ids, labels = examples
    config = XTFConfig(ri_layers="all", tr_method="prompt_gain", batch_size=4)
    model = load(model_dirs["gqa"], dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    low = score_with_gain(model, ids, labels, config)
    high = score_with_gain(models["gqa"], ids, labels, config)
    # measured on this model: KN max 0.047 / mean 0.0035, RI max 0.002, prompt gain max 0.32 / mean 0.067
    assert_loosely_close(low, high, "kn", max_diff=0.1, mean_diff=0.01)
    assert_loosely_close(low, high, "ri", max_diff=0.02, mean_diff=0.005)
    assert_loosely_close(low, high, "tr", max_diff=1.0, mean_diff=0.2)
    distinct = np.unique(np.concatenate([x[y != -100] for x, y in zip(ids, labels, strict=True)]))
    groups = [[5, 17], [33]]
    tr_low = relevance_table(model, distinct, groups, "hidden", True)
    tr_high = relevance_table(models["gqa"], distinct, groups, "hidden", True)
    assert max(abs(tr_low[t] - tr_high[t]) for t in tr_high) < 0.1  # measured 0.017


def test_bitsandbytes_4bit(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    # hidden 64 so that every quantised matrix has a bitsandbytes-friendly shape
    directory = build_tiny_model(
        tmp_path / "bnb", tiny_tokenizer, {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False},
        seed=11, init=0.1, head_scale=3.0,
    )
    full = load(directory)
    ids, labels = make_examples(full, seed=5, layout=EXAMPLES[:6])
    config = XTFConfig(ri_layers="all", batch_size=4)
    high = score_forward(full, ids, labels, config, progress=False)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' CPU fallback warns
        quantized = load(directory, quantization_config=quantization, device_map={"": "cpu"})
        assert type(quantized.get_decoder().layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        assert type(quantized.get_decoder().layers[1].mlp.down_proj).__name__ == "Linear4bit"
        low = score_forward(quantized, ids, labels, config, progress=False)
        distinct = np.unique(np.concatenate([x[y != -100] for x, y in zip(ids, labels, strict=True)]))
        table = relevance_table(quantized, distinct, [[5, 17], [33]], "hidden", True)
    assert all(np.isfinite(v) for v in table.values())
    # nf4 is coarse: measured KN max 0.25 / mean 0.024 / correlation 0.92, RI max 0.01
    assert_loosely_close(low, high, "kn", max_diff=0.5, mean_diff=0.06)
    assert_loosely_close(low, high, "ri", max_diff=0.05, mean_diff=0.01)
    scored = ~np.isnan(high.kn)
    assert np.corrcoef(low.kn[scored], high.kn[scored])[0, 1] > 0.8
    assert np.ptp(high.kn[scored]) > 0.5  # the comparison spans a real range of KN


@pytest.mark.parametrize("broken", ["all", "one layer"])
def test_nan_weights_raise(model_dirs, examples, broken):
    model = load(model_dirs["gqa"])
    with torch.no_grad():
        if broken == "all":
            for parameter in model.parameters():
                parameter.fill_(NAN)
        else:
            model.get_decoder().layers[1].mlp.down_proj.weight.fill_(NAN)
    ids, labels = examples
    before = snapshot_mapping()
    with pytest.raises(XTFError, match="NaN"):
        score_forward(model, ids, labels, XTFConfig(batch_size=4), progress=False)
    assert_mapping_is(before)


# --------------------------------------------------------------------------------------------------------
# end to end


def test_score_dataset_end_to_end(models, references, tiny_tokenizer, tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7 apples.\n#### 7"},
        {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
        {"question": "Sara pays 5 dollars.", "answer": "She pays 5 dollars in total.\n#### 5"},
        {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"},
    ]
    data = tokenize_records(rows, tiny_tokenizer, format="alpaca", max_length=40)
    assert all(len(x) <= 40 for x in data.input_ids) and not data.no_response
    words = ["apples", "dollars", "total"]
    config = XTFConfig(tr_method="vector", tr_domain_words=words, ri_layers="all", batch_size=3, cache_dir=str(tmp_path / "cache"))
    model = models["gqa"]
    scored = score_dataset(model, tiny_tokenizer, data, config, progress=False, use_cache=False)
    direct = score_forward(model, data.input_ids, data.labels, config, progress=False)
    np.testing.assert_array_equal(scored.scores.offsets, direct.offsets)
    np.testing.assert_array_equal(scored.scores.kn, direct.kn)
    np.testing.assert_array_equal(scored.scores.ri, direct.ri)
    response = np.concatenate([y != -100 for y in data.labels])
    np.testing.assert_array_equal(scored.response, response)
    assert np.isfinite(scored.scores.tr[response]).all()
    assert np.isnan(scored.scores.tr[~response]).all()
    groups = domain_token_groups(tiny_tokenizer, words)
    expected = reference_relevance(references["gqa"], data.input_ids, data.labels, groups, "hidden", True)
    assert_close(scored.scores.split("tr"), expected, what="pipeline TR")
    assert scored.domain_words == words


def test_without_ri_layers_the_model_runs_its_own_attention(models, examples):
    """`ri_layers: none` (the spans preset's): no capture, RI NaN, and the same KN bits as a run with the capture."""
    model = models["gqa"]
    ids, labels = examples
    seen = []
    handles = [layer.self_attn.register_forward_pre_hook(lambda m, a: seen.append(model.config._attn_implementation))
               for layer in model.get_decoder().layers]
    try:
        plain = score_forward(model, ids, labels, XTFConfig(ri_layers="none", batch_size=4), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {"sdpa"}
    assert np.isnan(plain.ri).all()
    captured = score_forward(model, ids, labels, XTFConfig(ri_layers="middle", batch_size=4), progress=False)
    np.testing.assert_array_equal(plain.kn, captured.kn)
    assert np.isfinite(captured.ri[np.isfinite(captured.kn)]).all()
