"""``gemframe``: run a parquet job, serve the emulator, look after the cache. Thin over the API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .cache import CacheMode, ResponseCache, default_cache_dir
from .errors import GemframeError
from .providers import DEFAULT_MODEL, PROVIDERS

EPILOG = """\
examples:
  gemframe run sample_data/prompts.parquet out.parquet --prompt prompt --images image_path --provider emulator
  GEMINI_API_KEY=... gemframe run in.parquet out.parquet --model gemini-2.5-flash --concurrency 64
  gemframe emulator --port 8080
  gemframe cache stats
"""


def _json_arg(text: str) -> dict:
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="answer every row of a parquet file, write a parquet of replies",
        description="Read IN.parquet in batches, ask Gemini once per row (cached), and write "
        "OUT.parquet with the input columns plus the reply fields (text, finish_reason, tokens, "
        "images, error, ...). A killed run, rerun, resends only unanswered rows.",
    )
    run.add_argument("input", metavar="IN.parquet")
    run.add_argument("output", metavar="OUT.parquet")
    run.add_argument("--prompt", default="prompt", metavar="COL", help="prompt column (default: prompt)")
    run.add_argument("--images", metavar="COL", help="column of image paths/URLs/bytes, or lists of them")
    run.add_argument("--system", metavar="TEXT", help="system instruction for every row")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"model id (default: {DEFAULT_MODEL})")
    run.add_argument("--provider", choices=sorted(PROVIDERS), help="default: from the API key found in the environment, else emulator")
    run.add_argument("--emulator", action="store_const", const="emulator", dest="provider", help="same as --provider emulator")
    run.add_argument("--base-url", metavar="URL", help="endpoint override (a proxy or a local server)")
    run.add_argument("--config", type=_json_arg, metavar="JSON", help='generationConfig, e.g. \'{"temperature": 0}\'')
    run.add_argument("--safety", type=_json_arg, metavar="JSON", help='safety thresholds, e.g. \'{"harassment": "block_none"}\'')
    run.add_argument("--concurrency", type=int, default=16, metavar="N", help="requests in flight (default: 16)")
    run.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout in seconds (default: 120)")
    run.add_argument("--max-attempts", type=int, default=5, metavar="N", help="attempts per row on transient errors (default: 5)")
    run.add_argument("--cache", choices=[m.value for m in CacheMode], default="use", help="cache mode (default: use)")
    run.add_argument("--cache-dir", metavar="DIR", help=f"cache directory (default: $GEMFRAME_CACHE_DIR or {default_cache_dir()})")
    run.add_argument("--image-dir", metavar="DIR", help="write generated images here and store their paths")
    run.add_argument("--batch-rows", type=int, default=10_000, metavar="N", help="rows per batch read/written (default: 10000)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--batch", action="store_true", help="use the provider's Batch Mode (half price, answered within a day); "
                     "jobs are recorded in OUT.parquet.batch.json, so running the command again resumes them")
    run.add_argument("--poll-interval", type=float, default=30.0, metavar="S", help="seconds between batch polls (default: 30)")

    emulator = commands.add_parser("emulator", help="serve the offline Gemini emulator over HTTP")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8080)
    emulator.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds added to each answer")

    cache = commands.add_parser("cache", help="inspect or clear the answer cache")
    cache.add_argument("action", choices=["stats", "clear"])
    cache.add_argument("--cache-dir", metavar="DIR")
    return parser


def _run(args: argparse.Namespace) -> int:
    from .client import Client
    from .pipeline import run

    client = Client(
        args.provider, base_url=args.base_url, model=args.model, concurrency=args.concurrency,
        timeout=args.timeout, max_attempts=args.max_attempts, cache=args.cache,
        cache_dir=args.cache_dir,
    )
    try:
        manifest = run(
            args.input, args.output, prompt=args.prompt, images=args.images, system=args.system,
            model=args.model, config=args.config, safety=args.safety, client=client,
            image_dir=args.image_dir, batch_rows=args.batch_rows, progress=not args.no_progress,
            mode="batch" if args.batch else "live", poll_interval=args.poll_interval,
        )
    finally:
        client.close()
    summary = {k: manifest[k] for k in ("rows", "cache_hits", "requests_sent", "errors", "wall_seconds")}
    print(f"wrote {args.output}: {json.dumps(summary)}", file=sys.stderr)
    return 0


def _emulator(args: argparse.Namespace) -> int:
    from .emulator import Emulator, serve

    print(f"gemframe emulator on http://{args.host}:{args.port}", file=sys.stderr)
    serve(Emulator(latency=args.latency), host=args.host, port=args.port)
    return 0


def _cache(args: argparse.Namespace) -> int:
    store = ResponseCache(args.cache_dir)
    if args.action == "stats":
        print(json.dumps({"directory": store.directory, "entries": len(store)}))
    else:
        print(f"removed {store.clear()} entries from {store.directory}")
    store.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gemframe`` command."""
    args = _parser().parse_args(argv)
    handler = {"run": _run, "emulator": _emulator, "cache": _cache}[args.command]
    try:
        return handler(args)
    except GemframeError as exc:
        print(f"gemframe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gemframe: interrupted; answers received so far are cached, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
