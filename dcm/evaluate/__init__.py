"""The challenge's evaluator: the 6-step protocol per case (:mod:`dcm.evaluate.core`), on workers, Ray or
scheduler parts (:mod:`dcm.evaluate.parallel`), and its command line (:mod:`dcm.evaluate.cli`,
``python -m dcm.evaluate``). Everything the evaluator defines is importable from here."""

from dcm.evaluate.core import (  # noqa: F401  (re-exported)
    NUM_STEPS,
    SECONDS_PER_CLASS,
    METRIC_COLUMNS,
    SUMMARY_METRICS,
    ShapeError,
    CaseResult,
    StepRunner,
    CommandPredictor,
    LOG_TAIL_LINES,
    case_file_name,
    absolutise_command,
    InProcessPredictor,
    resolve_predictor,
    PredictorSpec,
    dcm_predictor,
    check_predictor_spec,
    build_step_runner,
    evaluate_case,
    summarise,
    markdown_table,
    CaseRecord,
    RECORDS_DIR,
    record_path,
    save_record,
    load_records,
    evaluate_file,
    select_case_files,
    report_record,
    write_results,
    evaluate_folder,
    MANIFEST,
    write_manifest,
    load_manifest,
)
from dcm.evaluate.core import __all__ as _core_all
from dcm.evaluate.cli import build_parser, main, merge_main  # noqa: F401

__all__ = list(_core_all) + ["build_parser", "main", "merge_main"]
