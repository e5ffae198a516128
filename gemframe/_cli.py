"""``gemframe``: run a parquet job (or dry-run it), serve the emulator, look after the cache
(stats, clear, export, import), print a run's manifest or report. Thin over the API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._core.cache import CacheMode, CacheWarning, ResponseCache, UrlStore, default_cache_dir, parse_when
from ._core.cache.files import UploadStore
from ._core.providers import DEFAULT_MODEL, PROVIDERS
from ._errors import GemframeError, InputError

if TYPE_CHECKING:
    from ._core.client import Client
    from ._core.spec import RequestSpec

EPILOG = """\
examples:
  gemframe run sample_data/prompts.parquet out.parquet --prompt prompt --images image_path --provider emulator
  GEMINI_API_KEY=... gemframe run in.parquet out.parquet --model gemini-2.5-flash --concurrency 64
  gemframe emulator --port 8080
  gemframe run in.parquet out.parquet --dry-run          # requests, cache hits, tokens, estimated cost
  gemframe run in.parquet out.parquet --cache read --manifest out.json   # replay: no key, no network
  gemframe report out.parquet --html report.html
  gemframe cache stats
  gemframe cache export answers.parquet && gemframe cache import answers.parquet
"""


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemframe",
        description="Google Gemini over parquet files and polars frames: cached, resumable, typed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The package's own version; imported here so this module never needs gemframe/__init__
    # to have finished importing.
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gemframe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="answer every row of a parquet file, write a parquet of replies",
        description="Read IN.parquet in batches, ask Gemini once per row (cached), and write "
        "OUT.parquet with the input columns plus the reply fields (text, finish_reason, tokens, "
        "images, error, ...). A killed run, rerun, resends only unanswered rows. Rows that fail "
        "do not fail the command: it ends with one warning line (how many, by status, the first "
        "message) and exit status 0; each row's reason is in its error field.",
    )
    run.add_argument("input", metavar="IN.parquet")
    run.add_argument("output", metavar="OUT.parquet")
    run.add_argument("--prompt", default="prompt", metavar="COL", help="prompt column (default: prompt)")
    run.add_argument("--images", metavar="COL", help="column of image paths/URLs/bytes, or lists of them")
    run.add_argument("--system", metavar="TEXT", help="system instruction for every row")
    run.add_argument(
        "--context",
        action="append",
        metavar="FILE",
        help="shared leading material for every row: a text file, an image, PDF, video or audio file (repeat for more)",
    )
    run.add_argument(
        "--cache-context",
        nargs="?",
        const=True,
        default=False,
        metavar="TTL",
        help="send the system instruction and --context once, as a context cache (TTL: 1h, or e.g. 30m, 2h)",
    )
    run.add_argument(
        "--keep-context-cache", action="store_true", help="leave the context cache to expire instead of deleting it"
    )
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"model id (default: {DEFAULT_MODEL})")
    run.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        help="default: from the API key found in the environment, else emulator",
    )
    run.add_argument(
        "--emulator", action="store_const", const="emulator", dest="provider", help="same as --provider emulator"
    )
    run.add_argument("--base-url", metavar="URL", help="endpoint override (a proxy or a local server)")
    run.add_argument("--config", type=_json_arg, metavar="JSON", help="generationConfig, e.g. '{\"temperature\": 0}'")
    run.add_argument(
        "--safety", type=_json_arg, metavar="JSON", help='safety thresholds, e.g. \'{"harassment": "block_none"}\''
    )
    run.add_argument("--concurrency", type=int, default=16, metavar="N", help="requests in flight (default: 16)")
    run.add_argument(
        "--rpm",
        type=float,
        metavar="N",
        help="at most N requests per minute (default: no fixed limit; 429s slow the run down)",
    )
    run.add_argument("--tpm", type=float, metavar="N", help="at most N input tokens per minute (default: no limit)")
    run.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="per-request timeout in seconds (default: 120)"
    )
    run.add_argument(
        "--max-attempts",
        type=int,
        default=None,
        metavar="N",
        help="cap on attempts per row on transient errors (default: none; a row retries for up to 900 s)",
    )
    run.add_argument(
        "--samples",
        type=int,
        default=1,
        metavar="N",
        help="N answers per row (rows get a 'sample' column 0..N-1, each cached separately)",
    )
    run.add_argument("--manifest", metavar="PATH", help="also write the run manifest to this JSON file")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="send nothing: count rows, requests, cache hits, tokens and the estimated cost",
    )
    run.add_argument(
        "--count-tokens",
        action="store_true",
        help="with --dry-run: count input tokens with the API's countTokens (exact) instead of locally",
    )
    run.add_argument(
        "--output-tokens", type=float, metavar="N", help="with --dry-run: assume N output tokens per request"
    )
    run.add_argument(
        "--prices",
        metavar="FILE.json",
        help="price overrides {model: {input, output[, cached_input, image, cache_storage]}} (USD per 1M tokens / per image / per 1M tokens an hour); default $GEMFRAME_PRICES",
    )
    run.add_argument("--cache", choices=[m.value for m in CacheMode], default="use", help="cache mode (default: use)")
    run.add_argument(
        "--cache-dir", metavar="DIR", help=f"cache directory (default: $GEMFRAME_CACHE_DIR or {default_cache_dir()})"
    )
    run.add_argument("--image-dir", metavar="DIR", help="write generated images here and store their paths")
    run.add_argument(
        "--prefix",
        metavar="P",
        help="name the reply fields P+field (e.g. r_text); by default a reply "
        "field named like an input column (text, images, error, ...) is written as reply_<field>, with a warning",
    )
    run.add_argument(
        "--batch-rows", type=int, default=10_000, metavar="N", help="rows per batch read/written (default: 10000)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--batch",
        action="store_true",
        help="use the provider's Batch Mode (half price, answered within a day); "
        "jobs are recorded in OUT.parquet.batch.json, so running the command again resumes them",
    )
    run.add_argument(
        "--poll-interval", type=float, default=30.0, metavar="S", help="seconds between batch polls (default: 30)"
    )

    emulator = commands.add_parser("emulator", help="serve the offline Gemini emulator over HTTP")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8080)
    emulator.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds added to each answer")
    emulator.add_argument(
        "--no-markers",
        action="store_true",
        help="treat test markers such as [emulator:status=500] or "
        "[emulator:sleep=S] in prompts as plain text (they make the emulator fail on purpose, for tests)",
    )

    cache = commands.add_parser("cache", help="inspect, clear, export or import the answer cache")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--cache-dir", metavar="DIR", help="cache directory (default: $GEMFRAME_CACHE_DIR or ~/.cache/gemframe)"
    )
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", parents=[where], help="entries, size on disk, by model, oldest/newest")
    stats.add_argument("--json", action="store_true", help="as JSON")
    clear = actions.add_parser("clear", parents=[where], help="remove entries: all, or by model and/or age")
    clear.add_argument("--model", metavar="M", help="only this model's entries")
    clear.add_argument(
        "--older-than",
        metavar="WHEN",
        help="only entries stored before a date/time (2025-01-31, 2025-01-31T12:00Z) or older than an age (30d, 12h); image URLs fetched before it too",
    )
    export = actions.add_parser(
        "export",
        parents=[where],
        help="write entries to a parquet file (key, model, created, format, response, prompt)",
    )
    export.add_argument("file", metavar="FILE.parquet")
    export.add_argument("--model", metavar="M", help="only this model's entries")
    export.add_argument(
        "--older-than", metavar="WHEN", help="only entries stored before this date/time or older than an age (30d)"
    )
    export.add_argument(
        "--newer-than",
        metavar="WHEN",
        help="only entries stored since this date/time or within an age (7d: the last week's)",
    )
    export.add_argument(
        "--urls", metavar="URLS.parquet", help="also write the image URL store (URLs with their images) to this file"
    )
    load = actions.add_parser(
        "import", parents=[where], help="merge the entries of an exported parquet file into the cache"
    )
    load.add_argument("file", metavar="FILE.parquet")
    load.add_argument("--overwrite", action="store_true", help="replace entries already stored under the same key")
    load.add_argument("--urls", metavar="URLS.parquet", help="also merge an image URL store written by export --urls")

    manifest = commands.add_parser("manifest", help="print the run manifest stored in a gemframe output")
    manifest.add_argument("output", metavar="OUT.parquet")

    report = commands.add_parser(
        "report",
        help="summarize a gemframe output: counts, errors, tokens, latency, cost; --html for charts",
    )
    report.add_argument("output", metavar="OUT.parquet")
    report.add_argument(
        "--html", metavar="FILE.html", help="also write an HTML report (charts, sample replies, image thumbnails)"
    )
    report.add_argument("--samples", type=int, default=8, metavar="N", help="replies to show (default: 8)")
    report.add_argument("--prices", metavar="FILE.json", help="price overrides for the cost estimate")
    return parser


def _parquet_input(path: str) -> str:
    """``path`` if it is a readable parquet file, else an `InputError` naming it: a CLI user
    gets one line, not pyarrow's traceback (checked from the footer only)."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory; give a parquet file")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable parquet file ({exc})") from None
    return path


