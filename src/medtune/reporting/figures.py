"""Which charts a pipeline report shows, built from the report's content with the generic drawing helpers."""

from __future__ import annotations

from medtune.charts import Chart, Panel, Series, grouped_bars, histogram, line_panels
from medtune.reporting.content import EXAM_SETS, DataFile, Report, TrainingStage


def exam_type_chart(report: Report) -> Chart | None:
    """CMB-Exam accuracy per exam type and overall, one bar per model, with the chance line."""
    types = report.exam_types["cmb_exam"]
    names = [n for n in report.model_names if (report.evaluations.get(n) or {}).get("cmb_exam")]
    if not names:
        return None
    groups = [*types, "overall"]
    series = {}
    for name in names:
        exam = report.evaluations[name]["cmb_exam"]
        by_type = exam.get("by_type") or {}
        series[name] = [_percent(by_type.get(t)) for t in types] + [_percent(exam.get("overall"))]
    chance = _percent(next((report.evaluations[n]["cmb_exam"].get("chance") for n in names), None))
    # the contract gives chance for the whole set only; per type it differs a little with the option counts
    return grouped_bars("CMB-Exam accuracy by exam type (likelihood mode)", groups, series, "accuracy (%)",
                        chance=[chance] * len(groups) if chance is not None else None, ylim=(0, 105))


def exam_sets_chart(report: Report) -> Chart | None:
    """Overall accuracy on every exam-schema set (CMB-Exam, generate mode, safety probe, general), per model,
    each set with its own chance level."""
    keys = [k for k in EXAM_SETS if any((report.evaluations.get(n) or {}).get(k) for n in report.model_names)]
    names = [n for n in report.model_names if report.evaluations.get(n)]
    if not keys or not names:
        return None
    series = {n: [_percent(((report.evaluations[n].get(k)) or {}).get("overall")) for k in keys] for n in names}
    chance = [_percent(next((report.evaluations[n][k]["chance"] for n in names
                             if (report.evaluations[n].get(k) or {}).get("chance") is not None), None)) for k in keys]
    return grouped_bars("Overall accuracy per evaluation set", [EXAM_SETS[k] for k in keys], series,
                        "accuracy (%)", chance=chance, ylim=(0, 105))


def generation_metrics_chart(report: Report) -> Chart | None:
    """Perplexity and CMB-Clin scores, one panel each, one point per model in stage order."""
    wanted = [("held-out perplexity", "perplexity (lower is better)"), ("CMB-Clin ROUGE-L F1", "ROUGE-L F1"),
              ("CMB-Clin BLEU-4", "BLEU-4")]
    by_name = {m.name: m for m in report.measures}
    panels = []
    for measure_name, ylabel in wanted:
        measure = by_name.get(measure_name)
        if measure is None:
            continue
        points = [(i, v) for i, v in enumerate(measure.values) if v is not None]
        panels.append(Panel(ylabel, [Series(ylabel, [p[0] for p in points], [p[1] for p in points])],
                            xlabel="model"))
    if not panels:
        return None
    return line_panels("Perplexity and CMB-Clin per model", panels, xticks=report.model_names)


def training_charts(stage: TrainingStage) -> list[Chart]:
    """Loss (train and eval) and learning rate; for preference stages also reward margin and accuracy."""
    panels = []
    loss = [Series(label, *stage.curve(key), style) for key, label, style in
            (("loss", "train", "-"), ("eval_loss", "eval", "--")) if stage.curve(key)[0]]
    if loss:
        panels.append(Panel("loss", loss))
    if stage.curve("learning_rate")[0]:
        panels.append(Panel("learning rate", [Series("learning rate", *stage.curve("learning_rate"))]))
    charts = [line_panels(f"{stage.name}: loss and learning rate", panels)] if panels else []
    rewards = []
    for key, ylabel, ylim in (("rewards/margins", "reward margin (chosen − rejected)", None),
                              ("rewards/accuracies", "reward accuracy", (-0.02, 1.02))):
        series = [Series(label, *stage.curve(prefix + key), style) for prefix, label, style in
                  (("", "train", "-"), ("eval_", "eval", "--")) if stage.curve(prefix + key)[0]]
        if series:
            rewards.append(Panel(ylabel, series, ylim=ylim))
    if rewards:
        charts.append(line_panels(f"{stage.name}: reward margin and reward accuracy", rewards))
    return charts


def token_length_chart(entry: DataFile) -> Chart | None:
    if not entry.token_lengths:
        return None
    # the file name goes in the caption around the chart, where any script renders
    return histogram(f"{entry.stage} ({entry.kind}): token lengths", entry.token_lengths, "tokens per record")


def _percent(value) -> float | None:
    return 100.0 * value if isinstance(value, int | float) and not isinstance(value, bool) else None
