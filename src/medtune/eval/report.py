"""Results a person would rather look at than read: a markdown table and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(output_dir: Path, results: dict, title: str) -> None:
    """results.json, results.md and results.png from a score dictionary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = [f"# {title}", "", f"- model: `{results.get('model', '')}`",
             f"- overall (mean of exam types): **{100 * results['overall']:.2f}%**; items right: "
             f"{100 * results['item_accuracy']:.2f}%", "", "| # | exam type | exam class | items | accuracy |",
             "|---|---|---|---|---|"]
    for number, row in enumerate(results["by_class"], start=1):
        lines.append(f"| {number} | {row['exam_type']} | {row['exam_class']} | {row['items']} | "
                     f"{100 * row['accuracy']:.2f}% |")
    lines += ["", "| exam type | accuracy (mean of its classes) |", "|---|---|"]
    lines += [f"| {t} | {100 * a:.2f}% |" for t, a in results["by_type"].items()]
    (output_dir / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _bar_chart(output_dir / "results.png", results, title)


def chart_groups(results: dict) -> list[str]:
    """The chart's bars, in the order of results.md's numbered rows (a bar drawn as its number is that row)."""
    return [f"{r['exam_type']}\n{r['exam_class']}" for r in results["by_class"]] + ["overall"]


def _bar_chart(path: Path, results: dict, title: str) -> None:
    """Accuracy per exam class and overall, with the chance line when the results carry one. Without a CJK font
    the Chinese class names are drawn as their row number in results.md (the shared chart helpers' fallback)."""
    from medtune.charts import grouped_bars

    rows = results["by_class"]
    groups = chart_groups(results)
    accuracies = [100 * r["accuracy"] for r in rows] + [100 * results["overall"]]
    model = Path(str(results.get("model") or "model")).name or "model"  # a folder path is too long for a legend
    chance = results.get("chance")
    chart = grouped_bars(title, groups, {model: accuracies}, "accuracy (%)", ylim=(0, 105),
                         chance=[100 * chance] * len(groups) if chance is not None else None)
    path.write_bytes(chart.png)
