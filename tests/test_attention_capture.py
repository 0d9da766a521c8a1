"""The RI attention capture switches only the model it scores.

`capture_attention_received` must leave every other model in the process alone: a training model or a second
model of the same attention implementation runs its own, unwrapped function with bit-identical results while
another model is being scored, and transformers' attention registry keeps the entries it had. The models are
tiny random transformers models built from a config, run on CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from xtf_plugin.scoring.attention import capture_attention_received

IMPLEMENTATIONS = ["sdpa", "eager"]
LAYERS = [0, 1]


def tiny_llama(implementation: str, seed: int, config: LlamaConfig | None = None) -> torch.nn.Module:
    """A 2-layer grouped-query Llama (hidden 32, 4 heads, 2 KV heads), vocab 100, with peaked attention."""
    torch.manual_seed(seed)
    config = config or LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ids `[3, 12]` and right-padded bool validity `[3, 12]` (lengths 12, 9, 5)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 12), generator=generator)
    valid = torch.arange(12)[None, :] < torch.tensor([[12], [9], [5]])
    return ids.masked_fill(~valid, 0), valid


def logits(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=valid.long(), use_cache=False).logits


def training_step(
    model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one training forward/backward pass (the model in train mode, then back to eval)."""
    model.train()
    model.zero_grad()
    labels = ids.masked_fill(~valid, -100)
    loss = model(input_ids=ids, attention_mask=valid.long(), labels=labels, use_cache=False).loss
    loss.backward()
    model.eval()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def resolved_attention(model: torch.nn.Module) -> list:
    """The attention function each attention layer of `model` looks up right now, as its forward pass does."""
    functions = []
    for layer in model.get_decoder().layers:
        attention = layer.self_attn
        eager = sys.modules[type(attention).__module__].eager_attention_forward
        functions.append(ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager))
    return functions


def watch_attention(model: torch.nn.Module, seen: list) -> list:
    """Record, from inside every forward pass, which attention function each of `model`'s layers looks up."""

    def record(module, args, kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        seen.append(ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager))

    return [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True) for layer in model.get_decoder().layers]


def registry() -> tuple[dict, dict]:
    """transformers' global attention and mask registries, entry by entry."""
    return dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)


def assert_existing_entries_kept(before: tuple[dict, dict]) -> None:
    """Every name registered before maps to the very same function (new names may have been added)."""
    for old, new in zip(before, registry(), strict=True):
        for name, function in old.items():
            assert new[name] is function, name