def _run(args: argparse.Namespace) -> int:
    from ._core.client import Client
    from ._core.spec import RequestSpec
    from ._pipeline import run

    _parquet_input(args.input)
    # What to ask, checked once (a bad --config is one line before anything is read or sent)
    # and the same for the run and its dry run.
    spec = RequestSpec(
        model=args.model,
        system=args.system,
        config=args.config,
        safety=args.safety,
        context=[_context_file(path) for path in args.context] if args.context else None,
    )
    client = Client(
        args.provider,
        base_url=args.base_url,
        model=args.model,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
        rpm=args.rpm,
        tpm=args.tpm,
        cache=args.cache,
        cache_dir=args.cache_dir,
        cache_context=args.cache_context,
        keep_context_cache=args.keep_context_cache,
    )
    try:
        if args.dry_run:
            return _dry_run(args, client, spec)
        with _run_warnings() as failures:
            manifest = run(
                args.input,
                args.output,
                prompt=args.prompt,
                images=args.images,
                spec=spec,
                client=client,
                image_dir=args.image_dir,
                batch_rows=args.batch_rows,
                progress=not args.no_progress,
                mode="batch" if args.batch else "live",
                poll_interval=args.poll_interval,
                samples=args.samples,
                prefix=args.prefix,
                manifest_path=args.manifest,
                prices=args.prices,
            )
    finally:
        client.close()
    summary = {k: manifest[k] for k in ("rows", "cache_hits", "requests_sent", "errors", "wall_seconds")}
    summary["cost_usd"] = (manifest.get("cost") or {}).get("this_run")
    print(f"wrote {args.output}: {json.dumps(summary)}", file=sys.stderr)
    for failure in failures:  # the last line: failed rows are data, the exit status stays 0
        print(f"gemframe: warning: {failure}", file=sys.stderr)
    return 0


