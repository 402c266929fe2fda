"""The pipeline report (medtune.reporting): exact table values and changes, escaping, the changed safety items,
the random-weights warning, charts that render in a real browser with their Chinese names, and the CJK font."""

from __future__ import annotations

import re
import warnings

import pytest

from medtune import charts as chart_module
from medtune.reporting import write_pipeline_report

SCRIPT = "<script>alert('x')</script>"


def exam(overall: float, by_type: dict[str, float], chance: float, items: list[dict] | None = None) -> dict:
    """An EXAM block as run_exam returns it plus the pipeline's "chance"."""
    by_class = [{"exam_type": t, "exam_class": f"{t}-综合", "items": 10, "accuracy": a} for t, a in by_type.items()]
    block = {"overall": overall, "item_accuracy": overall, "by_type": by_type, "by_class": by_class,
             "model": "m", "comparison": "letter sets (normalised)", "chance": chance}
    if items is not None:
        block["items"] = items
    return block


# Warfarin co-medication items, keyed as the interactions are: aspirin adds bleeding risk, rifampicin induces
# CYP2C9 and lowers the INR, amiodarone inhibits it and raises the INR, vitamin K antagonises warfarin.
SAFETY_DRUGS = {"s1": ("阿司匹林", "A"), "s2": ("利福平", "B"), "s3": ("胺碘酮", "C"), "s4": ("大剂量维生素K", "D")}
SAFETY_OPTIONS = {"A": "出血风险增加，INR可不变", "B": "抗凝作用减弱，INR降低", "C": "INR升高，需减少华法林剂量",
                  "D": "<b>华法林抗凝作用被拮抗</b>"}


def safety_items(answers: dict[str, str]) -> list[dict]:
    return [{"id": i, "question": f"服用华法林的患者同时使用{SAFETY_DRUGS[i][0]}，最主要的影响是？",
             "options": SAFETY_OPTIONS, "answer": SAFETY_DRUGS[i][1], "model_answer": a, "correct": a == SAFETY_DRUGS[i][1]}
            for i, a in answers.items()]


def log_history(losses: list[float], rewards: bool = False) -> list[dict]:
    entries = []
    for step, loss in enumerate(losses, start=1):
        entry = {"step": step, "epoch": step / len(losses), "loss": loss, "learning_rate": 1e-3 * (1 - step / 10),
                 "grad_norm": 1.0}
        if rewards:
            entry |= {"rewards/margins": 0.2 * step, "rewards/accuracies": min(1.0, 0.5 + 0.1 * step)}
        entries.append(entry)
        if step % 2 == 0:
            eval_entry = {"step": step, "epoch": step / len(losses), "eval_loss": loss + 0.1}
            if rewards:
                eval_entry |= {"eval_rewards/margins": 0.1 * step, "eval_rewards/accuracies": 0.5 + 0.05 * step}
            entries.append(eval_entry)
    entries.append({"step": len(losses), "train_runtime": 3.0, "train_loss": sum(losses) / len(losses)})
    return entries


def evaluation(overall: float, by_type: dict[str, float], generate: float | None, safety: dict[str, str],
               rouge_l: float, bleu: float, perplexity: float) -> dict:
    """One model's evaluations as the pipeline records them (CMB-Exam chance 0.2312, safety chance 0.25)."""
    found = {"cmb_exam": exam(overall, by_type, 0.2312),
             "safety": exam(0.5, {"药师考试": 0.5}, 0.25, safety_items(safety)),
             "clin": {"rouge_l": rouge_l, "bleu": bleu, "answers": 10},
             "perplexity": {"perplexity": perplexity, "tokens": 5000}}
    if generate is not None:
        found["cmb_exam_generate"] = exam(generate, {"医师考试": generate}, 0.2312)
    return found


@pytest.fixture
def results() -> dict:
    return pipeline_results()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, str]:
    """(report.html, report.md) of `pipeline_results()`, written once for the tests that only read them."""
    return write(tmp_path_factory.mktemp("written"), pipeline_results())


