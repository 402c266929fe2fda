"""The optional data steps before training, each recorded in pipeline_state.json like any other step:

scrub          `medtune data scrub` of each training stage's data into `scrubbed/<stage>/`, which that stage then
               trains on (its train_file_dir replaced), and of its validation_file_dir, when it has one, into
               `scrubbed/<stage>_validation/`, which it then evaluates on
contamination  `medtune data contamination` of the training data (scrubbed when scrub ran) against every set the
               eval step reads; with drop_contaminated the stages train on `contamination/clean/...`, copies without
               the records holding an evaluation item

Each step returns stage -> the data that stage now trains on. Their summaries (counts, never the personal
information itself; contaminated eval ids with training file:line and overlap) go into pipeline_results.json's
`data_safety` and the report.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from medtune.errors import ConfigError
from medtune.pipeline.config import TRAINING_STAGES

logger = logging.getLogger(__name__)

CONTAMINATION_REPORT = "contamination_report.json"


def training_sources(sections: dict[str, tuple], stages: tuple[str, ...]) -> dict[str, str]:
    """stage -> the file or folder it trains on, for every enabled training stage reading local files."""
    from medtune.pipeline.summary import train_location

    sources = {}
    for stage in TRAINING_STAGES:
        if stage not in stages:
            continue
        location = train_location(stage, sections[stage][2])
        if location is None:
            logger.warning("%s trains on a Hugging Face dataset (dataset_name): scrub and contamination do not see "
                           "it", stage)
        else:
            sources[stage] = location
    if not sources:
        raise ConfigError("scrub and contamination need a training stage (pt, sft, dpo) reading local files "
                          "(train_file_dir); none is enabled")
    return sources


def validation_sources(sections: dict[str, tuple], stages: tuple[str, ...]) -> dict[str, str]:
    """stage -> its validation_file_dir, for every enabled training stage that has one."""
    return {stage: sections[stage][2].validation_file_dir for stage in TRAINING_STAGES
            if stage in stages and sections[stage][2].validation_file_dir}


def eval_sets(eval_args, options) -> list[str]:
    """The item sets the eval step answers: CMB-Exam and CMB-Clin (eval data_dir), the safety probe, the general
    set. Perplexity text is not a set of items and is held out by pt itself."""
    from medtune.eval.runner import SAFETY_PROBE
    from medtune.paths import bundled_data_dir

    sets = [eval_args.data_dir or bundled_data_dir("eval/cmb"), options.safety_file or bundled_data_dir(SAFETY_PROBE),
            options.general_eval_file]
    return [str(location) for location in sets if location]


def scrub_step(state, sources: dict[str, str], validation: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Scrub each stage's training and validation data; returns (stage -> scrubbed training data, stage ->
    scrubbed validation data): a stage never reads either as it was."""
    from medtune.data.readers import data_files
    from medtune.data.scrub import REPORT_NAME, SUFFIXES, scrub_paths
    from medtune.pipeline.summary import digests

    folder = state.folder("scrub")
    jobs = {**{stage: (source, folder / stage) for stage, source in sources.items()},
            **{f"{stage}_validation": (source, folder / f"{stage}_validation") for stage, source in validation.items()}}
    # "validates" only when there is validation data: a scrub step recorded before validation files were scrubbed
    # (and with none to scrub) stays finished
    record = {"options": {}, "trains": sources, **({"validates": validation} if validation else {}),
              "inputs": digests(data_files([source for source, _ in jobs.values()], SUFFIXES))}

    def work() -> dict:
        reports = {job: scrub_paths([source], target, report_path=folder / f"{job}_{REPORT_NAME}")
                   for job, (source, target) in jobs.items()}
        summary = scrub_summary(reports, {stage: folder / stage for stage in sources},
                                {stage: folder / f"{stage}_validation" for stage in validation})
        found = ", ".join(f"{kind} {count}" for kind, count in summary["replaced"].items() if count) or "nothing"
        logger.info("scrub: %d records, replaced %s; %s train on the scrubbed copies in %s", summary["records"],
                    found, ", ".join(sources), folder)
        return {"summary": summary}

    state.run("scrub", record, work, resumable=False)
    return ({stage: str(folder / stage) for stage in sources},
            {stage: str(folder / f"{stage}_validation") for stage in validation})