@contextmanager
def _run_warnings() -> Iterator[list[str]]:
    """The run's warnings: `RowsFailedWarning` messages are kept to print as the last line (after
    the summary, where a user looks), a `ColumnNameWarning` is one ``gemframe: warning:`` line at
    once, others are shown as Python shows them."""
    from ._core.progress import RowsFailedWarning
    from ._polars.expr import ColumnNameWarning

    failures: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ColumnNameWarning)
        try:
            yield failures
        finally:
            for warning in caught:
                if issubclass(warning.category, RowsFailedWarning):
                    failures.append(str(warning.message))
                elif issubclass(warning.category, ColumnNameWarning):
                    print(f"gemframe: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _context_file(path: str) -> Any:
    """A ``--context`` file: an image, PDF, video or audio file as its path (read and checked by the spec), any
    other file as its text (UTF-8, at most the API's inline limit)."""
    from pathlib import Path

    from ._core.payload import INLINE_LIMIT, sniff_mime

    try:
        with open(path, "rb") as f:
            data = f.read(INLINE_LIMIT + 1)
    except OSError as exc:
        raise InputError(f"--context {path}: {exc.strerror}") from None
    if sniff_mime(data) is not None:
        return Path(path)
    if len(data) > INLINE_LIMIT:
        raise InputError(f"--context {path} is larger than {INLINE_LIMIT // 2**20} MB, the most a request takes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--context {path} is neither an image, a PDF nor UTF-8 text") from None


def _dry_run(args: argparse.Namespace, client: Client, spec: RequestSpec) -> int:
    from ._accounting.estimate import estimate

    result = estimate(
        args.input,
        args.prompt,
        images=args.images,
        spec=spec,
        client=client,
        samples=args.samples,
        exact=args.count_tokens,
        output_tokens=args.output_tokens,
        prices=args.prices,
        batch=bool(getattr(args, "batch", False)),
    )
    print(result)
    print(f"dry run: nothing was sent and {args.output} was not written", file=sys.stderr)
    return 0


def _emulator(args: argparse.Namespace) -> int:
    from .emulator import Emulator, serve

    markers = not args.no_markers
    if markers:
        note = "test markers such as [emulator:status=500] in a prompt fail on purpose; --no-markers turns them off"
    else:
        note = "test markers off: [emulator:...] in a prompt is plain text"
    print(f"gemframe emulator on http://{args.host}:{args.port} ({note})", file=sys.stderr)
    serve(Emulator(latency=args.latency, markers=markers), host=args.host, port=args.port)
    return 0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError


def _cache(args: argparse.Namespace) -> int:
    # A cache warning (an empty database, entries not read) is one "gemframe: warning:" line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with ResponseCache(args.cache_dir) as store:
                urls = UrlStore(os.path.join(store.directory, "urls"))  # the image URLs fetched
                uploads = UploadStore(os.path.join(store.directory, "files"))  # the files uploaded
                try:
                    return _cache_action(args, store, urls, uploads)
                except (ValueError, OSError) as exc:
                    raise InputError(str(exc)) from None
                finally:
                    urls.close()
                    uploads.close()
        finally:
            for warning in caught:
                if issubclass(warning.category, CacheWarning):
                    print(f"gemframe: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def _cache_action(args: argparse.Namespace, store: ResponseCache, urls: UrlStore, uploads: UploadStore) -> int:
    if args.action == "stats":
        stats = store.stats()
        url_stats = urls.stats()
        file_stats = uploads.stats()
        if args.json:
            print(json.dumps({**stats, "urls": url_stats, "files": file_stats}, indent=2))
            return 0
        print(f"cache {stats['directory']}: {stats['entries']:,} entries, {_size(stats['bytes_on_disk'])} on disk")
        if stats["entries"]:
            print(f"  oldest {stats['oldest']}, newest {stats['newest']}")
            width = max(len(m) for m in stats["by_model"])
            print(f"  {'model':<{width}}  {'entries':>9}  {'size':>10}  newest")
            for model, row in stats["by_model"].items():
                print(f"  {model:<{width}}  {row['entries']:>9,}  {_size(row['bytes']):>10}  {row['newest']}")
        print(
            f"{url_stats['urls']:,} image URLs ({url_stats['images']:,} images, {_size(url_stats['image_bytes'])}) "
            f"in {url_stats['directory']}"
        )
        print(
            f"{file_stats['files']:,} files uploaded to the Files API ({file_stats['live']:,} still live, "
            f"{_size(file_stats['live_bytes'])}) in {file_stats['directory']}"
        )
    elif args.action == "clear":
        removed = store.clear(model=args.model, before=args.older_than)
        forgotten = ""
        if args.model is None:  # image URLs belong to no model
            before = parse_when(args.older_than) if args.older_than is not None else None
            forgotten = f" and {urls.clear(before=before):,} image URLs"
            if before is None:  # uploaded files expire on the server within 48 hours anyway
                forgotten += f" and {uploads.clear():,} uploaded files"
        print(f"removed {removed:,} entries{forgotten} from {store.directory}")
    elif args.action == "export":
        count = store.export(args.file, model=args.model, before=args.older_than, after=args.newer_than)
        print(f"exported {count:,} entries to {args.file}")
        if args.urls:
            print(f"exported {urls.export(args.urls):,} image URLs to {args.urls}")
    else:
        counts = store.import_(args.file, overwrite=args.overwrite)
        refused = ""
        if counts["refused"]:
            reasons = ", ".join(f"{n:,} {why}" for why, n in counts["refused_reasons"].items())
            refused = f"; refused {counts['refused']:,}: {reasons}"
        print(
            f"imported {args.file} into {store.directory}: {counts['added']:,} added, "
            f"{counts['replaced']:,} replaced, {counts['kept']:,} already present (kept){refused}"
        )
        if args.urls:
            counts = urls.import_(args.urls, overwrite=args.overwrite)
            print(
                f"imported {args.urls}: {counts['added']:,} image URLs added, {counts['replaced']:,} replaced, "
                f"{counts['kept']:,} already present (kept), {counts['refused']:,} refused (not an http(s) URL "
                "with an image of at most 20 MB)"
            )
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from ._accounting.manifest import read_manifest

    manifest = read_manifest(_parquet_input(args.output))
    if manifest is None:
        raise InputError(f"{args.output} has no gemframe manifest (was it written by gemframe run?)")
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0


def _report(args: argparse.Namespace) -> int:
    from ._accounting.report import report

    result = report(_parquet_input(args.output), html=args.html, samples=args.samples, prices=args.prices)
    print(result)
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gemframe`` command."""
    args = _parser().parse_args(argv)
    handler = {
        "run": _run,
        "emulator": _emulator,
        "cache": _cache,
        "manifest": _manifest,
        "report": _report,
    }[args.command]
    try:
        return handler(args)
    except GemframeError as exc:
        print(f"gemframe: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no (a path not writable, a disk full): one line
        print(f"gemframe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gemframe: interrupted; answers received so far are cached, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
