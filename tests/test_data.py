"""Reading (`read_records`), format detection, tokenisation (`tokenize_records`) and protected tokens
(`xtf_plugin.tokens`), with real tokenizers trained locally (see conftest.py).

Expected texts are written out by hand (the ChatML / Alpaca strings); token-level checks decode the
trained spans back to text, so they hold for any tokenizer.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import build_tokenizer, gsm8k_rows

from xtf_plugin.data import detect_format, read_records, tokenize_records
from xtf_plugin.errors import XTFError
from xtf_plugin.tokens import TokenTexts, protected_mask, special_token_ids

ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi, there"},
]


def one_line_error(call, *args, **kwargs) -> str:
    """Run `call`, expect an `XTFError` whose message is one line, return the message."""
    with pytest.raises(XTFError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def trained_spans(ids: np.ndarray, labels: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of trained (labels != -100) positions."""
    spans, start = [], None
    for j, label in enumerate(labels.tolist()):
        if label != -100 and start is None:
            start = j
        elif label == -100 and start is not None:
            spans.append((start, j))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)


def check_labels_copy_ids(ids: np.ndarray, labels: np.ndarray) -> None:
    assert ids.dtype == np.int64 and labels.dtype == np.int64 and ids.shape == labels.shape
    trained = labels != -100
    assert (labels[trained] == ids[trained]).all()


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The conftest tokenizer (ChatML template, eos <|im_end|>, pad <|endoftext|>), without building the
    tiny model that the session's `chat_tokenizer` fixture also builds: keeps this file fast on its own."""
    return build_tokenizer(tmp_path_factory.mktemp("chat-tok"))


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """The same tokenizer without a chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("plain-tok"), chat_template=False)


# --- read_records ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix):
    """Excel, PowerShell and many Windows exporters start UTF-8 files with a byte-order mark."""
    text = {
        ".jsonl": '{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say bye.", "output": "bye"}\n',
        ".json": '[{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say bye.", "output": "bye"}]',
        ".csv": "instruction,output\nSay hi.,hi\nSay bye.,bye\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_records(str(path)) == [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say bye.", "output": "bye"}]


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2, "b": "x"}\n\n')
    assert read_records(str(path)) == [{"a": 1}, {"a": 2, "b": "x"}]


def test_read_json_list_and_data_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert read_records(str(path)) == ROWS
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": ROWS}))
    assert read_records(str(wrapped)) == ROWS


def test_read_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_records(str(path)) == rows


def test_read_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nAdd the numbers.,2 and 3,5\nSay hi.,,"hi, there"\n')
    assert read_records(str(path)) == ROWS


def test_read_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert read_records(str(tmp_path / "ds")) == ROWS
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dd"))
    assert read_records(str(tmp_path / "dd")) == ROWS
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "nt"))
    message = one_line_error(read_records, str(tmp_path / "nt"))
    assert str(tmp_path / "nt") in message and "'train'" in message


def test_read_missing_file(tmp_path):
    for name in ("nope.jsonl", "nope"):
        path = tmp_path / name
        message = one_line_error(read_records, str(path))
        assert message == f"{path}: no such file"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_read_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    message = one_line_error(read_records, str(path))
    assert message.startswith(str(path)) and "empty" in message


@pytest.mark.parametrize(("name", "content"), [("blank.jsonl", "\n  \n\n"), ("header.csv", "prompt,completion\n")])
def test_read_file_without_examples(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert one_line_error(read_records, str(path)) == f"{path}: the file has no examples"


def test_read_jsonl_malformed_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n')
    message = one_line_error(read_records, str(path))
    assert message.startswith(f"{path}:3: malformed JSON")


def test_read_jsonl_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    message = one_line_error(read_records, str(path))
    assert message.startswith(f"{path}:2: not valid UTF-8")


def test_read_csv_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,completion\nq,a\nq2,caf\xe9\n")
    message = one_line_error(read_records, str(path))
    assert message.startswith(f"{path}:3: not valid UTF-8")


def test_read_jsonl_line_not_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    assert one_line_error(read_records, str(path)) == f"{path}:2: expected a JSON object, got list"


def test_read_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    assert one_line_error(read_records, str(bad)).startswith(f"{bad}:3: malformed JSON")
    scalars = tmp_path / "scalars.json"
    scalars.write_text("[1, 2]")
    assert one_line_error(read_records, str(scalars)) == f"{scalars}: expected a JSON list of objects"


def test_read_broken_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet at all")
    message = one_line_error(read_records, str(path))
    assert message.startswith(f"{path}: not a readable Parquet file")


def test_read_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    message = one_line_error(read_records, str(path))
    assert message.startswith(f"{path}: unsupported file type '.txt'")


# --- detect_format --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": []}, "messages"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
        ({"question": "q", "answer": "a"}, "alpaca"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"input_ids": [1], "labels": [1]}, "tokenized"),
        ({"input_ids": [1], "completion_mask": [1]}, "tokenized"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_error_lists_column_sets():
    message = one_line_error(detect_format, {"text": "t", "output": "o"})
    assert "['output', 'text']" in message and "--format" in message
    for columns in (
        "messages",
        "instruction+output",
        "question+answer",
        "prompt+completion",
        "input_ids+labels",
        "input_ids+completion_mask",
    ):
        assert columns in message


# --- tokenize_records: messages -------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]
CONVERSATION_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
    "<|im_start|>assistant\nIt is 6.<|im_end|>\n"
)


def test_messages_multi_turn_trains_assistant_turns_only(chat_tokenizer):
    data = tokenize_records([{"messages": CONVERSATION}], chat_tokenizer)
    assert data.format == "messages" and len(data) == 1 and data.truncated == 0 and data.no_response == []
    ids, labels = data.input_ids[0], data.labels[0]
    check_labels_copy_ids(ids, labels)
    # The tokens are the rendered template, piece for piece.
    assert chat_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == CONVERSATION_TEXT
    assert decode(chat_tokenizer, ids) == CONVERSATION_TEXT
    assert "".join(TokenTexts(chat_tokenizer).of(ids.tolist())) == CONVERSATION_TEXT
    # Exactly two trained spans: each assistant's content and its <|im_end|>.
    spans = trained_spans(ids, labels)
    assert [decode(chat_tokenizer, ids[s:e]) for s, e in spans] == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    eos = chat_tokenizer.eos_token_id
    for s, e in spans:
        assert ids[e - 1] == eos
        # Untrained: the header right before, the "\n" right after.
        assert decode(chat_tokenizer, ids[:s]).endswith("<|im_start|>assistant\n")
        assert decode(chat_tokenizer, ids[e : e + 1]) == "\n" and labels[e] == -100
    # The <|im_end|> of the system and user turns is not trained.
    eos_positions = np.flatnonzero(ids == eos)
    assert len(eos_positions) == 5
    assert (labels[eos_positions] != -100).tolist() == [False, False, True, False, True]


def test_messages_without_chat_template_errors(plain_tokenizer):
    message = one_line_error(tokenize_records, [{"messages": CONVERSATION}], plain_tokenizer, source="d.jsonl")
    assert message.startswith("d.jsonl: row 1:") and "no chat template" in message


def test_template_rewriting_earlier_turns_errors(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    # Drops the content of every assistant turn but the last (as reasoning templates drop old thinking).
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' and not loop.last %}{{ '...' }}{% else %}{{ message['content'] }}"
        "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    # One assistant turn: nothing earlier to rewrite, so it works.
    single = tokenize_records([{"messages": CONVERSATION[:3]}], tokenizer)
    ids, labels = single.input_ids[0], single.labels[0]
    assert [decode(tokenizer, ids[s:e]) for s, e in trained_spans(ids, labels)] == ["It is 4.<|im_end|>"]
    rows = [{"messages": CONVERSATION[:3]}, {"messages": CONVERSATION}]
    message = one_line_error(tokenize_records, rows, tokenizer)
    assert message.startswith("data: row 2:") and "rewrites earlier turns" in message


# --- tokenize_records: alpaca ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "user"),
    [
        (ROWS[0], "Add the numbers.\n\n2 and 3"),
        ({"instruction": "Add the numbers.", "output": "5"}, "Add the numbers."),
        ({"instruction": "Add the numbers.", "input": "", "output": "5"}, "Add the numbers."),
        ({"question": "Add the numbers.", "answer": "5"}, "Add the numbers."),
    ],
)
def test_alpaca_with_chat_template(chat_tokenizer, record, user):
    data = tokenize_records([record], chat_tokenizer)
    assert data.format == "alpaca"
    ids, labels = data.input_ids[0], data.labels[0]
    check_labels_copy_ids(ids, labels)
    assert decode(chat_tokenizer, ids) == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    assert [decode(chat_tokenizer, ids[s:e]) for s, e in trained_spans(ids, labels)] == ["5<|im_end|>"]


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Response:\n"
)


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        (ROWS[0], ALPACA_WITH_INPUT),
        ({"instruction": "Add the numbers.", "output": "5"}, ALPACA_WITHOUT_INPUT),
        ({"question": "Add the numbers.", "answer": "5"}, ALPACA_WITHOUT_INPUT),
    ],
)
def test_alpaca_without_chat_template_uses_alpaca_prompt(plain_tokenizer, record, prompt):
    data = tokenize_records([record], plain_tokenizer)
    ids, labels = data.input_ids[0], data.labels[0]
    check_labels_copy_ids(ids, labels)
    assert decode(plain_tokenizer, ids) == prompt + "5<|im_end|>"
    [(start, end)] = trained_spans(ids, labels)
    assert end == len(ids)
    assert decode(plain_tokenizer, ids[:start]) == prompt
    assert decode(plain_tokenizer, ids[start:]) == "5<|im_end|>"


# --- tokenize_records: prompt-completion and tokenized --------------------------------------------


def test_prompt_completion_strings(chat_tokenizer):
    prompt, completion = "Q: What is 2+2?\nA:", " 4, of course."
    data = tokenize_records([{"prompt": prompt, "completion": completion}], chat_tokenizer)
    assert data.format == "prompt-completion"
    ids, labels = data.input_ids[0], data.labels[0]
    check_labels_copy_ids(ids, labels)
    [(start, end)] = trained_spans(ids, labels)
    assert end == len(ids) and ids[-1] == chat_tokenizer.eos_token_id
    assert decode(chat_tokenizer, ids[:start]) == prompt
    assert decode(chat_tokenizer, ids[start:]) == completion + "<|im_end|>"


def test_prompt_completion_conversational(chat_tokenizer):
    record = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
        "completion": [{"role": "assistant", "content": "It is 4."}],
    }
    data = tokenize_records([record], chat_tokenizer)
    ids, labels = data.input_ids[0], data.labels[0]
    check_labels_copy_ids(ids, labels)
    expected = CONVERSATION_TEXT[: CONVERSATION_TEXT.index("<|im_start|>user\nAnd")]
    assert decode(chat_tokenizer, ids) == expected
    assert [decode(chat_tokenizer, ids[s:e]) for s, e in trained_spans(ids, labels)] == ["It is 4.<|im_end|>"]


def test_prompt_completion_mixed_types_errors(chat_tokenizer):
    record = {"prompt": [{"role": "user", "content": "q"}], "completion": "a"}
    message = one_line_error(tokenize_records, [record], chat_tokenizer)
    assert message.startswith("data: row 1:") and "must both be strings or both message lists" in message


def test_tokenized_with_labels_and_completion_mask(chat_tokenizer):
    records = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "completion_mask": [0, 1, 1]},
    ]
    data = tokenize_records(records, chat_tokenizer, format="tokenized")
    assert data.format == "tokenized"
    assert [x.tolist() for x in data.input_ids] == [[5, 6, 7, 8], [9, 10, 11]]
    assert [x.tolist() for x in data.labels] == [[-100, -100, 7, 8], [-100, 10, 11]]
    assert all(x.dtype == np.int64 for x in data.input_ids + data.labels)
    # auto picks the same format from the first row's columns
    assert tokenize_records(records, chat_tokenizer).format == "tokenized"
    bad = [{"input_ids": [1, 2, 3], "labels": [1, 2]}]
    message = one_line_error(tokenize_records, bad, chat_tokenizer)
    assert message.startswith("data: row 1:") and "same length" in message


# --- truncation, order, no-response rows ----------------------------------------------------------


def test_truncation_keeps_start_order_and_rows(chat_tokenizer):
    records = [
        {"prompt": "Q: 1?\nA:", "completion": " one"},
        {"prompt": "Q: 2?\nA:", "completion": " two two two two two two two two two two two two two"},
        {"prompt": "Q: " + "three " * 40 + "?\nA:", "completion": " three"},  # response cut off entirely
        {"prompt": "Q: 4?\nA:", "completion": " four"},
    ]
    full = tokenize_records(records, chat_tokenizer, max_length=10_000)
    assert full.truncated == 0 and full.no_response == []
    lengths = [len(x) for x in full.input_ids]
    max_length = 20
    # the fixture texts are chosen so rows 1 and 4 fit, row 2 loses part of its response, row 3 all of it
    assert lengths[0] <= max_length and lengths[3] <= max_length
    assert (full.labels[1][:max_length] != -100).any() and lengths[1] > max_length
    assert not (full.labels[2][:max_length] != -100).any()

    data = tokenize_records(records, chat_tokenizer, max_length=max_length)
    assert len(data) == 4 and data.truncated == 2
    assert data.no_response == [2]  # listed, not dropped
    for k in range(4):
        kept = min(lengths[k], max_length)
        assert data.input_ids[k].tolist() == full.input_ids[k][:kept].tolist()
        assert data.labels[k].tolist() == full.labels[k][:kept].tolist()
    assert decode(chat_tokenizer, data.input_ids[3]) == "Q: 4?\nA: four<|im_end|>"


# --- tokenize_records errors ----------------------------------------------------------------------


def test_missing_column_names_row_and_column(chat_tokenizer):
    records = [{"question": "q", "answer": "a"}, {"question": "q2"}]
    message = one_line_error(tokenize_records, records, chat_tokenizer, source="gsm.jsonl")
    assert message == (
        "gsm.jsonl: row 2: missing column answer for --format alpaca (needs instruction+output or question+answer)"
    )
    message = one_line_error(tokenize_records, [{"question": "q", "answer": "a"}], chat_tokenizer, format="messages")
    assert message == "data: row 1: missing column messages for --format messages (needs messages)"
    message = one_line_error(tokenize_records, [{"prompt": "p"}], chat_tokenizer, format="prompt-completion")
    assert message.startswith("data: row 1: missing column completion for --format prompt-completion")


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        ({"messages": []}, "non-empty list"),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "message 0 needs 'role' and 'content'",
        ),
    ],
)
def test_bad_examples_name_the_row(chat_tokenizer, record, fragment):
    records = [_valid_like(record), record]
    message = one_line_error(tokenize_records, records, chat_tokenizer, source="d.jsonl")
    assert message.startswith("d.jsonl: row 2:") and fragment in message


def _valid_like(record: dict) -> dict:
    """A valid row of the same format as `record`."""
    if "messages" in record:
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "prompt" in record:
        return {"prompt": "p", "completion": "c"}
    return {"instruction": "i", "output": "o"}


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "p", "completion": ""},
        {"instruction": "i", "output": ""},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ],
)
def test_empty_response_is_kept_and_counted(chat_tokenizer, record):
    """TRL and axolotl train on such a row (its end of sequence / end of turn), so it is kept and listed."""
    records = [_valid_like(record), record, _valid_like(record)]
    data = tokenize_records(records, chat_tokenizer)
    assert len(data) == 3 and data.empty_response == [1]
    trained = data.input_ids[1][data.labels[1] != -100].tolist()
    assert trained and trained[-1] in (chat_tokenizer.eos_token_id, chat_tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert len(trained) <= 2  # the end token (and at most a whitespace token the template writes before it)


def test_unknown_format_and_no_records(chat_tokenizer):
    message = one_line_error(tokenize_records, ROWS, chat_tokenizer, format="sharegpt")
    assert message.startswith("--format: unknown format 'sharegpt'") and "prompt-completion" in message
    assert one_line_error(tokenize_records, [], chat_tokenizer, source="d.jsonl") == "d.jsonl: no examples"


# --- tokens: special ids and protected tokens -----------------------------------------------------


def test_special_token_ids(chat_tokenizer, plain_tokenizer, tmp_path):
    ids = special_token_ids(chat_tokenizer)
    eos = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = chat_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat_tokenizer.eos_token_id == eos and chat_tokenizer.pad_token_id == pad
    assert ids == {eos, pad, start}
    no_pad = build_tokenizer(tmp_path / "no-pad", pad_token=False)
    assert no_pad.pad_token_id is None
    assert eos in special_token_ids(no_pad)
    # ordinary tokens are not special
    assert not set(chat_tokenizer("It is 4.", add_special_tokens=False)["input_ids"]) & ids


def test_special_tokens_in_response_are_protected(chat_tokenizer):
    data = tokenize_records([{"messages": CONVERSATION}], chat_tokenizer)
    ids, labels = data.input_ids[0], data.labels[0]
    specials = special_token_ids(chat_tokenizer)
    protected = protected_mask(ids, labels, TokenTexts(chat_tokenizer), specials, [])
    assert protected.dtype == bool and protected.shape == ids.shape
    # the trained <|im_end|> of both assistant turns, nothing else (not the prompt's <|im_end|>)
    expected = [e - 1 for _, e in trained_spans(ids, labels)]
    assert np.flatnonzero(protected).tolist() == expected
    assert (ids[expected] == chat_tokenizer.eos_token_id).all()


def test_protect_regex_covers_the_gsm8k_answer_line(chat_tokenizer):
    row = gsm8k_rows(1)[0]
    assert row["answer"].endswith("\n#### 72")
    # The prompt also has a matching line; prompt tokens are never protected.
    record = {"question": row["question"] + "\n#### 48", "answer": row["answer"]}
    data = tokenize_records([record], chat_tokenizer)
    ids, labels = data.input_ids[0], data.labels[0]
    texts = TokenTexts(chat_tokenizer)
    assert len(re.findall("^#### .*", "".join(texts.of(ids.tolist())), flags=re.MULTILINE)) == 2

    protected = protected_mask(ids, labels, texts, set(), ["^#### .*"])
    positions = np.flatnonzero(protected)
    assert (labels[positions] != -100).all()
    assert positions.tolist() == list(range(positions[0], positions[-1] + 1))  # one contiguous run
    # The regex runs over the text with special tokens spelled out, so ".*" runs on into "<|im_end|>"
    # (protected anyway); the "\n" after it is not a response token.
    assert decode(chat_tokenizer, ids[positions]) == "#### 72<|im_end|>"
    # the token before the run ends the previous line; nothing of the answer's reasoning is protected
    assert decode(chat_tokenizer, ids[positions[0] - 1 : positions[0]]).endswith("\n")
    digits_only = protected_mask(ids, labels, texts, set(), [r"^#### \d+"])
    assert decode(chat_tokenizer, ids[digits_only]) == "#### 72"
    with_specials = protected_mask(ids, labels, texts, special_token_ids(chat_tokenizer), [r"^#### \d+"])
    assert decode(chat_tokenizer, ids[with_specials]) == "#### 72<|im_end|>"

    # a pattern matching only the prompt protects nothing; an empty match protects nothing
    assert not protected_mask(ids, labels, texts, set(), ["^#### 48$"]).any()
    assert not protected_mask(ids, labels, texts, set(), ["^"]).any()
    # a pattern inside a token protects that whole token
    inside = protected_mask(ids, labels, texts, set(), ["(?<=#### )7"])
    assert inside.sum() == 1 and "7" in decode(chat_tokenizer, ids[inside])
