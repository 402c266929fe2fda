"""Results a person would rather look at than read: a markdown table and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(output_dir: Path, results: dict, title: str) -> None:
    """results.json, results.md and results.png (when matplotlib is installed) from a score dictionary."""
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


def _bar_chart(path: Path, results: dict, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import font_manager
    except ImportError:
        return
    # Chinese labels need a CJK font; fall back to class indices when none is installed.
    cjk = [f.name for f in font_manager.fontManager.ttflist if any(k in f.name for k in ("CJK", "Hei", "Song", "Kai"))]
    if cjk:
        plt.rcParams["font.sans-serif"] = [cjk[0]]
    rows = results["by_class"]
    labels = [f"{r['exam_type']}/{r['exam_class']}" if cjk else f"class {i + 1}" for i, r in enumerate(rows)]
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    axis.bar(range(len(rows)), [100 * r["accuracy"] for r in rows], color="#3b7dd8")
    axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylim(0, 100)
    axis.set_ylabel("accuracy (%)")
    axis.axhline(100 * results["overall"], color="#d8553b", linestyle="--", label=f"overall {100 * results['overall']:.1f}%")
    axis.legend()
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