def pipeline_results() -> dict:
    """A pipeline run that skipped pt: base -> sft -> dpo, with generate mode, no general set."""
    return {
        "schema": 1, "output_dir": "outputs/pipeline", "base_model": "tiny-glm4", "random_weights": True,
        "created": "2026-11-30T21:00:00Z",
        "models": [{"name": "base", "path": "tiny-glm4"}, {"name": "sft", "path": "out/merged-sft"},
                   {"name": "dpo", "path": "out/merged-dpo"}],
        "training": {
            "sft": {"log_history": log_history([3.0, 2.5, 2.1, 1.8]), "wall_s": 30.5, "peak_rss_mb": 900.0,
                    "train_loss": 2.35},
            "dpo": {"log_history": log_history([0.69, 0.5, 0.3, 0.2], rewards=True), "wall_s": 75.0,
                    "peak_rss_mb": 950.0, "train_loss": 0.42},
        },
        "evaluations": {
            "base": evaluation(0.25, {"医师考试": 0.20, "护理考试": 0.30}, 0.10, {"s1": "A", "s2": "A", "s3": "C", "s4": "A"},
                               0.1234, 3.4, 123.4),
            "sft": evaluation(0.30, {"医师考试": 0.25, "护理考试": 0.35}, 0.15, {"s1": "A", "s2": "B", "s3": "A", "s4": "A"},
                              0.2, 5.0, 80.0),
            # generate mode not run for dpo
            "dpo": evaluation(0.2875, {"医师考试": 0.275, "护理考试": 0.30}, None, {"s1": "A", "s2": "B", "s3": "B",
                                                                               "s4": SCRIPT}, 0.21, 4.5, 82.5),
        },
        "data": [
            {"stage": "sft", "file": "data/sft/医疗对话.jsonl", "kind": "sft", "records": 1000,
             "dropped": {"too long": 3, "empty reply": 2}, "token_lengths": [512, 77, 130, 250, 300, 90]},
            {"stage": "dpo", "file": "data/dpo/pairs.jsonl", "kind": "preference", "records": 200, "dropped": {},
             "token_lengths": [200, 210, 190]},
        ],
        "data_safety": {"scrub": {"records_scanned": 1200, "phone_numbers_removed": 4,
                                  "by_kind": {"phone": 4, "id_card": 0}}},
        "stages_wall_s": {"sft": 30.5, "merge-sft": 2.0, "dpo": 75.0, "eval": 40.0},
    }


