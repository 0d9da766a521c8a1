"""Reading a dataset and tokenising it into `input_ids` + `labels` (-100 on tokens that are not trained).

Formats (`--format`, default `auto`, which picks by column names):

| format | columns | tokenised as |
|---|---|---|
| `messages` | `messages` (list of `{role, content}`) | the tokenizer's chat template; assistant turns trained |
| `alpaca` | `instruction`, `input` (optional), `output`; or `question`, `answer` | one user + one assistant turn through the chat template; without a template, the Alpaca prompt text |
| `prompt-completion` | `prompt`, `completion` (strings, or message lists) | strings: prompt + completion + EOS, completion trained (as `trl sft` does); lists: chat template |
| `tokenized` | `input_ids` and `labels` (or `completion_mask`) | used as they are |

Rows keep their input order and none is dropped: an example longer than `max_length` is truncated (kept
start) and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from xtf_plugin.errors import XTFError

FORMATS = ("auto", "messages", "alpaca", "prompt-completion", "tokenized")
_REQUIRED = {
    "messages": [("messages",)],
    "alpaca": [("instruction", "output"), ("question", "answer")],
    "prompt-completion": [("prompt", "completion")],
    "tokenized": [("input_ids", "labels"), ("input_ids", "completion_mask")],
}
_ALPACA_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


@dataclass
class TokenizedData:
    """Tokenised examples, in input order.

    Attributes:
        input_ids: one int64 array `[L_i]` per example.
        labels: one int64 array `[L_i]` per example; -100 where not trained.
        truncated: how many examples were cut to `max_length`.
        format: the format used.
        no_response: indices (0-based) of examples without a trained token (e.g. cut before the response).
        empty_response: indices of examples whose response text is empty: kept, as TRL and axolotl keep them,
            with only the EOS / end-of-turn token trained.
    """

    input_ids: list[np.ndarray]
    labels: list[np.ndarray]
    truncated: int = 0
    format: str = "tokenized"
    no_response: list[int] = field(default_factory=list)
    empty_response: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def save(self, path: str | Path) -> None:
        """Write to an `.npz` file (token ids and labels as int32: 8 bytes a token)."""
        lengths = np.array([len(x) for x in self.input_ids], np.int64)
        flat = (np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
                for arrays in (self.input_ids, self.labels))
        np.savez(path, input_ids=next(flat), labels=next(flat), lengths=lengths, truncated=self.truncated,
                 format=self.format, no_response=np.array(self.no_response, np.int64),
                 empty_response=np.array(self.empty_response, np.int64))

    @classmethod
    def load(cls, path: str | Path) -> TokenizedData:
        """What `save` wrote."""
        with np.load(path) as arrays:
            cuts = np.cumsum(arrays["lengths"])[:-1]
            return cls(np.split(arrays["input_ids"].astype(np.int64), cuts), np.split(arrays["labels"].astype(np.int64), cuts),
                       int(arrays["truncated"]), str(arrays["format"]), arrays["no_response"].tolist(),
                       arrays["empty_response"].tolist())


def read_records(source: str) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet / CSV file, a `datasets.save_to_disk` folder, or a hub dataset name.

    Raises `XTFError` naming the file (and the line, for JSONL) on anything unreadable.
    """
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith((".", "/", "~")) or Path(source).suffix in (".jsonl", ".json", ".parquet", ".csv"):
            raise XTFError(f"{source}: no such file")
        return _read_hub_dataset(source)
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.stat().st_size == 0:
        raise XTFError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for broken files
            raise XTFError(f"{path}: not a readable Parquet file ({error})") from error
        return _non_empty(records, path)
    if suffix == ".csv":
        import csv
        import io

        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise XTFError(f"{path}:{line}: not valid UTF-8 (byte {error.start})") from error
        return _non_empty(list(csv.DictReader(io.StringIO(text, newline=""))), path)
    raise XTFError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .csv)")


