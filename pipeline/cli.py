"""`cpmv` command line: run jobs, build tiny models, make sample corpora, print the job schema."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_at_start(signum: int, frame: object) -> None:
    # Nothing to clean up yet; a KeyboardInterrupt here would surface inside whichever import it
    # hit (pydantic and pyarrow turn it into RuntimeError or a half-imported module).
    os.write(2, b"cpmv: interrupted\n")
    os._exit(128 + signum)


# Ctrl-C while the modules load ends like any other: one line, status 130. Only when run as the
# `cpmv` program: a process that imports this module (tests, notebooks) keeps its own handler.
# It stays until a command installs its own (`cpmv run`: pipeline/stop.py), so no KeyboardInterrupt
# ever lands inside a lazy import; commands without one end at once, as there is nothing to publish.
_AS_PROGRAM = __name__ == "__main__" or os.path.basename(sys.argv[0]) == "cpmv"
if _AS_PROGRAM:
    signal.signal(signal.SIGINT, _interrupted_at_start)

import argparse  # noqa: E402 - after the handler above
import json  # noqa: E402
import logging  # noqa: E402
import traceback  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.model_source import ModelUnavailable
    from pipeline.progress import ProgressOptions
    from pipeline.report import render
    from pipeline.retry import RetryPolicy
    from pipeline.run import run_job
    from pipeline.stop import StopRequest

    stop = StopRequest()
    stop.install()
    try:
        job = load_job(args.job, args.set + ([f"ray.address={args.address}"] if args.address else []))
        progress = ProgressOptions("off" if args.quiet else args.progress, args.progress_every)
        progress.resolved()  # a bad --progress value fails before any work
        summary = run_job(job, RetryPolicy.parse(args.retry_errors), stop, progress)
    except (ConfigError, ModelUnavailable, ValueError) as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpmv: stopped at once; the next run rolls forward or redoes what this one left", file=sys.stderr)
        return stop.exit_code()
    finally:
        stop.restore()
    print(render(summary))
    if summary.status == "interrupted":
        return stop.exit_code()
    return 1 if summary.status == "failed" else 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_job, public_dump

    try:
        job = load_job(args.job, args.set)
    except ConfigError as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    print(json.dumps(public_dump(job), indent=2))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.config import JobConfig

    if args.output:
        from pipeline.partitions import describe
        from schemas.records import SCHEMA_VERSION, TABLES

        from pipeline.rowdata import PASS_THROUGH_NOTE, job_columns

        try:
            extra = job_columns(args.job, args.set) if args.job else []  # a job's pass-through columns
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"cpmv: {err}", file=sys.stderr)
            return 2
        print(json.dumps({"schema_version": SCHEMA_VERSION, "tables": {
            name: [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema] + extra
            for name, schema in TABLES.items()}, "pass_through": PASS_THROUGH_NOTE, "layout": describe()}, indent=2))
        return 0
    print(json.dumps(JobConfig.model_json_schema(), indent=2))
    return 0


def _cmd_tiny(args: argparse.Namespace) -> int:
    from pipeline.models import get_family

    spec = get_family(args.family)
    if spec.native_transformers:
        from pipeline.tiny import build_tiny

        path = build_tiny(args.family, args.out, seed=args.seed)
    else:
        from pipeline.tiny_legacy import build_tiny_legacy

        path = build_tiny_legacy(spec.version, args.out)
    weights = "random weights" if spec.native_transformers else "no weights: load it with load_format dummy"
    print(f"tiny {args.family} checkpoint ({weights}; meaningless output) written to {path}")
    return 0


def _cmd_samples(args: argparse.Namespace) -> int:
    from pipeline.samples import make_bad_corpus, make_demo_corpus

    paths = make_demo_corpus(args.out)
    if args.bad:
        paths += make_bad_corpus(args.out)
    print(f"{len(paths)} sample files in {args.out}")
    if args.manifest:
        from pipeline.samples import write_demo_manifest

        print(f"manifest of the demo corpus (uri, item_id, collection, acquired) in {write_demo_manifest(args.out, args.manifest)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect_units import inspect_units, load_inspect_job, resolve_family, summarize
    from pipeline.sources import NoMatchError

    try:
        job = load_inspect_job(args.uri, args.job, args.set)
        family = resolve_family(job, args.model)
        records = []
        for record in inspect_units(job, family):
            print(json.dumps(record), flush=True)
            records.append({k: record[k] for k in ("source_uri", "unit_index", "error_type", "visual_tokens",
                                                   "placeholder_tokens")})
    except (ConfigError, NoMatchError, ValueError) as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    if args.summary:
        print(json.dumps({"summary": summarize(records)}), file=sys.stderr)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cpmv-batch")
    except PackageNotFoundError:
        from pipeline import __version__

        return __version__


def _global_flags(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("--debug", action="store_true", default=default,
                   help="debug logging, and the traceback of an error instead of one line")


def _flags_anywhere(parser: argparse.ArgumentParser) -> None:
    """Accept the global flags after any (sub)command too: `cpmv run job.yaml -v` = `cpmv -v run job.yaml`.

    Walks every subparser, including those registered by other modules, and adds the flags with a
    suppressed default, so a flag given at one level is not reset by another level's default.
    """
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sp in set(action.choices.values()):
                if not any("--debug" in a.option_strings for a in sp._actions):
                    _global_flags(sp, argparse.SUPPRESS)
                _flags_anywhere(sp)


def _cmd_models_list(args: argparse.Namespace) -> int:
    from pipeline.model_table import render

    sys.stdout.write(render(args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpmv", description="MiniCPM-V batch pipeline on Ray Data",
                                epilog="exit statuses: 0 ok, 1 run failed, 2 usage/job error, 3 inputs not "
                                "found, 4 storage/credentials, 5 Ray cluster unreachable, 70 internal error, "
                                "130/143 interrupted (README: Exit statuses)")
    _global_flags(p, False)
    p.add_argument("--version", action="version", version=f"cpmv {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="YAML job file (see jobs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set engine.batch_size=8 (repeatable)")
    run.add_argument("--retry-errors", nargs="?", const="all", default=None, metavar="TYPE,...",
                     help="also redo committed rows with these error types (no value: every type); transient "
                     "types (engine errors, HTTP 408/429/5xx, connection errors, timeouts, lost units) are "
                     "always redone")
    run.add_argument("--address", help="Ray cluster to join (host:6379, ray://host:10001, auto); default: "
                     "ray.address, else RAY_ADDRESS, else a local Ray on this machine")
    run.add_argument("--progress", default="auto", choices=["auto", "bars", "log", "off"],
                     help="bars: Ray Data's per-operator bars plus a progress line; log: the line only; "
                     "auto (default): bars on a terminal, log otherwise")
    run.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                     help="seconds between progress lines (default 30)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress, warnings and the summary only")
    run.set_defaults(func=_cmd_run)
    from pipeline import plan_cmd, runs_cmd  # their own modules; registered here

    rep_ = sub.add_parser("report", help="write the HTML report of a past run beside its run record")
    rep_.add_argument("out", help="the job's output prefix (output.uri)")
    rep_.add_argument("run_id", nargs="?", help="attempt or run_id (default: the newest run)")
    rep_.set_defaults(func=runs_cmd.cmd_report)
    runs = sub.add_parser("runs", help="list the runs of an output prefix with status and counts")
    runs.add_argument("out", help="the job's output prefix (output.uri)")
    runs.set_defaults(func=runs_cmd.cmd_runs)
    plan_cmd.register(sub)

    val = sub.add_parser("validate", help="check a job file and print it resolved (secrets masked)")
    val.add_argument("job")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.set_defaults(func=_cmd_validate)

    sch = sub.add_parser("schema", help="print the job file JSON schema (every field with its description)")
    sch.add_argument("--output", action="store_true", help="print the output tables' Parquet schemas instead "
                     "(results/, documents/: column, type, nullable) and the layout (partitions, file sets)")
    sch.add_argument("--job", help="with --output: also list this job's pass-through columns (input.pass_through), "
                     "typed as its manifest says")
    sch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sch.set_defaults(func=_cmd_schema)

    models = sub.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command")
    models.set_defaults(func=_cmd_models_list, format="text")
    mlist = msub.add_parser("list", help="which engines serve each generation (the default)")
    mlist.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    mlist.set_defaults(func=_cmd_models_list)
    tiny = msub.add_parser("tiny", help="build a tiny random checkpoint of a real architecture, offline")
    tiny.add_argument("--family", required=True,
                      choices=["minicpmv4_6", "minicpmv4_7", "minicpm_ocr", "minicpmv2_6", "minicpmv4_0", "minicpmv4_5"],
                      help="4.6/4.7/OCR: real transformers classes; 2.6-4.5: vLLM `minicpmv` (load_format dummy)")
    tiny.add_argument("--out", required=True, help="output directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)

    samples = sub.add_parser("samples", help="write the demo corpus (PDFs, images, a video)")
    samples.add_argument("out", help="output directory")
    samples.add_argument("--bad", action="store_true", help="also write broken inputs (error handling demo)")
    samples.add_argument("--manifest", metavar="PATH", help="also write a Parquet manifest of the demo corpus with "
                         "catalogue columns (jobs/annotate.yaml's input)")
    samples.set_defaults(func=_cmd_samples)

    insp = sub.add_parser("inspect", help="print, per unit, the size, slice grid and visual tokens a run would "
                          "hand the model (one JSON object per line; no model is run)")
    insp.add_argument("uri", metavar="URI_OR_PATH", help="file, directory/prefix or glob to inspect")
    insp.add_argument("--job", help="job file whose settings to use (its inputs are replaced by URI_OR_PATH)")
    insp.add_argument("--model", metavar="FAMILY", help="model family to plan for (default: the job's, else "
                      "minicpmv4_6); also minicpmv2_0, 2_5, 2_6, 4_0, 4_5")
    insp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a job field, as in `cpmv run` (repeatable)")
    insp.add_argument("--summary", action="store_true", help="print totals as JSON on stderr at the end")
    insp.set_defaults(func=_cmd_inspect)

    from pipeline.evaluate import register as register_eval  # `cpmv eval` (its imports stay inside it)

    register_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cpmv` console script; the exit statuses are listed in pipeline/exits.py."""
    from pipeline import logsafe

    parser = build_parser()
    _flags_anywhere(parser)
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logsafe.configure(logging.DEBUG if args.verbose or args.debug else logging.WARNING if quiet else logging.INFO)
    try:
        return _dispatch(args)
    finally:
        if _AS_PROGRAM:
            # The command is over and its status decided: a Ctrl-C from here on must not change it.
            # Python resets handlers that are Python functions to SIG_DFL while it finalises, so a
            # late SIGINT killed the process (status -2) after its one-line message; SIG_IGN is kept.
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; every error that reaches here becomes one `cpmv: ...` line and its status."""
    from pipeline import exits

    try:
        return args.func(args)
    except BrokenPipeError:  # `cpmv inspect ... | head`: the reader is gone, nothing more to say
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 141
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the one place errors meet the user
        if args.debug and not isinstance(err, KeyboardInterrupt):
            from pipeline.storage import redact

            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        code, message = exits.describe(err)
        print(f"cpmv: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
