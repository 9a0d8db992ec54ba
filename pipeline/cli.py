"""`cpmv` command line: run jobs, build tiny models, make sample corpora, print the job schema."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.model_source import ModelUnavailable
    from pipeline.report import render
    from pipeline.retry import RetryPolicy
    from pipeline.run import run_job
    from pipeline.stop import StopRequest

    stop = StopRequest()
    stop.install()
    try:
        job = load_job(args.job, args.set)
        summary = run_job(job, RetryPolicy.parse(args.retry_errors), stop)
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
    from pipeline.config import load_job

    try:
        job = load_job(args.job, args.set)
    except ConfigError as err:
        print(f"cpmv: {err}", file=sys.stderr)
        return 2
    print(json.dumps(job.model_dump(mode="json"), indent=2))
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.config import JobConfig

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


def _cmd_models_list(args: argparse.Namespace) -> int:
    from pipeline.model_table import render

    sys.stdout.write(render(args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpmv", description="MiniCPM-V batch pipeline on Ray Data")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="YAML job file (see jobs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set engine.batch_size=8 (repeatable)")
    run.add_argument("--retry-errors", nargs="?", const="all", default=None, metavar="TYPE,...",
                     help="also redo committed rows with these error types (no value: every type); transient "
                     "types (engine errors, HTTP 408/429/5xx, connection errors, timeouts, lost units) are "
                     "always redone")
    run.set_defaults(func=_cmd_run)

    val = sub.add_parser("validate", help="check a job file and print it resolved (secrets masked)")
    val.add_argument("job")
    val.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    val.set_defaults(func=_cmd_validate)

    sch = sub.add_parser("schema", help="print the job file JSON schema (every field with its description)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cpmv` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
