"""What a pipeline report says, worked out once from `pipeline_results.json` (see PIPELINE_RESULTS contract) and
rendered twice, as HTML and as markdown. Nothing here formats for one output; missing parts become None."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

STAGES = ("base", "pt", "sft", "dpo")
STAGE_TITLES = {"base": "base", "pt": "continued pretraining (pt)", "sft": "supervised fine-tuning (sft)",
                "dpo": "preference optimisation (dpo)"}
# exam-schema evaluations: key in an evaluation -> how the report names it
EXAM_SETS = {"cmb_exam": "CMB-Exam", "cmb_exam_generate": "CMB-Exam, generate mode", "safety": "drug-safety probe",
             "general": "general knowledge (forgetting check)"}
MISSING = "–"


@dataclass
class Measure:
    """One row of the model comparison: a value per model (None: not measured)."""

    name: str
    values: list[float | None]
    unit: str = ""  # "%" rows are stored as fractions and shown as percentages; deltas in percentage points
    digits: int = 2
    lower_is_better: bool = False
    chance: float | None = None

    def shown(self) -> list[float | None]:
        scale = 100.0 if self.unit == "%" else 1.0
        return [v * scale if _number(v) else None for v in self.values]

    def deltas(self) -> list[float | None]:
        """Change from the previous model (None for the first model and where either value is missing)."""
        shown = self.shown()
        return [None] + [b - a if a is not None and b is not None else None for a, b in zip(shown, shown[1:])]

    def total_delta(self) -> float | None:
        shown = self.shown()
        return shown[-1] - shown[0] if len(shown) > 1 and None not in (shown[0], shown[-1]) else None


@dataclass
class SafetyChange:
    id: str
    question: str
    options: dict[str, str]
    answer: str
    before: str
    after: str
    # as the evaluation scored each answer (its `correct` field): 'CA' for the key 'AC' is right, though the
    # strings differ
    before_correct: bool
    after_correct: bool

    @property
    def verdict(self) -> str:
        was, now = self.before_correct, self.after_correct
        return "fixed" if now and not was else "broken" if was and not now else "changed (still wrong)"


@dataclass
class SafetyComparison:
    before_model: str
    after_model: str
    compared: int
    changes: list[SafetyChange]


@dataclass
class DataFile:
    stage: str
    file: str
    kind: str
    records: int | None
    dropped: dict[str, int]
    token_lengths: list[int]

    def length_summary(self) -> dict[str, float] | None:
        if not self.token_lengths:
            return None
        return {"min": min(self.token_lengths), "median": statistics.median(self.token_lengths),
                "mean": statistics.fmean(self.token_lengths), "max": max(self.token_lengths)}


@dataclass
class TrainingStage:
    name: str
    log_history: list[dict]
    wall_s: float | None
    peak_rss_mb: float | None
    train_loss: float | None

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one logged quantity, in logging order."""
        points = [(e.get("step", i), e[key]) for i, e in enumerate(self.log_history) if _number(e.get(key))]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> float | None:
        values = self.curve(key)[1]
        return values[-1] if values else None

    @property
    def steps(self) -> int | None:
        steps = [e["step"] for e in self.log_history if _number(e.get("step"))]
        return max(steps) if steps else None

    @property
    def is_preference(self) -> bool:
        return any("rewards/margins" in e or "eval_rewards/margins" in e for e in self.log_history)


