"""`xtf report --html`: one self-contained HTML file (inline CSS, JS and SVG; nothing fetched) explaining a
selection: dataset summary, reason combinations (UpSet-style), score histograms with the thresholds used, the
most dropped tokens, and an example viewer rendered client-side, one page at a time, from embedded compact
JSON (so 100k examples stay fast)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xtf_plugin.config import ATTRIBUTE_REGISTRY, ATTRIBUTES, SHORT_NAMES
from xtf_plugin.report.stats import ScoreHistograms, dropped_fractions, per_example_counts
from xtf_plugin.report.summary import (
    DroppedTokens,
    combinations_of,
    counts_by_reason,
    dropped_span_counts,
    filtered_verb,
    overlaps_of,
    span_gain_text,
    value_counts,
)

if TYPE_CHECKING:
    from xtf_plugin.output import ScoredFolder
    from xtf_plugin.pipeline import ScoredDataset

COLORS: dict[str, str] = {"reasoning": "#e45756", "novelty": "#4c78a8", "relevance": "#54a24b", "several": "#e8b90f"}
"""Highlight colour of a token dropped by one attribute, or by several."""

SEVERAL_FLAG = 16
"""Bit in an example's reason mask: some token was dropped for two or more reasons (bit 8 there, as in
`xtf_drop`: some token was masked with its span)."""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"


def upset_svg(combinations: dict[str, int]) -> str:
    """An UpSet-style chart: one bar per exact reason set, with the set's members as dots underneath."""
    items = sorted(combinations.items(), key=lambda kv: -kv[1])
    if not items:
        return "<p>No token was dropped.</p>"
    col, left, bar_h, row_h = 64, 40, 150, 20
    width = left + col * len(items) + 10
    height = 20 + bar_h + 10 + row_h * len(ATTRIBUTES) + 10
    top = max(v for _, v in items)
    parts = [f'<svg class="chart upset" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    base = 20 + bar_h
    for i, name in enumerate(ATTRIBUTES):
        y = base + 10 + row_h * i + row_h / 2
        parts.append(f'<text x="{left - 6}" y="{y + 4:.0f}" text-anchor="end" class="lab">{SHORT_NAMES[name]}</text>')
    for j, (combo, count) in enumerate(items):
        members = combo.split("+")
        x = left + col * j + col / 2
        h = bar_h * count / top
        color = COLORS[members[0]] if len(members) == 1 else COLORS["several"]
        parts.append(
            f'<rect x="{x - col * 0.35:.1f}" y="{base - h:.1f}" width="{col * 0.7:.1f}" height="{h:.1f}" fill="{color}">'
            f"<title>{_esc(combo)}: {count:,} tokens</title></rect>"
        )
        parts.append(f'<text x="{x:.1f}" y="{base - h - 4:.1f}" text-anchor="middle" class="lab">{count:,}</text>')
        ys = []
        for i, name in enumerate(ATTRIBUTES):
            y = base + 10 + row_h * i + row_h / 2
            on = name in members
            if on:
                ys.append(y)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{"#333" if on else "#ddd"}"/>')
        if len(ys) > 1:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{min(ys):.1f}" y2="{max(ys):.1f}" stroke="#333" stroke-width="3"/>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_svg(name: str, hist: dict[str, Any]) -> str:
    """Histogram of one score over response tokens (grey: all, coloured: dropped by this attribute), on a
    square-root count axis, with the thresholds as dashed lines (and the range of per-example RI fences)."""
    width, height, left, bottom, top_pad = 400, 220, 44, 36, 22
    plot_w, plot_h = width - left - 24, height - bottom - top_pad
    parts = [f'<svg class="chart hist hist-{name}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">']
    parts.append(f'<text x="{left}" y="14" class="title">{_esc(SHORT_NAMES[name])}: {_esc(name)}</text>')
    edges = hist["edges"]
    if not edges:
        parts.append(f'<text x="{left}" y="{height / 2}" class="lab">{_esc(hist.get("empty", "no scored tokens"))}</text></svg>')
        return "".join(parts)
    lo, hi = edges[0], edges[-1]
    sx = lambda v: left + plot_w * (v - lo) / (hi - lo)  # noqa: E731
    peak = math.sqrt(max(max(hist["all"]), 1))
    sy = lambda c: top_pad + plot_h * (1 - math.sqrt(c) / peak)  # noqa: E731
    if hist["band"]:
        a, b = (sx(v) for v in hist["band"])
        parts.append(
            f'<rect x="{a:.1f}" y="{top_pad}" width="{max(b - a, 1):.1f}" height="{plot_h}" fill="#fdd" opacity="0.6">'
            "<title>range of the per-example fences</title></rect>"
        )
    for i, (count, dropped) in enumerate(zip(hist["all"], hist["dropped"], strict=True)):
        x0, x1 = sx(edges[i]), sx(edges[i + 1])
        tip = f"{_fmt(edges[i])} .. {_fmt(edges[i + 1])}: {count:,} tokens, {dropped:,} dropped by {SHORT_NAMES[name]}"
        if count:
            parts.append(
                f'<rect x="{x0:.1f}" y="{sy(count):.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                f'height="{top_pad + plot_h - sy(count):.1f}" fill="#bbb"><title>{_esc(tip)}</title></rect>'
            )
        if dropped:
            parts.append(
                f'<rect x="{x0:.1f}" y="{sy(dropped):.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                f'height="{top_pad + plot_h - sy(dropped):.1f}" fill="{COLORS[name]}"><title>{_esc(tip)}</title></rect>'
            )
    for k, (label, value) in enumerate(hist["lines"]):
        x = sx(value)
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="{top_pad}" y2="{top_pad + plot_h}" '
            f'stroke="#000" stroke-dasharray="4 3"><title>{_esc(label)} = {_fmt(value)}</title></line>'
        )
        parts.append(f'<text x="{x + 2:.1f}" y="{top_pad + 10 + 10 * (k % 2)}" class="small">{_esc(label)}</text>')
    axis_y = top_pad + plot_h
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{axis_y}" y2="{axis_y}" stroke="#444"/>')
    for t in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{sx(t):.1f}" y="{axis_y + 13}" text-anchor="middle" class="small">{_fmt(float(t))}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle" class="lab">{_esc(hist["label"])}</text>')
    parts.append(
        f'<text x="12" y="{top_pad + plot_h / 2}" transform="rotate(-90 12 {top_pad + plot_h / 2})" text-anchor="middle" '
        'class="small">tokens (√ scale)</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _thresholds_rows(summary: dict[str, Any], config: dict[str, Any]) -> list[tuple[str, str]]:
    thresholds = summary.get("thresholds") or {}
    rows = [("mode", _esc(thresholds.get("mode", summary.get("mode", "?"))))]
    if "kn_p_threshold" in thresholds:
        p = thresholds["kn_p_threshold"]
        rows.append(("KN", f"lacks when p(token) &gt; {_esc(p)}, i.e. KN &lt; {_fmt(1 - p)}"))
    if thresholds.get("tr_otsu_thresholds"):
        cuts = ", ".join(_fmt(t) for t in thresholds["tr_otsu_thresholds"])
        masked = config.get("tr_mask_classes")
        rows.append(("TR", f"Multi-Otsu thresholds {cuts}" + (f"; masked classes {_esc(masked)} (0 = lowest)" if masked else "")))
    fence = thresholds.get("ri_fence")
    if fence:
        scale = " on ln RI" if fence.get("scale") == "log" else ""
        rows.append(
            (
                "RI",
                f"per-example fence Q1 - {_esc(fence['k'])} IQR{scale}: median {_fmt(fence['median'])} "
                f"(min {_fmt(fence['min'])}, max {_fmt(fence['max'])}, {fence['examples']:,} examples)",
            )
        )
    if thresholds.get("mode") == "spans":
        fence = thresholds.get("span_surprise_fence")
        rows.append(("spans", (
            f"off-task when the mean surprise of a span's word tokens is above {_fmt(fence)} nats "
            f"(median {_fmt(thresholds['span_surprise_median'])} + {_esc(thresholds['span_fence_k'])} x "
            f"{_fmt(thresholds['span_surprise_scale'])}) and more than {_esc(thresholds['span_fence_k'])} x "
            f"{_fmt(thresholds['span_surprise_scale'])} above the least surprising other span of its response; "
            f"{thresholds['off_task_spans']:,} of {thresholds['spans']:,} spans"
            + (f", {thresholds['spared_spans']:,} above the fence but like the rest of their response (kept)"
               if "spared_spans" in thresholds else "")
            + f", {thresholds['template_spans']:,} templates never masked"
        ) if fence is not None else "no spread in span surprise: nothing is off-task"))
        if thresholds.get("span_ungrounded_fence") is not None:
            rows.append(("prompt gain", (
                f"also off-task: a span above {_fmt(thresholds['span_ungrounded_fence'])} nats (median + "
                f"{_esc(thresholds['span_ungrounded_k'])} x {_fmt(thresholds['span_surprise_scale'])}) that the prompt "
                f"makes less likely ({thresholds['ungrounded_spans']:,} spans); an off-task span whose words around its "
                "surprising phrase the prompt does not make more likely is masked whole")))
        if "repeated_spans" in thresholds:
            rows.append(("repeats", f"{thresholds['repeated_spans']:,} spans said again right after themselves, "
                                    "word for word (the first time stays)"))
    if config.get("drop_ratio") is not None:
        rows.append(("drop ratio", _esc(config["drop_ratio"])))
    if config.get("caps") and config.get("mode") == "union":
        rows.append(("caps", ", ".join(f"{SHORT_NAMES.get(k, k)} {_esc(v)}" for k, v in config["caps"].items())))
    return rows


def _top_tokens_html(tops: dict[str, list[tuple[str, int]]]) -> str:
    parts = ["<div class='tops'>"]
    for name in ATTRIBUTES:
        pairs = tops.get(name) or []
        peak = max((n for _, n in pairs), default=1)
        parts.append(f"<div class='top top-{name}'><h3>{SHORT_NAMES[name]}: lacking {name}</h3><table>")
        for text, n in pairs:
            width = 100 * n / peak
            parts.append(
                f"<tr><td><code>{_esc(json.dumps(text, ensure_ascii=False))}</code></td><td class='num'>{n:,}</td>"
                f"<td class='barcell'><span class='bar' style='width:{width:.0f}%;background:{COLORS[name]}'></span></td></tr>"
            )
        if not pairs:
            parts.append("<tr><td>none</td></tr>")
        parts.append("</table></div>")
    parts.append("</div>")
    return "".join(parts)


def _score_columns(scored: ScoredDataset) -> dict[str, np.ndarray]:
    return {"reasoning": scored.scores.ri, "novelty": scored.scores.kn, "relevance": scored.scores.tr}


def _numbers(values: np.ndarray) -> np.ndarray:
    """Compact JSON numbers (3 significant digits, `null` for NaN)."""
    # wide enough for "null": "%.3g" of NaN alone would give a 3-character dtype that truncates it to "nul"
    out = np.char.mod("%.3g", values.astype(np.float64)).astype("<U12")
    out[~np.isfinite(values)] = "null"
    return out


DEFAULT_MAX_EXAMPLES = 5000
"""Examples embedded in the viewer by default: the page stays a few MB and loads fast whatever the dataset size
(the summary, charts and top tokens always cover every example)."""


def examples_json(scored: ScoredDataset, max_examples: int = DEFAULT_MAX_EXAMPLES) -> str:
    """The viewer's data for the first `max_examples` examples: `vocab` (the distinct texts of their response tokens)
    and one row per example: `[index, response tokens, dropped tokens, reason mask, vocab indices, reason bits, ri,
    kn, tr]`, response tokens only (bits 1/2/4/8 as in `xtf_drop`; mask bit 16: some token has several reasons)."""
    shown = min(scored.n_examples, max_examples)
    end = int(scored.offsets[shown])
    response = scored.response[:end]
    ids = scored.input_ids[:end][response]
    vocab_ids, inverse = np.unique(ids, return_inverse=True)
    vocab = scored.texts.of(vocab_ids.tolist())
    drop = scored.selection.reasons[:end][response].astype(np.int64)
    ri, kn, tr = (_numbers(a[:end][response]) for a in (scored.scores.ri, scored.scores.kn, scored.scores.tr))
    n_response, n_dropped = per_example_counts(scored.offsets[: shown + 1], response, scored.selection.reasons[:end])
    bounds = np.concatenate([[0], np.cumsum(n_response)])
    several = np.array([bin(b).count("1") > 1 for b in range(8)])[drop & 7]
    rows = []
    for i in range(shown):
        a, b = int(bounds[i]), int(bounds[i + 1])
        bits = drop[a:b]
        mask = int(np.bitwise_or.reduce(bits)) if b > a else 0
        if b > a and several[a:b].any():
            mask |= SEVERAL_FLAG
        rows.append(
            f"[{i},{b - a},{int(n_dropped[i])},{mask},[{','.join(map(str, inverse[a:b].tolist()))}],"
            f"[{','.join(map(str, bits.tolist()))}],[{','.join(ri[a:b])}],[{','.join(kn[a:b])}],[{','.join(tr[a:b])}]]"
        )
    return '{"vocab":' + json.dumps(vocab, ensure_ascii=False) + ',"examples":[' + ",\n".join(rows) + "]}"


def render_html(scored: ScoredDataset | ScoredFolder, page_size: int = 50, max_examples: int = DEFAULT_MAX_EXAMPLES) -> str:
    """The whole report as one HTML string (token texts must be attached: `output.attach_texts`). A `ScoredFolder`
    is read a part at a time, twice (the histograms' range, then their counts), and only the examples the viewer
    embeds are held together."""
    summary = scored.summary
    values = np.zeros(256, np.int64)
    dropped_ids = DroppedTokens()
    histograms = ScoreHistograms(summary)
    per_resp_parts, per_drop_parts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for _, part in scored.parts():
        drop, response = part.selection.reasons, part.response
        values += value_counts(drop)
        dropped_ids.add(part.input_ids, drop)
        counted = per_example_counts(part.offsets, response, drop)
        per_resp_parts.append(counted[0])
        per_drop_parts.append(counted[1])
        histograms.observe(_score_columns(part), response)
    for _, part in scored.parts():
        histograms.count(_score_columns(part), part.response, part.selection.reasons)
    per_resp, per_drop = np.concatenate(per_resp_parts), np.concatenate(per_drop_parts)
    n_response = int(per_resp.sum())
    n_dropped = int(values[1:].sum())
    counts = counts_by_reason(values)
    pct = lambda n: f"{n / n_response:.1%}" if n_response else "0%"  # noqa: E731
    fractions = dropped_fractions(per_resp, per_drop)
    rows = [
        ("scored folder", _esc(scored.source.name)),
        ("model", _esc(summary.get("model", "?"))),
        ("data", _esc(summary.get("data", "?"))),
        ("examples", f"{scored.n_examples:,}"),
        ("response tokens", f"{n_response:,}"),
        ("dropped tokens", f"{n_dropped:,} ({pct(n_dropped)})"),
        *(
            (f"lacking {name} ({SHORT_NAMES[name]})", f"<span class='sw' style='background:{COLORS[name]}'></span>{counts[name]:,} ({pct(counts[name])})")
            for name in ATTRIBUTES
        ),
        *((f"overlap {k}", f"{v:,}") for k, v in overlaps_of(values).items()),
        ("examples with a dropped token", f"{int((per_drop > 0).sum()):,}"),
        ("dropped fraction per example", f"median {np.median(fractions) if len(fractions) else 0:.1%}, max {fractions.max() if len(fractions) else 0:.1%}"),
    ]
    if "protected_tokens" in summary:
        rows.append(("protected tokens", f"{summary['protected_tokens']:,}"))
    spans = summary.get("dropped_spans")
    spans_html = ""
    if spans is not None:
        off_task, repeats = dropped_span_counts(spans)
        rows.append((f"spans {filtered_verb(summary)}", f"{spans['dropped_spans']:,} of {spans['spans']:,} in "
                     f"{spans['examples_with_a_dropped_span']:,} examples: {off_task:,} off-task, {repeats:,} repeats"))
        explained = any("why" in item for item in spans["most_surprising"])
        items = "".join(
            f"<tr><td class='num'>#{item['example']}</td><td class='num'>{item['surprise']:.2f}</td>"
            + (f"<td class='num'>{span_gain_text(item.get('prompt_gain'))}</td><td>{_esc(item.get('why', ''))}</td>"
               if explained else "")
            + f"<td><code>{_esc(json.dumps(item['text'], ensure_ascii=False))}</code></td></tr>"
            for item in spans["most_surprising"]
        )
        gain_note = ("; prompt gain: how much more likely the prompt makes its word tokens (nats); why: above the "
                     "surprise fence (surprising), or below it and made less likely by the prompt (not grounded)"
                     if explained else "")
        headings = "<th>example</th><th>surprise</th>" + ("<th>prompt gain</th><th>why</th>" if explained else "") + "<th>span</th>"
        spans_html = (
            f"<section><h2>{filtered_verb(summary).capitalize()} spans</h2><p class='note'>the most surprising off-task "
            f"spans (mean -log p of their word tokens, nats){gain_note}; each was {filtered_verb(summary)} whole, or "
            f"only its surprising phrase</p><table><tr>{headings}</tr>"
            + (items or "<tr><td colspan='3'>none</td></tr>") + "</table></section>"
        )
    hists = histograms.result()
    if scored.config.ri_layers == "none":
        hists["reasoning"]["empty"] = "not scored: ri_layers is none (spans selection reads no RI)"
    tops = dropped_ids.top(scored.texts, limit=10)
    data = examples_json(scored.first_examples(max_examples), max_examples).replace("</", "<\\/")
    shown = min(scored.n_examples, max_examples)
    viewer_note = (
        f"<p class='note' id='truncated'>The viewer holds the first {shown:,} of {scored.n_examples:,} examples "
        f"(<code>--max-examples</code>); the figures above cover all of them.</p>"
        if shown < scored.n_examples
        else ""
    )
    legend = "".join(
        f"<span class='tok drop drop-{key}'>{label}</span> "
        for key, label in (*((a.field, a.short) for a in ATTRIBUTE_REGISTRY), ("multi", "several"),
                           ("tr drop-span", "off-task span"), ("kn drop-span", "repeated span"))
    )
    attribute_options = "".join(f'<option value="{a.bit}">dropped by {a.short}</option>' for a in ATTRIBUTE_REGISTRY)
    body = f"""
<h1>XTF report <small>{_esc(scored.source.name)}</small></h1>
<section class="grid">
 <div><h2>Dataset</h2>{_table(rows)}</div>
 <div><h2>Reason combinations</h2><p class="note">dropped tokens per exact set of reasons</p>
 {upset_svg(combinations_of(values))}
 <h2>Thresholds</h2>{_table(_thresholds_rows(summary, scored.config.model_dump(mode="json")))}</div>
</section>
<section><h2>Scores of response tokens</h2>
<p class="note">grey: all scored response tokens; colour: tokens dropped for that attribute (caps and the drop ratio
limit how many of the tokens past a threshold are dropped); dashed: thresholds.</p>
<div class="hists">{"".join(histogram_svg(name, hists[name]) for name in ATTRIBUTES)}</div></section>
<section><h2>Most dropped tokens</h2>{_top_tokens_html(tops)}</section>
{spans_html}
<section><h2>Examples</h2>{viewer_note}
<div class="controls">
 <input id="q" type="search" placeholder="search text..." aria-label="search">
 <select id="reason" aria-label="filter by reason">
  <option value="all">all examples</option><option value="any">with a dropped token</option>
  {attribute_options}
  <option value="8">a masked span (off-task or repeated)</option>
  <option value="16">a token with several reasons</option><option value="none">nothing dropped</option>
 </select>
 <select id="sort" aria-label="sort">
  <option value="index">input order</option><option value="desc">most dropped first</option>
  <option value="asc">least dropped first</option>
 </select>
 <button id="prev">&#8592;</button><span id="pageinfo"></span><button id="next">&#8594;</button>
 <span class="legend">{legend}</span>
</div>
<div id="tip" class="tip">hover or tap a token for its scores</div>
<div id="examples"></div>
</section>
"""
    return TEMPLATE.format(title=_esc(f"XTF report: {scored.source.name}"), css=CSS, body=body, data=data, page_size=int(page_size), js=_script())


def write_html(scored: ScoredDataset | ScoredFolder, path: str | Path, page_size: int = 50, max_examples: int = DEFAULT_MAX_EXAMPLES) -> Path:
    """Write the report to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(scored, page_size, max_examples), encoding="utf-8")
    return path


CSS = f"""
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1240px; padding: 12px 20px; color: #222; }}
h1 {{ margin: 4px 0 0; font-size: 24px; }}
h1 small {{ color: #777; font-weight: normal; font-size: 60%; }}
h2 {{ font-size: 17px; margin: 12px 0 4px; }} h3 {{ font-size: 14px; margin: 4px 0; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }}
table {{ border-collapse: collapse; }} table.kv td, table.kv th {{ padding-top: 0; padding-bottom: 0; }}
table.kv th {{ white-space: nowrap; text-align: left; font-weight: normal; color: #555; padding-right: 14px; vertical-align: top; }}
table.kv td {{ text-align: right; }}
.note {{ color: #666; font-size: 12px; margin: 2px 0 6px; }}
.chart text.lab {{ font-size: 12px; fill: #333; }} .chart text.small {{ font-size: 10px; fill: #444; }}
.chart text.title {{ font-size: 13px; font-weight: bold; }}
.hists {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.tops {{ display: grid; grid-template-columns: repeat(3, 1fr); gap: 16px; }}
.tops td {{ padding: 0 4px; }} .tops td.num {{ text-align: right; }} .barcell {{ width: 120px; }}
.bar {{ display: inline-block; height: 10px; }} .sw {{ display: inline-block; width: 10px; height: 10px; margin-right: 6px; }}
.controls {{ display: flex; gap: 8px; align-items: center; flex-wrap: wrap; position: sticky; top: 0; background: #fff; padding: 6px 0; }}
.controls input {{ width: 220px; }}
.tip {{ position: sticky; top: 40px; background: #f6f6f6; border: 1px solid #ddd; padding: 3px 8px; font-size: 12px; z-index: 1; }}
.example {{ border-top: 1px solid #eee; padding: 8px 0; }}
.example .head {{ color: #666; font-size: 12px; margin-bottom: 3px; }}
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; }}
.tok {{ cursor: default; }}
.tok.drop {{ border-radius: 2px; }}
.drop-ri {{ background: {COLORS["reasoning"]}77; }} .drop-kn {{ background: {COLORS["novelty"]}77; }}
.drop-tr {{ background: {COLORS["relevance"]}77; }} .drop-multi {{ background: {COLORS["several"]}aa; }}
.drop-span {{ text-decoration: line-through; text-decoration-color: #333a; }}
.legend .tok {{ padding: 0 4px; margin-right: 4px; text-decoration: none; }}
.tok.sel {{ outline: 2px solid #000; }}
@media (max-width: 800px) {{ .grid, .tops {{ grid-template-columns: 1fr; }} }}
"""

def _script() -> str:
    """The viewer's script, with the attribute tables of `config.ATTRIBUTE_REGISTRY` filled in."""
    names = {a.bit: a.short for a in ATTRIBUTE_REGISTRY}
    classes = {a.bit: f"drop-{a.field}" for a in ATTRIBUTE_REGISTRY}
    return (JS.replace("/*NAMES*/", json.dumps(names)).replace("/*CLASSES*/", json.dumps(classes))
            .replace("/*BITS*/", json.dumps([a.bit for a in ATTRIBUTE_REGISTRY])))


JS = r"""
(function () {
  var D = JSON.parse(document.getElementById('xtf-data').textContent);
  var V = D.vocab, E = D.examples, PAGE = parseInt(document.body.dataset.pageSize, 10) || 50;
  var NAMES = /*NAMES*/, CLS = /*CLASSES*/, BITS = /*BITS*/;
  var texts = null, page = 0, view = [];
  var q = document.getElementById('q'), reason = document.getElementById('reason'), sort = document.getElementById('sort');
  var out = document.getElementById('examples'), info = document.getElementById('pageinfo'), tip = document.getElementById('tip');
  function text(e) { var s = ''; for (var j = 0; j < e[4].length; j++) s += V[e[4][j]]; return s; }
  function reasons(bits) { var r = []; BITS.forEach(function (b) { if (bits & b) r.push(NAMES[b]); }); return r; }
  function fmt(x) { return x === null ? 'n/a' : String(x); }
  function describe(e, j) {
    var bits = e[5][j];
    return 'RI ' + fmt(e[6][j]) + '  KN ' + fmt(e[7][j]) + '  TR ' + fmt(e[8][j]) +
      (bits ? '  | dropped: ' + reasons(bits).join('+') + (bits & 8 ? (bits & 2 ? ' (repeats an earlier span)' : ' (off-task span)') : '') : '  | kept');
  }
  function frac(e) { return e[1] ? e[2] / e[1] : 0; }
  function update() {
    var needle = q.value.toLowerCase(), r = reason.value;
    if (needle && !texts) texts = E.map(function (e) { return text(e).toLowerCase(); });
    view = [];
    for (var i = 0; i < E.length; i++) {
      var e = E[i], m = e[3];
      if (r === 'any' && !m) continue;
      if (r === 'none' && m) continue;
      if (r !== 'all' && r !== 'any' && r !== 'none' && !(m & parseInt(r, 10))) continue;
      if (needle && texts[i].indexOf(needle) < 0) continue;
      view.push(e);
    }
    if (sort.value === 'desc') view.sort(function (a, b) { return frac(b) - frac(a) || a[0] - b[0]; });
    if (sort.value === 'asc') view.sort(function (a, b) { return frac(a) - frac(b) || a[0] - b[0]; });
    page = 0; render();
  }
  function render() {
    var pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    info.textContent = 'page ' + (page + 1) + ' of ' + pages + ' (' + view.length.toLocaleString() + ' examples)';
    var frag = document.createDocumentFragment();
    view.slice(page * PAGE, (page + 1) * PAGE).forEach(function (e) {
      var div = document.createElement('div'); div.className = 'example'; div.dataset.index = e[0];
      var head = document.createElement('div'); head.className = 'head';
      head.textContent = '#' + e[0] + ': ' + e[1] + ' response tokens, ' + e[2] + ' dropped (' + (100 * frac(e)).toFixed(1) + '%)';
      var body = document.createElement('div'); body.className = 'text';
      for (var j = 0; j < e[4].length; j++) {
        var s = document.createElement('span'), bits = e[5][j];
        var a = bits & 7;
        s.className = bits ? 'tok drop ' + ((a & (a - 1)) ? 'drop-multi' : CLS[a]) + (bits & 8 ? ' drop-span' : '') : 'tok';
        s.textContent = V[e[4][j]]; s.dataset.j = j; s.title = describe(e, j);
        body.appendChild(s);
      }
      body.addEventListener('click', function (ev) {
        var t = ev.target; if (!t.dataset || t.dataset.j === undefined) return;
        var old = document.querySelector('.tok.sel'); if (old) old.classList.remove('sel');
        t.classList.add('sel');
        tip.textContent = '#' + e[0] + ' token ' + t.dataset.j + ' ' + JSON.stringify(t.textContent) + ': ' + describe(e, +t.dataset.j);
      });
      body.addEventListener('mouseover', function (ev) {
        var t = ev.target; if (t.dataset && t.dataset.j !== undefined)
          tip.textContent = '#' + e[0] + ' token ' + t.dataset.j + ' ' + JSON.stringify(t.textContent) + ': ' + describe(e, +t.dataset.j);
      });
      div.appendChild(head); div.appendChild(body); frag.appendChild(div);
    });
    out.replaceChildren(frag);
  }
  var timer = null;
  q.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(update, 200); });
  reason.addEventListener('change', update); sort.addEventListener('change', update);
  document.getElementById('prev').addEventListener('click', function () { page--; render(); });
  document.getElementById('next').addEventListener('click', function () { page++; render(); });
  update();
})();
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body data-page-size="{page_size}">
{body}
<script type="application/json" id="xtf-data">{data}</script>
<script>{js}</script>
</body></html>
"""

