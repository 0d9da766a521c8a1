"""`xtf report DIR`: the summary tables and, with `--examples N`, examples with their dropped tokens marked:
coloured on a terminal, `[[token]](KN)` brackets with the reasons' abbreviations otherwise."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from xtf_plugin.config import SHORT_NAMES
from xtf_plugin.report.stats import reason_names
from xtf_plugin.selection import SPAN_BIT

if TYPE_CHECKING:
    from xtf_plugin.pipeline import ScoredDataset

STYLES: dict[str, str] = {"reasoning": "black on red", "novelty": "black on blue", "relevance": "black on green"}
SEVERAL_STYLE = "black on yellow"


def reasons_label(bits: int) -> str:
    """`6` -> `KN+TR`; `12` -> `TR span` (masked with its off-task span); `10` -> `KN span` (a repeat)."""
    label = "+".join(SHORT_NAMES[n] for n in reason_names(bits))
    return f"{label} span" if bits & SPAN_BIT else label


def marked_text(scored: ScoredDataset, index: int) -> str:
    """The response of example `index` with each dropped token as `[[token]](KN)`, and each masked span as
    one `[[span text]](TR span)` (off-task) or `[[span text]](KN span)` (a repeat)."""
    part = scored.example_slice(index)
    pieces: list[str] = []
    run: list[str] = []
    run_bits = 0

    def close_run() -> None:
        if run:
            pieces.append(f"[[{''.join(run)}]]({reasons_label(run_bits)})")
            run.clear()

    for token_id, bits, trained in zip(scored.input_ids[part].tolist(), scored.selection.reasons[part].tolist(),
                                       scored.response[part].tolist(), strict=True):
        if not trained:
            continue
        text = scored.texts[token_id]
        if bits & SPAN_BIT:
            if bits != run_bits:
                close_run()
            run.append(text)
            run_bits = bits
            continue
        close_run()
        pieces.append(f"[[{text}]]({reasons_label(bits)})" if bits else text)
    close_run()
    return "".join(pieces)


def styled_text(scored: ScoredDataset, index: int) -> Any:
    """The response of example `index` as a rich `Text`, dropped tokens coloured by reason."""
    from rich.text import Text

    part = scored.example_slice(index)
    text = Text()
    for token_id, bits, trained in zip(scored.input_ids[part].tolist(), scored.selection.reasons[part].tolist(), scored.response[part].tolist(), strict=True):
        if not trained:
            continue
        names = reason_names(bits)
        style = "" if not names else STYLES[names[0]] if len(names) == 1 else SEVERAL_STYLE
        text.append(scored.texts[token_id], style=style)
    return text


def print_examples(scored: ScoredDataset, count: int, console: Any = None) -> None:
    """Print the first `count` examples with their dropped tokens marked."""
    from rich.console import Console

    console = console or Console()
    count = min(count, scored.n_examples)
    tty = console.is_terminal
    legend = "dropped tokens: " + ", ".join(f"{SHORT_NAMES[n]} = lacking {n}" for n in SHORT_NAMES) + ", span = a masked span (TR span: off-task, KN span: repeats an earlier one)"
    if tty:
        console.print(legend + " (colours: RI red, KN blue, TR green, several yellow)")
    else:
        print(legend + "; marked [[token]](reasons)", file=console.file)
    for i in range(count):
        part = scored.example_slice(i)
        n_resp = int(scored.response[part].sum())
        n_drop = int((scored.selection.reasons[part] > 0).sum())
        head = f"--- example {i}: {n_resp} response tokens, {n_drop} dropped"
        if tty:
            console.rule(head.strip("- "))
            console.print(styled_text(scored, i))
        else:
            print(head, file=console.file or sys.stdout)
            print(marked_text(scored, i), file=console.file or sys.stdout)
