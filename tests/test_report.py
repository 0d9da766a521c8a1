"""`xtf report`: statistics on hand-made drop arrays, and the real CLI on a folder the real `xtf score` wrote
(HTML checked in a real headless Chromium, token export, terminal view)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from xtf_plugin.cli import main
from xtf_plugin.output import attach_texts, read_output_dir
from xtf_plugin.report.stats import dropped_fractions, per_example_counts, reason_names, score_histograms
from xtf_plugin.report.summary import pairwise_overlaps, reason_combinations, reason_counts, top_dropped_tokens
from xtf_plugin.report.terminal import marked_text

# 1 = RI, 2 = KN, 4 = TR
DROP = np.array([0, 1, 2, 3, 4, 6, 0, 2, 7, 2], np.uint8)


def test_reason_counts_overlaps_combinations_by_hand():
    assert reason_counts(DROP) == {"reasoning": 3, "novelty": 6, "relevance": 3}
    assert pairwise_overlaps(DROP) == {"reasoning+novelty": 2, "reasoning+relevance": 1, "novelty+relevance": 2}
    assert reason_combinations(DROP) == {
        "reasoning": 1,
        "novelty": 3,
        "reasoning+novelty": 1,
        "relevance": 1,
        "novelty+relevance": 1,
        "reasoning+novelty+relevance": 1,
    }
    assert sum(reason_combinations(DROP).values()) == int((DROP > 0).sum()) == 8
    # masked with its span (bit 8) or alone, a TR token counts for TR once
    assert reason_combinations(np.array([4, 12, 12, 10], np.uint8)) == {"relevance": 3, "novelty": 1}


def test_top_dropped_tokens_and_reason_names_by_hand():
    ids = np.array([5, 7, 7, 9, 7, 9, 5, 7, 9, 9])
    tops = top_dropped_tokens(ids, DROP, {5: "a", 7: "b", 9: "c"}, limit=2)
    # KN drops positions 2, 3, 5, 7, 8, 9: ids 7, 9, 9, 7, 9, 9; RI 1, 3, 8: 7, 9, 9; TR 4, 5, 8: 7, 9, 9
    assert tops["novelty"] == [("c", 4), ("b", 2)]
    assert tops["reasoning"] == [("c", 2), ("b", 1)]
    assert tops["relevance"] == [("c", 2), ("b", 1)]
    assert reason_names(0) == []
    assert reason_names(6) == ["novelty", "relevance"]
    assert reason_names(7) == ["reasoning", "novelty", "relevance"]


def test_per_example_counts_and_fractions_by_hand():
    offsets = np.array([0, 4, 4, 10])  # the middle example is empty
    response = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 0], bool)
    n_resp, n_drop = per_example_counts(offsets, response, DROP)
    assert n_resp.tolist() == [3, 0, 5]
    assert n_drop.tolist() == [3, 0, 5]
    assert dropped_fractions(n_resp, n_drop).tolist() == [1.0, 0.0, 1.0]


def test_histograms_count_response_tokens_and_place_thresholds():
    response = np.ones(4, bool)
    scores = {
        "reasoning": np.array([np.e**-2, np.e**-1, 1.0, np.nan], np.float32),
        "novelty": np.array([0.01, 0.5, 0.9, 0.99], np.float32),
        "relevance": np.array([-0.5, 0.0, 0.5, 1.0], np.float32),
    }
    drop = np.array([3, 2, 0, 4], np.uint8)
    summary = {
        "thresholds": {
            "kn_p_threshold": 0.95,
            "tr_otsu_thresholds": [-0.2, 0.3],
            "ri_fence": {"k": 1.5, "scale": "log", "min": -3.0, "median": -1.5, "max": -1.0, "examples": 1},
        }
    }
    hists = score_histograms(scores, response, drop, summary, bins=4)
    ri = hists["reasoning"]
    assert ri["label"].startswith("ln RI")
    assert sum(ri["all"]) == 3 and sum(ri["dropped"]) == 1  # NaN left out; ln values -2, -1, 0
    assert ri["edges"][0] == pytest.approx(-3.0)  # widened to show the whole fence band
    assert ri["lines"] == [("median fence", -1.5)] and ri["band"] == (-3.0, -1.0)
    kn = hists["novelty"]
    assert kn["lines"][0][1] == pytest.approx(0.05) and kn["edges"][0] == 0.0 and kn["edges"][-1] == 1.0
    assert sum(kn["all"]) == 4 and sum(kn["dropped"]) == 2
    assert [v for _, v in hists["relevance"]["lines"]] == [-0.2, 0.3]
    assert sum(hists["relevance"]["dropped"]) == 1


@pytest.fixture
def scored_dir(tiny_model_dir, gsm8k_jsonl, tmp_path, cache_dir):
    out = tmp_path / "scored"
    args = ["score", "--model", str(tiny_model_dir), "--data", str(gsm8k_jsonl), "--out", str(out), "--quiet"]
    # the paper preset's token tests, loosened so the tiny random model's scores drop tokens of every kind
    assert main([*args, "--set", "preset=paper", "--set", "drop_ratio=0.3", "--set", "caps.novelty=0.3",
                 "--set", "kn_p_threshold=0.001"]) == 0
    return out


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xtf report: error:") and "train.parquet" in err and err.count("\n") == 1


def test_tokens_export_and_terminal_view(scored_dir, tmp_path, capsys):
    tokens = tmp_path / "tokens.jsonl"
    assert main(["report", str(scored_dir), "--tokens", str(tokens), "--examples", "2"]) == 0
    out = capsys.readouterr().out
    table = pq.read_table(scored_dir / "train.parquet").to_pylist()
    rows = [json.loads(line) for line in tokens.read_text().splitlines()]
    assert len(rows) == sum(len(r["input_ids"]) for r in table)
    flat = [(i, j, r) for i, r in enumerate(table) for j in range(len(r["input_ids"]))]
    names = ["reasoning", "novelty", "relevance"]
    for row, (i, j, source) in zip(rows, flat, strict=True):
        assert (row["example"], row["position"]) == (i, j)
        for key, column in (("ri", "xtf_ri"), ("kn", "xtf_kn"), ("tr", "xtf_tr")):
            value = source[column][j]
            assert row[key] is None if math.isnan(value) else row[key] == pytest.approx(value, abs=1e-6)
        bits = source["xtf_drop"][j]
        assert row["reasons"] == [n for b, n in zip((1, 2, 4), names, strict=True) if bits & b]
        assert row["kept"] == (bits == 0)
    assert any(not r["kept"] for r in rows)
    # the terminal view (stdout is not a TTY here): the summary, then examples with bracketed dropped tokens
    assert "XTF summary" in out and "example 0:" in out and "example 1:" in out and "example 2:" not in out
    examples = out[out.index("--- example 0:") :]
    marks = re.findall(r"\[\[(.*?)\]\]\(((?:RI|KN|TR)(?:\+(?:RI|KN|TR))*)\)", examples, re.S)
    first_two = [r for r in rows if r["example"] < 2 and not r["kept"]]
    assert len(marks) == len(first_two) > 0
    assert [m[0] for m in marks] == [r["token"] for r in first_two]
    label = {"reasoning": "RI", "novelty": "KN", "relevance": "TR"}
    assert [m[1] for m in marks] == ["+".join(label[n] for n in r["reasons"]) for r in first_two]
    scored = attach_texts(read_output_dir(scored_dir))  # the model recorded in summary.json
    assert marked_text(scored, 0).count("[[") == sum(1 for r in first_two if r["example"] == 0)


def test_html_report_in_headless_chromium(scored_dir, tmp_path):
    report = tmp_path / "report.html"
    assert main(["report", str(scored_dir), "--html", str(report), "--page-size", "5"]) == 0
    page = report.read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # self-contained
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the HTML was written but not rendered")
    flags = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]  # fmt: skip
    url = report.as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60, check=True).stdout
    scored = read_output_dir(scored_dir)
    # the first page: 5 examples rendered by the script, every response token a span, dropped ones coloured
    assert dom.count('class="example"') == 5
    first = np.concatenate([scored.selection.reasons[scored.example_slice(i)][scored.response[scored.example_slice(i)]] for i in range(5)])
    spans = re.findall(r'<span class="(tok[^"]*)"', dom)
    swatches = 6  # the legend: RI, KN, TR, several, off-task span, repeated span
    assert len(spans) == len(first) + swatches
    dropped = [c for c in spans if "drop" in c.split()]
    assert len(dropped) == int((first > 0).sum()) + swatches
    single = {1: "drop-ri", 2: "drop-kn", 4: "drop-tr"}
    for bits in (1, 2, 4):
        assert dom.count(f'class="tok drop {single[bits]}"') == int((first == bits).sum()) + 1
    several = int(((first & (first - 1)) > 0).sum())
    assert dom.count('class="tok drop drop-multi"') == several + 1
    assert re.search(r'title="RI [-0-9.e]+ +KN [-0-9.e]+ +TR [-0-9.e]+ +\| dropped: ', dom)
    assert "page 1 of 3 (12 examples)" in dom
    assert dom.count("<svg") >= 4 and 'class="chart upset"' in dom and dom.count('class="threshold"') >= 2
    png = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={png}", "--window-size=1280,2000", url], capture_output=True, timeout=60, check=True
    )
    assert png.is_file() and png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_viewer_holds_at_most_max_examples(scored_dir, tmp_path):
    """Large datasets: the viewer embeds the first --max-examples examples and says so; the figures cover all."""
    from xtf_plugin.report.html import examples_json

    scored = attach_texts(read_output_dir(scored_dir))
    assert [row[0] for row in json.loads(examples_json(scored, 5))["examples"]] == [0, 1, 2, 3, 4]
    html = tmp_path / "small.html"
    assert main(["report", str(scored_dir), "--html", str(html), "--max-examples", "5"]) == 0
    assert "The viewer holds the first 5 of 12 examples" in html.read_text()
    assert main(["report", str(scored_dir), "--html", str(html)]) == 0
    assert "The viewer holds the first" not in html.read_text()
    assert main(["report", str(scored_dir), "--html", str(html), "--max-examples", "0"]) == 2


def test_the_report_reads_a_part_at_a_time_and_says_the_same(scored_dir, tmp_path, monkeypatch, capsys):
    """`xtf report` reads the folder one part of the examples at a time (the whole is never held; the viewer's
    examples are read alone): with parts of 5 examples the page, the token export and the terminal view equal
    those read in one part, and the figures equal those of the whole dataset in memory."""
    import xtf_plugin.output as output
    from xtf_plugin.report.html import render_html

    folder = output.ScoredFolder(scored_dir)
    whole = read_output_dir(scored_dir)
    assert folder.n_examples == whole.n_examples == 12
    written = {}
    for rows in (5, 10**6):
        monkeypatch.setattr(output, "ROWS_PER_GROUP", rows)
        parts = list(output.ScoredFolder(scored_dir).parts())
        assert [first for first, _ in parts] == ([0, 5, 10] if rows == 5 else [0])
        assert np.array_equal(np.concatenate([p.input_ids for _, p in parts]), whole.input_ids)
        assert np.array_equal(np.concatenate([p.selection.reasons for _, p in parts]), whole.selection.reasons)
        head = output.ScoredFolder(scored_dir).first_examples(7)
        assert head.n_examples == 7 and np.array_equal(head.input_ids, whole.input_ids[: whole.offsets[7]])
        page, tokens = tmp_path / f"page-{rows}.html", tmp_path / f"tokens-{rows}.jsonl"
        assert main(["report", str(scored_dir), "--html", str(page), "--tokens", str(tokens), "--max-examples", "7"]) == 0
        capsys.readouterr()
        assert main(["report", str(scored_dir), "--examples", "6"]) == 0
        written[rows] = page.read_text(), tokens.read_text(), capsys.readouterr().out
    assert written[5] == written[10**6]
    in_memory = render_html(attach_texts(whole), max_examples=7)
    assert written[5][0] == in_memory
    viewer = json.loads(in_memory[in_memory.index('{"vocab":'):].split("</script>")[0].rstrip().rstrip(";").replace("<\\/", "</"))
    shown = whole.response[: whole.offsets[7]]
    assert len(viewer["examples"]) == 7 and len(viewer["vocab"]) == np.unique(whole.input_ids[: whole.offsets[7]][shown]).size