@dataclass
class Report:
    title: str
    base_model: str
    created: str
    output_dir: str
    random_weights: bool
    models: list[dict]
    skipped: list[str]
    measures: list[Measure]
    missing_measures: list[str]
    exam_types: dict[str, list[str]]  # exam set key -> its exam types, in first-seen order
    evaluations: dict[str, dict]
    training: list[TrainingStage]
    safety: SafetyComparison | None
    data: list[DataFile]
    data_safety: dict
    wall_times: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.models]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_report(results: dict) -> Report:
    models = _models(results)
    names = [m["name"] for m in models]
    evaluations = results.get("evaluations") or {}
    measures, missing = comparison_measures(names, evaluations)
    training_entries = results.get("training") or {}
    ordered = [s for s in STAGES if s in training_entries] + [s for s in training_entries if s not in STAGES]
    return Report(
        title="medtune pipeline report", base_model=str(results.get("base_model", "")),
        created=str(results.get("created", "")), output_dir=str(results.get("output_dir", "")),
        random_weights=bool(results.get("random_weights")), models=models,
        skipped=[s for s in STAGES if s not in names], measures=measures, missing_measures=missing,
        exam_types={key: _exam_types(names, evaluations, key) for key in EXAM_SETS},
        evaluations=evaluations,
        training=[_training_stage(name, training_entries[name]) for name in ordered],
        safety=safety_comparison(names, evaluations),
        data=[_data_file(entry) for entry in results.get("data") or []],
        data_safety=results.get("data_safety") or {},
        wall_times={k: v for k, v in (results.get("stages_wall_s") or {}).items() if _number(v)})


def _models(results: dict) -> list[dict]:
    models = [m for m in results.get("models") or [] if isinstance(m, dict) and m.get("name")]
    if not models:  # an older or partial file: whatever was evaluated, in stage order
        evaluated = results.get("evaluations") or {}
        models = [{"name": n, "path": ""} for n in sorted(evaluated, key=lambda n: (n not in STAGES, STAGES.index(
            n) if n in STAGES else 0, n))]
    return models


def _exam_types(names: list[str], evaluations: dict, key: str) -> list[str]:
    types: list[str] = []
    for name in names:
        for exam_type in ((evaluations.get(name) or {}).get(key) or {}).get("by_type") or {}:
            if exam_type not in types:
                types.append(exam_type)
    return types


def comparison_measures(names: list[str], evaluations: dict) -> tuple[list[Measure], list[str]]:
    """Every measure any model has, with a value per model; and the measures nobody has (to say so)."""

    def pick(*path) -> list[float | None]:
        values = []
        for name in names:
            node = evaluations.get(name) or {}
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            values.append(node if _number(node) else None)
        return values

    def chance(key: str) -> float | None:
        return next((v for v in pick(key, "chance") if v is not None), None)

    rows: list[Measure] = []
    missing: list[str] = []
    for key, label in EXAM_SETS.items():
        overall = Measure(f"{label}: overall", pick(key, "overall"), "%", chance=chance(key))
        per_type = [Measure(f"{label}: {t}", pick(key, "by_type", t), "%")
                    for t in _exam_types(names, evaluations, key)] if key == "cmb_exam" else []
        if any(v is not None for v in overall.values):
            rows += [overall, *per_type]
        else:
            missing.append(label)
    clin = [Measure("CMB-Clin ROUGE-L F1", pick("clin", "rouge_l"), digits=4),
            Measure("CMB-Clin BLEU-4", pick("clin", "bleu"))]
    judged = sorted({k for n in names for k, v in ((evaluations.get(n) or {}).get("clin") or {}).items()
                     if k.startswith("judge_") and not k.endswith("_unparsed") and _number(v)})
    clin += [Measure(f"CMB-Clin {k.replace('_', ' ')} (1-5)", pick("clin", k)) for k in judged]
    clin.append(Measure("held-out perplexity", pick("perplexity", "perplexity"), lower_is_better=True))
    for measure in clin:
        (rows.append(measure) if any(v is not None for v in measure.values) else missing.append(measure.name))
    return rows, missing