def score(model: torch.nn.Module, ids: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and RI `[B, L]` of one captured forward pass over the chosen layers."""
    with capture_attention_received(model, LAYERS, exclude_sink=True) as capture:
        capture.begin(valid)
        out = logits(model, ids, valid)
        ri = capture.result()
        capture.end()
    return out, ri


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_second_model_untouched_inside_capture(implementation):
    """While model A is being scored, a model B of the same implementation (evaluated, and trained) runs its own
    attention function with bit-identical results, and adds nothing to A's capture."""
    a, b = tiny_llama(implementation, seed=0), tiny_llama(implementation, seed=1)
    ids, valid = batch(0)
    b_ids, b_valid = batch(1)
    a_logits, a_ri = score(a, ids, valid)
    b_logits = logits(b, b_ids, b_valid)
    b_loss, b_grads = training_step(b, b_ids, b_valid)
    b_functions = resolved_attention(b)
    seen: list = []
    handles = watch_attention(b, seen)
    try:
        with capture_attention_received(a, LAYERS, exclude_sink=True) as capture:
            b_implementation = b.config._attn_implementation
            capture.begin(valid)
            inside_a = logits(a, ids, valid)
            inside_b = logits(b, b_ids, b_valid)
            inside_loss, inside_grads = training_step(b, b_ids, b_valid)
            layers_seen = list(capture.layers_seen)
            inside_ri = capture.result()
            capture.end()
    finally:
        for handle in handles:
            handle.remove()
    assert b_implementation == implementation
    assert seen == b_functions * 2  # the evaluation pass and the training pass
    assert layers_seen == LAYERS  # A's layers once each, none of B's
    assert torch.equal(inside_b, b_logits)
    assert torch.equal(inside_loss, b_loss)
    assert all(torch.equal(x, y) for x, y in zip(inside_grads, b_grads, strict=True))
    assert torch.equal(inside_a, a_logits)
    assert torch.equal(inside_ri, a_ri)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_capture_leaves_registry_and_config_as_found(implementation):
    """Scoring gives the model's own outputs bit for bit; afterwards the config has its implementation back and
    every registry entry is the object it was; the capture's registered name is reused, not re-registered."""
    model = tiny_llama(implementation, seed=0)
    ids, valid = batch(0)
    plain = logits(model, ids, valid)
    before = registry()
    functions = resolved_attention(model)
    first, _ = score(model, ids, valid)
    assert model.config._attn_implementation == implementation
    assert resolved_attention(model) == functions
    assert_existing_entries_kept(before)
    after_first = registry()
    second, _ = score(model, ids, valid)
    assert registry() == after_first  # nothing new the second time
    assert_existing_entries_kept(after_first)
    assert torch.equal(first, plain)
    assert torch.equal(second, plain)
    assert torch.equal(logits(model, ids, valid), plain)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_restored_after_exception(implementation):
    model = tiny_llama(implementation, seed=0)
    ids, valid = batch(0)
    plain = logits(model, ids, valid)
    before = registry()
    functions = resolved_attention(model)

    def explode(module, args):
        raise RuntimeError("boom inside the forward pass")

    handle = model.get_decoder().layers[1].register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"), capture_attention_received(model, LAYERS, True) as capture:
            capture.begin(valid)
            logits(model, ids, valid)
    finally:
        handle.remove()
    assert model.config._attn_implementation == implementation
    assert resolved_attention(model) == functions
    assert_existing_entries_kept(before)
    seen = list(capture.layers_seen)
    assert torch.equal(logits(model, ids, valid), plain)
    # the failed capture no longer listens, even when the model runs the wrapper again (for a model that shares
    # its config and is being scored)
    other = tiny_llama(implementation, seed=1, config=model.config)
    with capture_attention_received(other, LAYERS, exclude_sink=True):
        assert torch.equal(logits(model, ids, valid), plain)
    assert capture.layers_seen == seen


def test_shared_config_model_runs_its_own_attention():
    """A model built on the scored model's very config object switches with it, but is never observed and
    computes exactly what it computes outside the capture."""
    a = tiny_llama("sdpa", seed=0)
    b = tiny_llama("sdpa", seed=1, config=a.config)
    assert b.config is a.config
    ids, valid = batch(0)
    b_logits = logits(b, ids, valid)
    _, a_ri = score(a, ids, valid)
    with capture_attention_received(a, LAYERS, exclude_sink=True) as capture:
        capture.begin(valid)
        logits(a, ids, valid)
        assert torch.equal(logits(b, ids, valid), b_logits)
        assert capture.layers_seen == LAYERS
        assert torch.equal(capture.result(), a_ri)
    assert a.config._attn_implementation == "sdpa"


def test_nested_capture_of_one_model():
    """An inner capture of the same model takes its layers over and hands them back on exit."""
    model = tiny_llama("sdpa", seed=0)
    ids, valid = batch(0)
    plain = logits(model, ids, valid)
    with capture_attention_received(model, LAYERS, exclude_sink=True) as outer:
        outer.begin(valid)
        with capture_attention_received(model, LAYERS, exclude_sink=True) as inner:
            inner.begin(valid)
            assert torch.equal(logits(model, ids, valid), plain)
            assert inner.layers_seen == LAYERS and outer.layers_seen == []
        assert model.config._attn_implementation != "sdpa"
        assert torch.equal(logits(model, ids, valid), plain)
        assert outer.layers_seen == LAYERS and inner.layers_seen == LAYERS
        assert torch.equal(outer.result(), inner.result())
    assert model.config._attn_implementation == "sdpa"


def test_sub_configs_switched_and_restored_each_to_its_own():
    """A model whose sub-configs use different implementations (Gemma 3: text SDPA, vision eager) has every one
    switched during the capture and given its own back afterwards."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma3Config(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 4,
                     "max_position_embeddings": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 8},
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )
    config._attn_implementation = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    model = Gemma3ForConditionalGeneration(config).eval()
    configs = {"model": model.config, "text": model.config.text_config, "vision": model.config.vision_config}
    expected = {"model": "sdpa", "text": "sdpa", "vision": "eager"}
    assert {key: c._attn_implementation for key, c in configs.items()} == expected
    ids, valid = batch(0)
    plain = logits(model, ids, valid)
    before = registry()
    with capture_attention_received(model, LAYERS, exclude_sink=True) as capture:
        assert all(c._attn_implementation not in ("sdpa", "eager") for c in configs.values())
        capture.begin(valid)
        assert torch.equal(logits(model, ids, valid), plain)
        assert capture.layers_seen == LAYERS
    assert {key: c._attn_implementation for key, c in configs.items()} == expected
    assert_existing_entries_kept(before)


def test_implementation_that_reads_its_name_from_the_config():
    """An implementation that looks itself up by `module.config._attn_implementation` (flash attention picks its
    kernel that way) still finds its own name inside the capture."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    name = "xtf_test_reads_its_name"
    names: list[str] = []

    def reads_its_name(module, *args, **kwargs):
        names.append(module.config._attn_implementation)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, reads_its_name)
    AttentionMaskInterface.register(name, sdpa_mask)
    model = tiny_llama(name, seed=0)
    ids, valid = batch(0)
    plain = logits(model, ids, valid)
    inside, _ = score(model, ids, valid)
    assert torch.equal(inside, plain)
    assert names == [name] * 4
    assert model.config._attn_implementation == name