def _non_empty(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    if not records:
        raise XTFError(f"{path}: the file has no examples")
    return records


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = [record for _, record in _jsonl_rows(path)]
    if not records:
        raise XTFError(f"{path}: the file has no examples")
    return records


def _jsonl_rows(path: Path, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    """(byte offset of its line, row) of each non-blank line from byte `start` on, checked as it is read."""
    with path.open("rb") as handle:
        handle.seek(start)
        number = None if start else 0  # line numbers are known when reading from the start
        offset = start
        for raw in handle:
            where = f"{path}:{number + 1}" if number is not None else f"{path} (byte {offset})"
            number = number + 1 if number is not None else None
            try:
                # utf-8-sig: a byte-order mark at the start of the file (Excel, PowerShell) is not part of the JSON
                line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as error:
                raise XTFError(f"{where}: not valid UTF-8 (byte {error.start})") from error
            line_start, offset = offset, offset + len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise XTFError(f"{where}: malformed JSON ({error.msg}, column {error.colno})") from error
            if not isinstance(record, dict):
                raise XTFError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield line_start, record


class JsonlRows(Sequence[dict[str, Any]]):
    """The rows of a JSONL file, read from disk when asked, so a large file is never held whole: every line is
    checked once on opening (errors name the line), and parsed again each time its rows are asked for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._starts = np.fromiter((start for start, _ in _jsonl_rows(path)), np.int64)
        if not len(self._starts):
            raise XTFError(f"{path}: the file has no examples")

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            first, last, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(first, last, step)]
            return self._read(first, max(first, last))
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return self._read(position, position + 1)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (record for _, record in _jsonl_rows(self.path))

    def _read(self, first: int, last: int) -> list[dict[str, Any]]:
        if first >= last:
            return []
        rows = _jsonl_rows(self.path, int(self._starts[first]))
        return [record for _, (_, record) in zip(range(last - first), rows, strict=False)]


def read_rows(source: str) -> Sequence[dict[str, Any]]:
    """`read_records`, but a JSONL file's rows stay on disk until asked for (`JsonlRows`)."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".jsonl" and path.is_file() and path.stat().st_size > 0:
        return JsonlRows(path)
    return read_records(source)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise XTFError(f"{path}: not valid UTF-8 (byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise XTFError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise XTFError(f"{path}: expected a JSON list of objects")
    if not data:
        raise XTFError(f"{path}: the file has no examples")
    return data


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise XTFError(f"{path}: not a dataset folder saved with datasets.save_to_disk ({error})") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise XTFError(f"{path}: a DatasetDict without a 'train' split (has {list(loaded)})")
        loaded = loaded["train"]
    return loaded.to_list()


def _read_hub_dataset(name: str) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split="train").to_list()
    except Exception as error:
        raise XTFError(f"{name}: not a local file and not loadable as a dataset ({type(error).__name__})") from error


def detect_format(record: dict[str, Any]) -> str:
    """The format whose required columns the record has."""
    for name, alternatives in _REQUIRED.items():
        if any(all(column in record for column in columns) for columns in alternatives):
            return name
    expected = " | ".join("+".join(columns) for alternatives in _REQUIRED.values() for columns in alternatives)
    raise XTFError(
        f"cannot tell the format from the columns {sorted(record)}: expected one of {expected}; or pass --format"
    )


def tokenize_records(
    records: Sequence[dict[str, Any]], tokenizer, format: str = "auto", max_length: int = 2048, source: str = "data",
    first: int = 0,
) -> TokenizedData:  # type: ignore[no-untyped-def]
    """Tokenise rows into `TokenizedData` (input order kept, truncation counted). `first`: the index of the first
    row in its file, when the rows are a part of it (errors and the example indices then count from there).

    Raises `XTFError` naming the row (1-based) and the missing column or the problem.
    """
    fmt = resolve_format(records, format, source, first)
    data = TokenizedData([], [], format=fmt)
    for row, record in enumerate(records, start=first + 1):
        where = f"{source}: row {row}"
        ids, labels = _tokenize_one(record, tokenizer, fmt, where)
        if _response_is_empty(record, fmt):
            data.empty_response.append(row - 1)
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            data.truncated += 1
        if not (labels != -100).any():
            data.no_response.append(row - 1)
        data.input_ids.append(ids)
        data.labels.append(labels)
    return data


def _response_is_empty(record: dict[str, Any], fmt: str) -> bool:
    """Whether a row's response text (completion, output or answer, or an assistant turn) is blank."""
    if fmt == "messages":
        turns = record.get("messages") or []
        return any(isinstance(m, dict) and m.get("role") == "assistant" and not str(m.get("content", "")).strip()
                   for m in turns)
    for key in ("completion", "output", "answer"):
        if key in record:
            value = record[key]
            return isinstance(value, str) and not value.strip()
    return False


def resolve_format(records: Sequence[dict[str, Any]], format: str = "auto", source: str = "data", first: int = 0
                   ) -> str:
    """The format of the rows (`auto` picks it from the first row), after checking that every row has its
    columns; needs no tokenizer, so a bad file fails before any model is loaded. `first`: as `tokenize_records`.

    Raises `XTFError` naming the source, the row (1-based) and the missing column.
    """
    if format not in FORMATS:
        raise XTFError(f"--format: unknown format {format!r} (allowed: {', '.join(FORMATS)})")
    if not records:
        raise XTFError(f"{source}: no examples")
    if format == "auto":
        try:
            format = detect_format(records[0])
        except XTFError as error:
            raise XTFError(f"{source}: row {first + 1}: {error}") from error
    for row, record in enumerate(records, start=first + 1):
        _check_columns(record, format, f"{source}: row {row}")
    return format


def _check_columns(record: dict[str, Any], fmt: str, where: str) -> None:
    alternatives = _REQUIRED[fmt]
    if any(all(record.get(c) is not None for c in columns) for columns in alternatives):
        return
    wanted = " or ".join("+".join(columns) for columns in alternatives)
    closest = max(alternatives, key=lambda columns: sum(record.get(c) is not None for c in columns))
    missing = [c for c in closest if record.get(c) is None]
    raise XTFError(f"{where}: missing column {', '.join(missing)} for --format {fmt} (needs {wanted})")


def _tokenize_one(record: dict[str, Any], tokenizer, fmt: str, where: str) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    if fmt == "tokenized":
        return _pretokenized(record, where)
    if fmt == "messages":
        return tokenize_messages(record["messages"], tokenizer, where)
    if fmt == "alpaca":
        instruction = record.get("instruction", record.get("question"))
        output = record.get("output", record.get("answer"))
        extra = record.get("input") or ""
        if _has_chat_template(tokenizer):
            user = f"{instruction}\n\n{extra}" if extra else str(instruction)
            return tokenize_messages([{"role": "user", "content": user}, {"role": "assistant", "content": str(output)}], tokenizer, where)
        prompt = _ALPACA_PROMPT.format(
            context=", paired with an input that provides further context" if extra else "",
            instruction=instruction,
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        return tokenize_prompt_completion(prompt, str(output), tokenizer, where)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        return tokenize_messages(prompt + completion, tokenizer, where)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise XTFError(f"{where}: prompt and completion must both be strings or both message lists")
    return tokenize_prompt_completion(prompt, completion, tokenizer, where)


def _pretokenized(record: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(record["input_ids"], dtype=np.int64)
    if "labels" in record and record["labels"] is not None:
        labels = np.asarray(record["labels"], dtype=np.int64)
    else:
        mask = np.asarray(record["completion_mask"], dtype=bool)
        labels = np.where(mask, ids, -100)
    if ids.ndim != 1 or labels.shape != ids.shape:
        raise XTFError(f"{where}: input_ids and labels must be flat lists of the same length")
    return ids, labels


def _has_chat_template(tokenizer) -> bool:  # type: ignore[no-untyped-def]
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_prompt_completion(prompt: str, completion: str, tokenizer, where: str = "example") -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """prompt + completion + EOS; the completion and EOS are trained (as `trl sft` does for plain text)."""
    prompt_ids = _encode(tokenizer, prompt, special=True)
    completion_ids = _encode(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        completion_ids.append(int(tokenizer.eos_token_id))
    ids = np.asarray(prompt_ids + completion_ids, dtype=np.int64)
    labels = ids.copy()
    labels[: len(prompt_ids)] = -100
    return ids, labels


def tokenize_messages(messages: Sequence[dict[str, Any]], tokenizer, where: str = "example") -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Chat-template a conversation; tokens of assistant turns (content and end-of-turn) are trained.

    The template is rendered for growing prefixes of the conversation; each new piece of text is tokenised
    on its own, so the trained span of every assistant turn is exact. Templates that rewrite earlier turns
    (so a prefix is not a prefix of the whole) are refused: use the `tokenized` format for those.
    """
    if not _has_chat_template(tokenizer):
        raise XTFError(f"{where}: the tokenizer has no chat template; use --format prompt-completion or alpaca")
    if not isinstance(messages, list) or not messages:
        raise XTFError(f"{where}: messages must be a non-empty list of {{role, content}}")
    if not any(m.get("role") == "assistant" for m in messages):
        raise XTFError(f"{where}: no assistant message, nothing to train on")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    eos = tokenizer.eos_token_id
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise XTFError(f"{where}: message {k} needs 'role' and 'content'")
        if message["role"] == "assistant":
            prompt_text = _render(tokenizer, messages[:k], where, generation_prompt=True)
            rendered = _append_piece(tokenizer, rendered, prompt_text, ids, labels, trained=False, where=where)
            turn_text = _render(tokenizer, messages[: k + 1], where, generation_prompt=False)
            start = len(ids)
            rendered = _append_piece(tokenizer, rendered, turn_text, ids, labels, trained=True, where=where)
            # Train up to the end-of-turn token, not on the separator the template puts after it.
            turn = ids[start:]
            if eos is not None and eos in turn:
                last = start + len(turn) - 1 - turn[::-1].index(eos)
                for j in range(last + 1, len(ids)):
                    labels[j] = -100
    full = _render(tokenizer, messages, where, generation_prompt=False)
    _append_piece(tokenizer, rendered, full, ids, labels, trained=False, where=where)
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)


def _render(tokenizer, messages: Sequence[dict[str, Any]], where: str, generation_prompt: bool) -> str:  # type: ignore[no-untyped-def]
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:
        raise XTFError(f"{where}: the chat template failed ({type(error).__name__}: {error})") from error


def _append_piece(tokenizer, rendered: str, text: str, ids: list[int], labels: list[int], trained: bool, where: str) -> str:  # type: ignore[no-untyped-def]
    if not text.startswith(rendered):
        raise XTFError(
            f"{where}: the chat template rewrites earlier turns, so trained spans cannot be located; "
            "tokenise it yourself and use --format tokenized"
        )
    piece = _encode(tokenizer, text[len(rendered) :])
    ids.extend(piece)
    labels.extend(piece if trained else [-100] * len(piece))
    return text