def safety_comparison(names: list[str], evaluations: dict) -> SafetyComparison | None:
    """Items whose answer differs between the base model and the last model with a safety evaluation."""

    def items(name: str) -> dict[str, dict]:
        found = ((evaluations.get(name) or {}).get("safety") or {}).get("items") or []
        return {str(i.get("id")): i for i in found if isinstance(i, dict)}

    if not names or not items(names[0]):
        return None
    later = [n for n in names[1:] if items(n)]
    if not later:
        return None
    before, after = items(names[0]), items(later[-1])
    shared = [i for i in before if i in after]
    changes = [SafetyChange(i, str(before[i].get("question", "")), dict(before[i].get("options") or {}),
                            str(before[i].get("answer", "")), str(before[i].get("model_answer", "")),
                            str(after[i].get("model_answer", "")), _correct(before[i]), _correct(after[i]))
               for i in shared if _answer_moved(before[i], after[i])]
    return SafetyComparison(names[0], later[-1], len(shared), changes)


def _correct(item: dict) -> bool:
    """The evaluation's own verdict (`correct`); without one, the answer string against the key."""
    if isinstance(item.get("correct"), bool):
        return item["correct"]
    return str(item.get("model_answer", "")) == str(item.get("answer", ""))


def _letters(answer) -> str:
    """The answer's option letters in order (CA and AC are one answer); the text itself when it holds none."""
    text = str(answer or "").upper()
    letters = sorted(set(c for c in text if "A" <= c <= "G"))
    return "".join(letters) if letters and all(c in "ABCDEFG ,，、" for c in text) else text


def _answer_moved(before: dict, after: dict) -> bool:
    return (_letters(before.get("model_answer")) != _letters(after.get("model_answer"))
            or _correct(before) != _correct(after))


def item_sets(names: list[str], evaluations: dict) -> dict[str, bool | None]:
    """Per exam set that some model was evaluated on: True when every such model answered the same item ids, False
    when they differ, None when an evaluation does not list its items (identity cannot be checked)."""
    verdicts: dict[str, bool | None] = {}
    for key, label in EXAM_SETS.items():
        blocks = [((evaluations.get(n) or {}).get(key)) for n in names]
        blocks = [b for b in blocks if isinstance(b, dict)]
        if len(blocks) < 2:
            continue
        ids = [sorted(str(i.get("id")) for i in b["items"] if isinstance(i, dict))
               if isinstance(b.get("items"), list) else None for b in blocks]
        verdicts[label] = None if None in ids else all(i == ids[0] for i in ids)
    return verdicts


def _training_stage(name: str, entry: dict) -> TrainingStage:
    entry = entry or {}
    number = (lambda v: v if _number(v) else None)  # noqa: E731 - a one-line filter
    return TrainingStage(name, [e for e in entry.get("log_history") or [] if isinstance(e, dict)],
                         number(entry.get("wall_s")), number(entry.get("peak_rss_mb")), number(entry.get("train_loss")))


def _data_file(entry: dict) -> DataFile:
    return DataFile(str(entry.get("stage", "")), str(entry.get("file", "")), str(entry.get("kind", "")),
                    entry.get("records") if _number(entry.get("records")) else None,
                    {str(k): v for k, v in (entry.get("dropped") or {}).items()},
                    [v for v in entry.get("token_lengths") or [] if _number(v)])


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, leaf) rows for a key/value table; lists of plain values are joined."""
    if isinstance(value, dict):
        rows: list[tuple[str, object]] = []
        for key, inner in value.items():
            rows += flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        return rows or [(prefix, "{}")]
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return [(prefix, ", ".join(str(v) for v in value))]
    if isinstance(value, list):
        rows = []
        for index, inner in enumerate(value):
            rows += flatten(inner, f"{prefix}[{index}]")
        return rows
    return [(prefix, value)]


def format_number(value, digits: int = 2) -> str:
    if not _number(value):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def format_delta(value: float | None, digits: int = 2) -> str:
    return f"{value:+.{digits}f}" if _number(value) else MISSING


def format_seconds(seconds: float | None) -> str:
    if not _number(seconds):
        return MISSING
    minutes, rest = divmod(seconds, 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(minutes)} min {rest:04.1f} s"
