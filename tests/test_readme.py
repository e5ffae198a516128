"""Every code block in README.md runs as written, so the README cannot drift from the code.

How the blocks are read (README.md's "Contributing" notes say the same to authors):

- Every fenced block must name its language. ```` ```python ```` blocks and shell blocks
  (```` ```bash ````, ```` ```sh ````, ```` ```console ````) are run; anything else
  (```` ```text ```` for a command-line synopsis, ```` ```json ````, ...) is shown, not run.
- A runnable block is skipped only when it says ``# needs a real API key`` or when the line
  before its fence is ``<!-- not run: why -->`` (for commands that are real but not for a test,
  such as the full test suite or the benchmarks).
- In a shell block, ``pip install ...`` is not run (the package is installed already, and an
  install would re-point the shared editable install): a line starting with ``pip install`` is
  dropped, up to its first ``&&`` when it chains more commands.

The blocks run in README order, as a new user would run them in a fresh clone on the emulator, in
two parts side by side (each its own subprocess and clone, so pytest-xdist runs them on two
workers): the sections that use Ray, and all the others (`PARTS`). The Ray part runs in
tests/test_ray.py, inside the Ray instance started there, whose workers take that part's working
directory and environment (a Ray's workers take its starter's, not a later driver's): one Ray start
for the suite, not two. Each part runs with no API key in the environment, ``GEMFRAME_CACHE_DIR``
in a temp dir, the working directory a temp dir holding a copy of ``sample_data/`` (so
``sample_data/prompts.parquet`` and the image paths inside it resolve), ``gemframe`` and ``python``
on ``PATH`` meaning this interpreter (``gemframe`` as a fork of a zygote started in the blocks'
environment, when a part runs it twice or more: `_gemframe_on_a_zygote`). Python blocks share one
namespace per ``##`` section (a section's blocks build on each other; a section does not rely on
another's variables or files); shell blocks run in bash with ``set -euo pipefail``. A failure names
the README line of the block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

PYTHON = {"python"}
SHELL = {"bash", "sh", "console"}
NEEDS_KEY = "# needs a real API key"
_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`\s]*)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<why>.+?)\s*-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the block's first code line in README.md
    info: str  # the fence's language
    section: str  # the enclosing "## " heading
    code: str  # dedented by the fence's indent
    skip: str | None  # why it is not run (None: it runs)


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, n = "", 0
    while n < len(lines):
        line = lines[n]
        if line.startswith("## "):
            section = line[3:].strip()
        fence = _FENCE.match(line)
        if not fence:
            n += 1
            continue
        indent, info = fence["indent"], fence["info"]
        end = n + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        assert end < len(lines), f"README.md:{n + 1}: the block is never closed"
        body = [code[len(indent) :] if code.startswith(indent) else code.lstrip() for code in lines[n + 1 : end]]
        code = "\n".join(body) + "\n"
        before = next((lines[k] for k in range(n - 1, -1, -1) if lines[k].strip()), "")
        not_run = _NOT_RUN.match(before)
        skip = None
        if info not in PYTHON | SHELL:
            skip = f"a {info or 'plain'} block"
        elif not_run:
            skip = not_run["why"]
        elif NEEDS_KEY in code:
            skip = "needs a real API key"
        blocks.append(Block(n + 2, info, section, code, skip))
        n = end + 1
    return blocks


_USES_RAY = re.compile(r"^\s*(import|from) ray\b", re.MULTILINE)

# The two parts (see the module docstring): the Ray section's actors are most of the README's
# CPU time, so it runs beside the rest rather than after it. What each part's examples write,
# checked to hold answers.
PARTS = {
    "ray": ["out/ray/*.parquet"],
    "others": ["out/replies.parquet", "out/big.parquet", "out/replay.parquet"],
}


def part_of(blocks: list[Block], block: Block) -> str:
    """A block's part: "ray" if a block of its section imports Ray, else "others"."""
    ray_sections = {b.section for b in blocks if b.info in PYTHON and _USES_RAY.search(b.code)}
    return "ray" if block.section in ray_sections else "others"


def without_installs(script: str) -> str:
    """A shell block without its ``pip install`` commands (see the module docstring)."""
    kept = []
    for line in script.splitlines():
        if line.lstrip().startswith("pip install"):
            _, chained, rest = line.partition("&&")
            if not chained:
                continue
            line = rest.strip()
        kept.append(line)
    return "\n".join(kept) + "\n"


def _drive(blocks_file: str, bin_dir: str) -> int:
    """Run the blocks (a JSON list of `Block`s) in order; the first failure ends the run.
    ``bin_dir`` holds the ``gemframe`` command the shell blocks run (see `_gemframe_on_a_zygote`)."""
    import time
    import traceback
    import warnings

    import gemframe

    # An example whose rows fail has not run: the README's examples all answer every row.
    warnings.simplefilter("error", gemframe.RowsFailedWarning)
    blocks = [Block(**b) for b in json.loads(Path(blocks_file).read_text())]
    started = time.monotonic()
    namespaces: dict[str, dict] = {}
    # A zygote costs what a gemframe command's imports cost: worth it for two commands or more.
    shell = [without_installs(b.code) for b in blocks if b.info in SHELL]
    commands = sum(line.lstrip().startswith("gemframe ") for code in shell for line in code.splitlines())
    relay = None
    for block in blocks:
        where = f"README.md:{block.line} ({block.info} block in '{block.section}')"
        print(f"--- {where} at {time.monotonic() - started:.1f} s", flush=True)
        if block.info in SHELL:
            if relay is None and commands > 1:
                relay = _gemframe_on_a_zygote(Path(bin_dir)) or False  # False: tried, plain command
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", without_installs(block.code)],
                stderr=subprocess.PIPE,
                text=True,
            )
            print(done.stderr, end="", flush=True)
            if done.returncode or "rows failed" in done.stderr:
                print(f"FAILED {where}: exit code {done.returncode}", flush=True)
                return 1
            continue
        namespace = namespaces.setdefault(block.section, {"__name__": "__main__"})
        # Padded so that a traceback names README.md and the block's own line numbers; not
        # inheriting this module's `from __future__ import annotations` (a user's session has
        # none: the README's dataclass must work with evaluated annotations).
        code = compile("\n" * (block.line - 1) + block.code, str(README), "exec", dont_inherit=True)
        try:
            exec(code, namespace)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED {where}", flush=True)
            return 1
    forked = relay.served if relay else 0  # None or False: none
    print(f"ALL BLOCKS RAN in {time.monotonic() - started:.1f} s ({forked} gemframe commands on a zygote)", flush=True)
    return 0


