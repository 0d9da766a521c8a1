"""Loading the scoring model and its tokenizer from a local folder or a hub name."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xtf_plugin.demo import resolve_model_path
from xtf_plugin.errors import XTFError

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Importing peft imports torchao when it is installed, which logs a warning per CUDA kernel library it cannot
# load and makes torch log a deprecation per Enum it registers; it also imports bitsandbytes, whose CPU backend
# on a CPU with AVX512-BF16 fetches a kernel from the hub at import and, offline, warns twice that it falls
# back to its own. Nothing a user of XTF can act on, and it would bury XTF's one-line errors.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree", "bitsandbytes")
# A warning, not a log line, and a filter for the process: warnings.catch_warnings around the imports would also
# drop the filters the imported libraries install for themselves (accelerate's, torchao's).
warnings.filterwarnings("ignore", message=r"Skipping publisher trust check for 'kernels-community/", category=UserWarning)


@contextlib.contextmanager
def import_noise_silenced() -> Iterator[None]:
    """Those loggers at ERROR while the block runs (the imports that emit them), as they were afterwards."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def import_model_libraries(with_peft: bool = False) -> None:
    """Import torch, transformers and, `with_peft` (training: TRL imports it), peft when installed, without their
    import-time noise. Scoring leaves peft out: it adds about 1.7 s to every process (bitsandbytes among its
    imports) and loading a model does not need it."""
    with import_noise_silenced():
        import torch  # noqa: F401
        import transformers  # noqa: F401

        if with_peft:
            with contextlib.suppress(ImportError):
                import peft  # noqa: F401


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a model (`demo` resolves to the demo model)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    _check_exists(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:
        raise XTFError(f"--model {name_or_path}: cannot load a tokenizer ({type(error).__name__}: {error})") from error


def load_model(name_or_path: str, dtype: str = "auto", load_in_4bit: bool = False, device: str | None = None) -> Any:
    """A causal LM in eval mode for scoring.

    Args:
        name_or_path: local folder, hub name, or `demo`.
        dtype: `auto` (bfloat16 on a GPU that supports it, else float32), `float32`, `bfloat16`, `float16`.
        load_in_4bit: quantise to 4-bit nf4 with bitsandbytes (what QLoRA trains on).
        device: `cpu`, `cuda`, ...; default: the first GPU if there is one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise XTFError(f"--dtype: unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    path = resolve_model_path(name_or_path)
    _check_exists(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        on_bf16_gpu = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if on_bf16_gpu else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
    try:
        with import_noise_silenced():  # from_pretrained imports torchao (and bitsandbytes for 4-bit) on first use
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as error:
        raise XTFError(f"--model {name_or_path}: cannot load the model ({type(error).__name__}: {error})") from error
    if not load_in_4bit:
        model.to(device)
    return model.eval()


def check_model_path(name_or_path: str) -> None:
    """Raise `XTFError` for a local-looking model path that does not exist (cheap: imports nothing heavy)."""
    if name_or_path != "demo":
        _check_exists(name_or_path)


def _check_exists(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not Path(path).expanduser().exists():
        raise XTFError(f"--model {path}: no such folder")