def scrub_summary(reports: dict[str, dict], trained_on: dict[str, Path], validated_on: dict[str, Path]) -> dict:
    """Totals per kind, and per stage and file the kinds found (counts only: the values never leave the data);
    a validation file is listed as `<stage>_validation: path`."""
    totals: dict[str, int] = {}
    files = {}
    for job, report in reports.items():
        for kind, count in report["replaced"].items():
            totals[kind] = totals.get(kind, 0) + count
        for path, entry in report["files"].items():
            files[f"{job}: {path}"] = {"records": entry["records"],
                                       **{kind: count for kind, count in entry["replaced"].items() if count}}
    summary = {"records": sum(r["records"] for r in reports.values()), "replaced": totals, "files": files,
               "trained_on": {stage: str(target) for stage, target in trained_on.items()}}
    if validated_on:
        summary["validated_on"] = {stage: str(target) for stage, target in validated_on.items()}
    return summary


def contamination_step(state, plan, sources: dict[str, str], sets: list[str], relative) -> dict[str, str]:
    from medtune.data.contamination import DATA_SUFFIXES, run_contamination
    from medtune.data.readers import data_files
    from medtune.pipeline.run import options_record
    from medtune.pipeline.summary import digests

    folder = state.folder("contamination")
    train = list(dict.fromkeys(sources.values()))  # two stages on one folder: scanned once
    args, own = plan.parse("contamination", ["--train", *train, "--eval", *sets,
                                             "--report", str(folder / CONTAMINATION_REPORT)])
    if own.drop_contaminated:
        args = dataclasses.replace(args, write_clean=str(folder / "clean"))
    record = {"options": relative(options_record(args, own)), "inputs": digests(data_files(train + sets,
                                                                                           DATA_SUFFIXES))}
    cleaned = clean_locations(sources, train, Path(args.write_clean)) if args.write_clean else dict(sources)

    def work() -> dict:
        report = run_contamination(args)
        kept = "dropped: the stages train on copies without them" if args.write_clean else \
            "kept in the training data (report only; drop_contaminated: true drops them)"
        logger.info("contamination: %d of %d evaluation items found in the training data (%d training records), "
                    "%s; report %s", report["contaminated_items"], report["eval_items_checked"],
                    report["contaminated_records"], kept, args.report)
        return {"summary": contamination_summary(report, cleaned if args.write_clean else None)}

    # Report only, it changes no training data; a clean copy is recorded by sha256 in each stage's inputs: either
    # way a stage re-runs exactly when the data it trains on changed, not whenever this step runs again.
    state.run("contamination", record, work, resumable=False, invalidates_later=False)
    return cleaned


def clean_locations(sources: dict[str, str], train: list[str], clean: Path) -> dict[str, str]:
    """stage -> its data's place in the clean copy, which mirrors the training locations under `clean`."""
    from medtune.data.outputs import mirror_base

    base = mirror_base(train)
    return {stage: str(clean / Path(source).expanduser().resolve().relative_to(base))
            for stage, source in sources.items()}


def contamination_summary(report: dict, trained_on: dict[str, str] | None) -> dict:
    summary = {key: report[key] for key in ("eval_items_checked", "contaminated_items", "train_records",
                                            "contaminated_records", "ngram", "threshold")}
    summary["contaminated"] = [{"id": item["id"], "eval_file": item["eval_file"],
                                "matches": [{"train": m["train"], "overlap": m["overlap"]} for m in item["matches"]]}
                               for item in report["contaminated"]]
    summary["drop_contaminated"] = trained_on is not None
    if trained_on is not None:
        summary["records_removed"] = report["clean"]["records_removed"]
        summary["trained_on"] = trained_on
    return summary