def _gemframe_on_a_zygote(bin_dir: Path):
    """Make ``bin_dir/gemframe`` a fork of a zygote started here, now, in this process's
    environment and cwd (tests/_zygote.py, `Relay`): the same fresh ``python -m gemframe`` for
    the shell blocks, without ~0.6 CPU-s of imports per command. Started when
    the first shell block runs, so that it has the environment the blocks' commands get (polars,
    imported here, adds to a variable its library reads as it loads). Left as the plain
    ``exec python -m gemframe`` where a zygote cannot run. The zygote and relay end with this
    process (the zygote at the end of its socket)."""
    import _zygote  # tests/, this script's directory

    if not _zygote.LINUX:
        return None
    try:
        zygote = _zygote.Zygote()
    except _zygote.Unavailable:
        return None
    try:
        relay = _zygote.Relay(zygote, "gemframe", bin_dir / "gemframe.sock", timeout=590)
    except OSError:  # a socket path too long for AF_UNIX, say
        zygote.close()
        return None
    (bin_dir / "gemframe").write_text(relay.shim())
    return relay


def test_every_block_names_its_language():
    """A new block must decide: run (python/bash) or shown (text for a synopsis)."""
    untagged = [b.line - 1 for b in readme_blocks(README.read_text()) if not b.info]
    assert not untagged, f"README.md lines {untagged}: say ```python, ```bash or ```text (a synopsis)"


@pytest.mark.slow
# Only a hang may reach it: ~10 s idle, ~55 s with 2 busy loops on 2 CPUs.
@pytest.mark.timeout(600, method="thread")
@pytest.mark.parametrize("part", [part for part in PARTS if part != "ray"])
def test_readme_blocks_run(tmp_path, part):
    """The README's blocks but the Ray part's; tests/test_ray.py runs that one in its Ray."""
    work = tmp_path / "clone"
    prepare_clone(work)
    run_part(part, work, tmp_path / "cache", tmp_path)


UNSET = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "SEGMIND_API_KEY", "GEMFRAME_PROVIDER", "GEMFRAME_PRICES")
"""Not in a part's environment: no developer key, provider or prices reach the README's blocks."""


def part_environment(cache: Path) -> dict[str, str]:
    """What a part's environment sets (besides `UNSET` and ``PATH``): ``cache`` as the default
    cache, this checkout first on the path."""
    return dict(
        GEMFRAME_CACHE_DIR=str(cache),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        # Ray Data reads parquet footers in a pool of 2 new actor processes per read (a few CPU
        # seconds each time, many times that on a loaded 2-CPU machine); one reads a file or two.
        RAY_DATA_PARQUET_FOOTER_NUM_ACTORS="1",
    )


def prepare_clone(work: Path) -> None:
    """A new user's fresh clone, as far as the README's blocks can tell: ``sample_data/``."""
    shutil.copytree(ROOT / "sample_data", work / "sample_data")


def run_part(part: str, work: Path, cache: Path, scratch: Path, **env_vars: str) -> None:
    """Run a part's blocks (`PARTS`) in ``work`` (`prepare_clone`), with ``cache`` as
    GEMFRAME_CACHE_DIR, this interpreter as ``python`` and ``gemframe``, no API key, and
    ``env_vars``; ``scratch`` holds the harness's own files. Fails naming the block that failed."""
    blocks = readme_blocks(README.read_text())
    runs = [b for b in blocks if b.skip is None]
    skipped = [(b.line, b.skip) for b in blocks if b.info in PYTHON | SHELL and b.skip]
    # The parser found the README's blocks, and skipping stays the exception.
    assert sum(b.info in PYTHON for b in runs) >= 10 and sum(b.info in SHELL for b in runs) >= 3, runs
    assert len(skipped) <= 3, skipped
    runs = [b for b in runs if part_of(blocks, b) == part]
    assert runs, f"no README block in part {part!r}"

    bin_dir = scratch / "bin"
    bin_dir.mkdir()
    blocks_file = scratch / "blocks.json"
    blocks_file.write_text(json.dumps([asdict(b) for b in runs]))

    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(part_environment(cache), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", **env_vars)
    for name, command in (("python", ""), ("gemframe", " -m gemframe")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
        shim.chmod(0o755)
    done = subprocess.run(
        [sys.executable, __file__, blocks_file, bin_dir],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=590,
    )
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("---", "ALL"))))  # -s: timings
    assert done.returncode == 0 and "ALL BLOCKS RAN" in done.stdout, done.stdout[-6000:]
    # What the examples wrote holds answers, not row errors (Ray's actors warn elsewhere).
    import polars as pl

    for output in PARTS[part]:
        frame = pl.read_parquet(work / output)
        errors = frame["error"] if "error" in frame.columns else frame["reply"].struct.field("error")
        assert len(frame) >= 12 and errors.null_count() == len(frame), (output, errors.drop_nulls().to_list()[:3])


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1], sys.argv[2]))
