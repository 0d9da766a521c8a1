"""Shared fixtures: a tiny tokenizer trained here and tiny random Llama models, so no test needs the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE = Path(__file__).resolve().parent.parent / "xtf_plugin" / "sample_data" / "gsm8k_sample.jsonl"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def gsm8k_rows(n: int) -> list[dict]:
    """The first n rows of the bundled GSM8K sample."""
    with SAMPLE.open() as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


def build_tokenizer(directory: Path, chat_template: bool = True, pad_token: bool = True):
    """A byte-level BPE tokenizer (vocab 400) trained on the bundled sample, ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [row["question"] + "\n" + row["answer"] for row in gsm8k_rows(200)]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>" if pad_token else None,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_model(directory: Path, tokenizer, layers: int = 2, seed: int = 0, hidden_size: int = 32,
                max_positions: int = 1024):
    """A tiny random Llama (hidden 32, 4 heads, 2 KV heads) saved next to its tokenizer; hidden_size 64 and
    up can be quantised to 4 bits by bitsandbytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Llama and its tokenizer (loadable with from_pretrained)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(directory)
    build_model(directory, tokenizer)
    return directory


@pytest.fixture(scope="session")
def model64_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random Llama of hidden size 64 (4-bit capable) and its tokenizer."""
    directory = tmp_path_factory.mktemp("llama64")
    build_model(directory, build_tokenizer(directory), hidden_size=64)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A fresh score cache for one test (also exported as XTF_CACHE for subprocesses)."""
    directory = tmp_path / "xtf-cache"
    monkeypatch.setenv("XTF_CACHE", str(directory))
    return directory


@pytest.fixture
def gsm8k_jsonl(tmp_path) -> Path:
    """A 12-row GSM8K JSONL file (question/answer)."""
    path = tmp_path / "gsm8k12.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_rows(12)))
    return path