def md_row(markdown: str, label: str) -> list[str]:
    """Cells of the markdown table row whose first cell is `label`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in:\n{markdown}")


def md_section(markdown: str, title: str) -> str:
    return markdown.split(f"\n## {title}\n")[1].split("\n## ")[0]


def write(folder, results) -> tuple[str, str]:
    html_path, md_path = write_pipeline_report(folder / "report", results)
    assert (html_path, md_path) == (folder / "report" / "report.html", folder / "report" / "report.md")
    return html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


def test_markdown_table_values_and_changes_per_stage_are_exact(written):
    _, markdown = written
    header = md_row(markdown, "measure")
    assert header == ["measure", "chance", "base", "sft", "Δ sft", "dpo", "Δ dpo", "Δ base→dpo"]
    # percentages of the fractions; Δ = later minus earlier, in percentage points
    assert md_row(markdown, "CMB-Exam: overall (%)") == ["CMB-Exam: overall (%)", "23.12", "25.00", "30.00",
                                                           "+5.00", "28.75", "-1.25", "+3.75"]
    assert md_row(markdown, "CMB-Exam: 医师考试 (%)")[2:] == ["20.00", "25.00", "+5.00", "27.50", "+2.50", "+7.50"]
    assert md_row(markdown, "CMB-Exam: 护理考试 (%)")[2:] == ["30.00", "35.00", "+5.00", "30.00", "-5.00", "+0.00"]
    # generate mode ran for base and sft only: dpo's cell and the changes that need it are '–'
    assert md_row(markdown, "CMB-Exam, generate mode: overall (%)")[2:] == ["10.00", "15.00", "+5.00", "–", "–", "–"]
    assert md_row(markdown, "drug-safety probe: overall (%)")[1:] == ["25.00", "50.00", "50.00", "+0.00", "50.00",
                                                                       "+0.00", "+0.00"]
    assert md_row(markdown, "CMB-Clin ROUGE-L F1")[2:] == ["0.1234", "0.2000", "+0.0766", "0.2100", "+0.0100",
                                                           "+0.0866"]
    assert md_row(markdown, "CMB-Clin BLEU-4")[2:] == ["3.40", "5.00", "+1.60", "4.50", "-0.50", "+1.10"]
    assert md_row(markdown, "held-out perplexity (lower is better)")[2:] == ["123.40", "80.00", "-43.40", "82.50",
                                                                             "+2.50", "-40.90"]
    # every Δ column equals the difference of the value columns around it
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 8 and re.fullmatch(r"-?\d+\.\d+", cells[2]) and re.fullmatch(r"-?\d+\.\d+", cells[3]):
            digits = len(cells[2].split(".")[1])
            assert float(cells[4]) == pytest.approx(float(cells[3]) - float(cells[2]), abs=1.5 * 10 ** -digits)
    assert "_Not evaluated in this run: general knowledge (forgetting check)._" in markdown
    assert "Not run in this pipeline, so absent from every table: continued pretraining (pt)." in markdown


def test_training_data_and_wall_time_sections(written):
    _, markdown = written
    training = md_section(markdown, "Training")
    assert md_row(training, "sft") == ["sft", "4", "2.3500", "1.8000", "1.9000", "–", "–", "30.5 s", "900"]
    assert md_row(training, "dpo") == ["dpo", "4", "0.4200", "0.2000", "0.3000", "0.900", "0.800", "1 min 15.0 s",
                                       "950"]
    data_rows = [line for line in markdown.splitlines() if "医疗对话.jsonl" in line]
    assert data_rows == ["| sft | data/sft/医疗对话.jsonl | sft | 1,000 | too long: 3; empty reply: 2 | 77 | 190.0 | "
                         "226.5 | 512 |"]
    assert md_row(markdown, "merge-sft") == ["merge-sft", "2.0 s", "1.4%"]
    assert md_row(markdown, "total") == ["total", "2 min 27.5 s", "100.0%"]
    data_safety = md_section(markdown, "Data safety")
    assert "### scrub" in data_safety and md_row(data_safety, "by_kind.phone") == ["by_kind.phone", "4"]


def test_changed_safety_items_are_exactly_those_whose_answer_moved(written):
    html, markdown = written
    section = md_section(markdown, "Drug-safety answers that changed")
    listed = re.findall(r"^\| (s\d) \|", section, flags=re.M)
    assert listed == ["s2", "s3", "s4"]  # s1 answered A by both base and dpo
    assert "3 of 4 probe items got a different answer from dpo than from base: 1 now right, 1 now wrong, " \
           "1 changed but still wrong." in section
    assert md_row(section, "s2")[3:] == ["B", "A ✗", "B ✓", "fixed"]
    assert md_row(section, "s3")[3:] == ["C", "C ✓", "B ✗", "broken"]
    assert md_row(section, "s3")[1] == "服用华法林的患者同时使用胺碘酮，最主要的影响是？"
    assert md_row(section, "s3")[2] == ("A. 出血风险增加，INR可不变<br>B. 抗凝作用减弱，INR降低<br>C. INR升高，需减少华法林剂量<br>"
                                        "D. &lt;b&gt;华法林抗凝作用被拮抗&lt;/b&gt;")
    html_section = html.split('<section id="safety">')[1].split("</section>")[0]
    assert re.findall(r"<tr><td>(s\d)</td>", html_section) == ["s2", "s3", "s4"]


def test_untrusted_text_is_escaped_in_html_and_markdown(written):
    html, markdown = written
    assert "<script" not in html.lower() and "<b>华法林" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; ✗" in html
    assert "<script" not in markdown and "&lt;script&gt;alert('x')&lt;/script&gt; ✗" in markdown


def test_random_weights_warning_is_shown_exactly_when_the_weights_are_random(tmp_path, results, written):
    html, markdown = written  # random_weights: true
    assert "These numbers mean nothing" in html and "> **Warning:** These numbers mean nothing" in markdown
    assert html.index("These numbers mean nothing") < html.index('<section id="models">')  # at the top
    real = dict(results, random_weights=False)
    html, markdown = write(tmp_path, real)
    assert "mean nothing" not in html and "mean nothing" not in markdown


def test_a_run_with_only_the_base_model_evaluated_still_reports(tmp_path, results):
    minimal = {"schema": 1, "base_model": "m", "random_weights": False, "models": [{"name": "base", "path": "m"}],
               "evaluations": {"base": {"cmb_exam": results["evaluations"]["base"]["cmb_exam"]}}}
    html, markdown = write(tmp_path, minimal)
    assert md_row(markdown, "measure") == ["measure", "chance", "base"]
    assert md_row(markdown, "CMB-Exam: overall (%)") == ["CMB-Exam: overall (%)", "23.12", "25.00"]
    assert "_No training stage ran._" in markdown and "_No drug-safety items to compare" in markdown
    assert "continued pretraining (pt), supervised fine-tuning (sft), preference optimisation (dpo)." in markdown
    assert html.count("<img ") == 2  # exam types and exam sets; no training, clin or data charts
    _, markdown = write(tmp_path / "empty", {})
    assert "_No evaluation results in this run._" in markdown and "_No timings recorded._" in markdown


def test_without_a_cjk_font_chinese_names_are_numbered_on_the_chart_and_listed_beside_it(tmp_path, results,
                                                                                         monkeypatch):
    monkeypatch.setattr(chart_module, "cjk_font", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would warn: nothing Chinese may reach the chart
        html, _ = write(tmp_path, results)
    figure = html.split('<section id="models">')[1].split("</figure>")[0]
    assert re.findall(r'<li value="(\d)">(.*?)</li>', figure) == [("1", "医师考试"), ("2", "护理考试")]


def test_charts_pick_an_installed_cjk_font_so_chinese_labels_have_glyphs():
    from matplotlib import font_manager

    if not [f for f in font_manager.findSystemFonts() if "cjk" in f.lower()]:
        pytest.skip("no CJK font installed (Debian: apt-get install fonts-noto-cjk)")
    chart_module.cjk_font.cache_clear()
    assert chart_module.cjk_font() is not None and "CJK" in chart_module.cjk_font()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chart = chart_module.grouped_bars("医师考试 准确率", ["医师考试", "护理考试"], {"base": [0.2, 0.3]}, "准确率")
    assert chart.legend == [] and chart.png.startswith(b"\x89PNG")
    assert not [w for w in caught if "missing from font" in str(w.message)], [str(w.message) for w in caught]


def test_report_html_renders_in_a_browser_with_every_chart_and_the_chinese_names(tmp_path, results, browser):
    from selenium.webdriver.common.by import By

    html_path, _ = write_pipeline_report(tmp_path, results)
    html = html_path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(https?:)?//", html)  # self-contained: nothing fetched
    browser.get_log("browser")  # drop messages from earlier pages
    browser.get(html_path.as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    # exam types, exam sets, perplexity/clin, sft curves, dpo curves, dpo rewards, two token-length histograms
    assert len(images) == 8
    for image in images:
        complete, width, shown = browser.execute_script(
            "const i = arguments[0]; return [i.complete, i.naturalWidth, i.getBoundingClientRect().width];", image)
        assert complete and width > 0 and shown > 0, image.get_attribute("alt")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    text = browser.find_element(By.TAG_NAME, "body").text
    for name in ("医师考试", "护理考试", "服用华法林的患者同时使用利福平", "These numbers mean nothing"):
        assert name in text


def test_safety_verdicts_use_the_items_own_correct_field():
    """A multiple-answer key 'AC' answered 'AC' then 'CA' is right both times: not a change. An answer the
    evaluation scored right despite other spelling ('a') counts as right."""
    from medtune.reporting.content import safety_comparison

    def run(answers: dict[str, tuple[str, bool]]) -> dict:
        return {"safety": {"items": [{"id": i, "question": "q", "options": {"A": "x", "C": "y"}, "answer": "AC",
                                      "model_answer": a, "correct": c} for i, (a, c) in answers.items()]}}

    evaluations = {"base": run({"m1": ("AC", True), "m2": ("A", False), "m3": ("AC", True)}),
                   "sft": run({"m1": ("CA", True), "m2": ("c a", True), "m3": ("A", False)})}
    comparison = safety_comparison(["base", "sft"], evaluations)
    assert [(c.id, c.verdict) for c in comparison.changes] == [("m2", "fixed"), ("m3", "broken")]


def test_identical_items_claim_comes_from_the_item_ids(tmp_path, results, written):
    _, markdown = written  # the CMB-Exam blocks list no items: nothing is claimed either way
    assert md_section(markdown, "Models compared").strip().startswith("Δ columns give the change")
    for name in ("base", "sft", "dpo"):
        del results["evaluations"][name]["cmb_exam"]
        results["evaluations"][name].pop("cmb_exam_generate", None)
    _, markdown = write(tmp_path / "same", results)
    assert md_section(markdown, "Models compared").strip().startswith(
        "Every model answered the same items (the same item ids in every set). Δ columns")
    results["evaluations"]["dpo"]["safety"]["items"] = results["evaluations"]["dpo"]["safety"]["items"][:3]
    _, markdown = write(tmp_path / "differ", results)
    assert md_section(markdown, "Models compared").strip().startswith(
        "Not every model answered the same items in: drug-safety probe; compare those with care. Δ columns")
