"""gemframe.ray on a local Ray instance (two CPUs), against the emulator served over TCP:
the same answers as the polars path, 8 actors on 2 CPUs, a cluster-wide rate limit that holds at
the server, and a cache the polars path then answers from.

Ray is the suite's most expensive dependency: a start brings about 10 processes, and every
actor of every pool is a new process that imports Ray Data, polars and gemframe (about 2 CPU
seconds each, many times that on a loaded 2-CPU machine). So Ray starts once per module, and
the tests share one pool of 8 actors (`paced_run`), each checking it from its own side.
"""

from __future__ import annotations

import bisect
import importlib.util
import pickle
import time
from types import SimpleNamespace

import polars as pl
import pyarrow as pa
import pytest
from polars.testing import assert_frame_equal

import gemframe as gf
from gemframe.emulator import Emulator

if importlib.util.find_spec("ray") is None:
    pytest.skip('needs Ray Data: pip install "gemframe[ray]"', allow_module_level=True)

# Bound by `_ray_modules` when this module's first test runs, not when the file is collected:
# every xdist worker collects every file, and importing Ray Data (with gemframe.ray) costs
# about a CPU-second, wasted in the workers that never run the "ray" group.
ray = gray = None

from . import test_readme as readme
from .conftest import ServedEmulator, _image_bytes

# A hung Ray must not hang CI: the thread method ends the run even inside a blocking call (it
# ends the worker process too, so only a hang may reach it: a test took 171 s at load 21 on
# 2 CPUs, one that took 7 s idle). One local Ray of two CPUs on the machine at a time: the
# "ray" group (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600, method="thread"), pytest.mark.xdist_group("ray")]

KEY = "sk-test-DO-NOT-SHOW-1234"
PER_ROW = ["cached", "attempts", "latency_ms"]  # how a row was answered, not what


class RecordingApp:
    """The emulator behind a wrapper that notes when each generate request arrives."""

    def __init__(self, app: Emulator) -> None:
        self.app = app
        self.arrivals: list[float] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].endswith(":generateContent"):
            self.arrivals.append(time.monotonic())
        await self.app(scope, receive, send)


@pytest.fixture(scope="module", autouse=True)
def _ray_modules():
    """Import Ray, Ray Data and gemframe.ray for this module's tests (see `ray` above)."""
    global ray, gray
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    gray = pytest.importorskip("gemframe.ray")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray of two CPUs. Its workers take the environment and working directory it
    starts in, whichever driver later joins it, so both are made for the README's Ray part
    (`test_readme_ray_part_runs_as_written`): a fresh clone as cwd, its cache as
    GEMFRAME_CACHE_DIR (this module's runs name their own caches)."""
    home = tmp_path_factory.mktemp("ray-home")
    readme.prepare_clone(home / "clone")
    with pytest.MonkeyPatch.context() as env:  # the workers inherit this environment: the part's
        for var in readme.UNSET:
            env.delenv(var, raising=False)  # no developer key reaches them
        for var, value in readme.part_environment(home / "cache").items():
            env.setenv(var, value)
        # Ray starts its workers at nice 15: beside other work on the machine, they would get
        # a few percent of a CPU (README, "Busy machines"); the suite's own processes run at 0.
        env.setenv("RAY_worker_niceness", "0")
        env.chdir(home / "clone")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield SimpleNamespace(clone=home / "clone", cache=home / "cache", address=ray.get_runtime_context().gcs_address)
    ray.shutdown()


def test_readme_ray_part_runs_as_written(ray_local, tmp_path):
    """The README's Ray part (see tests/test_readme.py) in this module's Ray, which its driver
    joins (RAY_ADDRESS) instead of starting one of its own: a Ray start is ~10 CPU-s."""
    readme.run_part("ray", ray_local.clone, ray_local.cache, tmp_path, RAY_ADDRESS=ray_local.address)


@pytest.fixture(scope="module")
def server():
    app = RecordingApp(Emulator())
    served = ServedEmulator(app)
    yield served, app
    served.stop()


def _served_as_google(served: ServedEmulator, cache_dir) -> dict:
    """Where the actors send: the served emulator as the Google API, with KEY; and their cache."""
    return dict(provider="google", api_key=KEY, base_url=served.url, cache_dir=str(cache_dir))


def _polars_client(served: ServedEmulator, cache_dir) -> gf.Client:
    """The polars path's client, in this process, to the same server (`_served_as_google`)."""
    return gf.Client(**_served_as_google(served, cache_dir), progress=False)


def _requests(app: RecordingApp) -> int:
    return app.app.stats.requests


def _frame(rows: int, image: bytes | None = None) -> pl.DataFrame:
    """Prompts with repeats, a null prompt, and an image on every 7th row."""
    return pl.DataFrame(
        {
            "id": range(rows),
            "prompt": [None if i == 5 else f"question {i % (rows - 20)}" for i in range(rows)],
            "image": [image if image is not None and i % 7 == 0 else None for i in range(rows)],
        },
        schema={"id": pl.Int64, "prompt": pl.String, "image": pl.Binary},
    )


def _collect(dataset) -> pl.DataFrame:
    return pl.from_arrow(pa.concat_tables(ray.get(dataset.to_arrow_refs()))).sort("id")


def _answers(frame: pl.DataFrame) -> pl.DataFrame:
    """What was answered, per row: the reply's fields without how it was answered."""
    return frame.sort("id").select("id", pl.col("reply").struct.unnest()).drop(PER_ROW)


# What the paced run and its rerun ask: an expression (evaluated in the actors) over a column,
# an image column, a system instruction and a config.
PROMPT = pl.col("prompt").str.to_uppercase()
ASKED = dict(images="image", system="Be terse.", config={"temperature": 0})
PER_SECOND = 40  # the paced run's cluster-wide rate: rpm=2400, 20 requests/s per actor


ACTORS = 8  # on 2 CPUs: the default num_cpus=0.1 leaves room for Ray Data's read tasks
SEEDED = 20  # rows answered into the actors' cache before they run


@pytest.fixture(scope="module")
def paced_run(ray_local, server, tmp_path_factory):
    """One run of gemframe.ray that several tests check, each from its own side: an actor pool
    costs about 2 CPU-seconds per actor to start (many times that on a loaded 2-CPU machine),
    so the tests share it instead of starting one each. The frame goes through the polars path
    (the reference), then, as parquet files, through 8 actors of the default ``num_cpus`` on 2
    CPUs, paced at PER_SECOND for the cluster, noting what reached the server. Read tasks need a
    CPU each: with 1 CPU per actor this used to wait forever (running=2, pending=6)."""
    served, app = server
    frame = _frame(200, _image_bytes("PNG", (16, 12), "teal"))
    cache = tmp_path_factory.mktemp("paced")
    with _polars_client(served, cache / "polars") as client:
        expected = frame.with_columns(reply=gf.generate(PROMPT, client=client, **ASKED))
    # The first SEEDED rows' answers are in the actors' cache before they start: they must read it.
    with _polars_client(served, cache / "ray") as client:
        frame.head(SEEDED).with_columns(reply=gf.generate(PROMPT, client=client, **ASKED))

    source = cache / "prompts"
    source.mkdir()
    for part in range(20):  # a block per file: 2-3 per actor
        frame.slice(part * 10, 10).write_parquet(source / f"part-{part:02}.parquet")
    before, start = _requests(app), len(app.arrivals)
    with pytest.MonkeyPatch.context() as env:
        # Ray Data reads parquet footers in a pool of 2 new actor processes per read: one will do.
        env.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        out = gray.generate(
            ray.data.read_parquet(str(source)).repartition(20),  # small files are read as one block
            PROMPT,
            images="image",
            spec=gf.RequestSpec(system="Be terse.", config={"temperature": 0}),  # ASKED, as one spec
            **_served_as_google(served, cache / "ray"),
            rpm=PER_SECOND * 60,
            num_actors=ACTORS,
            concurrency=2 * ACTORS,
            batch_size=10,
            unnest=True,
        )
        got = _collect(out)
    return SimpleNamespace(
        frame=frame,
        expected=expected,
        got=got,
        out=out,
        sent=_requests(app) - before,
        arrivals=sorted(app.arrivals[start:]),
        cache_dir=cache / "ray",
    )


def test_same_answers_as_polars_from_eight_actors_on_two_cpus(paced_run):
    """What to ask went to the actors as one gf.RequestSpec (as it is), with ``unnest=True``
    (the reply's fields as columns, no "reply" column); the answers are the polars path's."""
    frame, expected, got = paced_run.frame, paced_run.expected, paced_run.got
    fields = [f.name for f in expected.schema["reply"].fields]
    assert got.columns == ["id", "prompt", "image", *fields]
    assert got["id"].to_list() == list(range(frame.height))
    assert_frame_equal(got.select(frame.columns), frame)  # input columns pass through untouched
    assert_frame_equal(got.drop(PER_ROW), frame.join(_answers(expected), on="id").sort("id"))
    assert got.schema == {**frame.schema, **dict(expected.schema["reply"].to_schema())}
    assert got["text"][1].startswith('Emulated reply to: "QUESTION 1"')  # PROMPT ran
    assert got["text"].null_count() == 1  # the null prompt: null reply
    assert got["cached"].null_count() == 1  # a row was answered by the server or by the cache
    assert got["cached"].head(SEEDED).drop_nulls().all()  # the actors read the cache
    assert (~got["cached"]).sum() == paced_run.sent  # (rows 180-199 ask what rows 0-19 asked)
    # Each request not in the seeded rows reached the server once (twice at most if two actors
    # asked for it at the same moment); a request is its prompt and whether it has an image.
    asked = frame.drop_nulls("prompt").select("id", "prompt", pl.col("image").is_null())
    seeded = set(asked.filter(pl.col("id") < SEEDED).drop("id").iter_rows())
    fresh = set(asked.filter(pl.col("id") >= SEEDED).drop("id").iter_rows()) - seeded
    assert len(fresh) <= paced_run.sent <= frame.height - SEEDED


def test_global_rate_limit_holds_at_the_server(paced_run):
    """Each actor paces its share (PER_SECOND / ACTORS), evenly spaced: in any one second the
    cluster is ahead of PER_SECOND by at most a request per actor, and not faster overall."""
    arrivals = paced_run.arrivals
    assert len(arrivals) == paced_run.sent > 3 * PER_SECOND  # every request noted; seconds of them
    busiest = max(bisect.bisect_left(arrivals, t + 1.0) - i for i, t in enumerate(arrivals))
    assert busiest <= PER_SECOND + ACTORS, f"{busiest} requests arrived within one second"
    assert (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) <= PER_SECOND * 1.05  # nor faster overall
    assert busiest > PER_SECOND / ACTORS + 1  # several actors' shares were in use at once


def test_the_actors_cache_answers_the_polars_path(paced_run, server):
    """A rerun answers from the cache the actors wrote, whichever path runs it: the polars path
    over it sends nothing. And the key is in no repr of the job."""
    served, app = server
    before = _requests(app)
    with _polars_client(served, paced_run.cache_dir) as client:
        again = paced_run.frame.with_columns(reply=gf.generate(PROMPT, client=client, **ASKED))
    assert _requests(app) == before
    assert again["reply"].struct.field("cached").drop_nulls().all()
    assert_frame_equal(_answers(again), _answers(paced_run.expected))
    out = paced_run.out
    for shown in (repr(out), str(out), out.stats(), repr(paced_run.got.to_dicts())):
        assert KEY not in shown


def test_callable_class_alone(server, tmp_path):
    """GeminiBatch works on a plain Arrow table (what map_batches hands it), with a share."""
    served, app = server
    batch = gray.GeminiBatch(
        "prompt",
        provider="google",
        api_key=gray.Secret(KEY),
        base_url=served.url,
        cache_dir=str(tmp_path / "cache"),
        concurrency=8,
        rpm=600,
        tpm=60_000,
        num_actors=4,
        output="answer",
    )
    try:
        assert KEY not in repr(batch)
        assert batch.client.executor.concurrency == 2
        assert batch.client.executor.limiter.requests.rate == pytest.approx(600 / 60 / 4)
        assert batch.client.executor.limiter.tokens.rate == pytest.approx(60_000 / 60 / 4)
        table = pa.table({"prompt": ["a", None, "b"], "extra": pa.array([1, 2, 3], pa.int8())})
        result = batch(table)
        assert result.column_names == ["prompt", "extra", "answer"]
        assert result.schema.field("extra").type == pa.int8()
        assert pl.from_arrow(result)["answer"].struct.field("text").to_list() == [
            'Emulated reply to: "a".',
            None,
            'Emulated reply to: "b".',
        ]
        calls = []
        send = batch.client.send
        batch.client.send = lambda rows, **kw: calls.append(1) or send(rows, **kw)
        chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 1), table.slice(2)])
        assert chunked.column("prompt").num_chunks == 3
        again = pl.from_arrow(batch(chunked))["answer"].struct.field("cached")
        assert again.to_list() == [True, None, True] and calls == [1]  # one call for the batch
        with pytest.raises(ValueError, match="already has column"):
            batch(table.rename_columns(["prompt", "answer"]))  # would overwrite a column
        with pytest.raises(KeyError, match="not in the dataset"):
            batch(table.rename_columns(["question", "extra"]))
    finally:
        batch.close()


def test_checked_on_the_driver_before_anything_runs(ray_local):
    dataset = ray.data.from_items([{"prompt": "x"}])
    with pytest.raises(gf.InputError):
        gray.generate(dataset, config={"not_a_config_key": 1}, provider="emulator")
    with pytest.raises(gf.ConfigError, match="sample must be"):
        gray.generate(dataset, spec=gf.RequestSpec(), sample=-1, provider="emulator")
    with pytest.raises(ValueError, match="concurrency"):
        gray.generate(dataset, concurrency=2, num_actors=4, provider="emulator")
    with pytest.raises(TypeError, match="name"):
        gray.generate(dataset, provider=gf.GoogleAI(api_key=KEY))


def test_a_pool_the_cluster_cannot_hold_fails_with_the_fix(ray_local, server, tmp_path):
    """Two actors of 1.5 CPUs on 2 CPUs cannot be placed: a ConfigError naming the fix, raised
    by generate() after placement_timeout, not a job that waits forever."""
    served, app = server
    dataset = ray.data.from_items([{"prompt": "never sent"}])
    before = _requests(app)
    start = time.monotonic()
    with pytest.raises(gf.ConfigError) as error:
        gray.generate(
            dataset,
            "prompt",
            **_served_as_google(served, tmp_path / "cache"),
            num_actors=2,
            num_cpus=1.5,
            placement_timeout=2,
        )
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert "could not place num_actors=2" in message and "it has 2 CPUs" in message
    assert "num_actors=1" in message and "num_cpus=" in message and "placement_timeout" in message
    assert _requests(app) == before


def test_secret_survives_pickling_and_never_prints():
    secret = pickle.loads(pickle.dumps(gray.Secret(KEY)))
    assert secret.reveal() == KEY
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in f"{secret}"
    assert gray.share(None, 3) is None and gray.share(90, 3) == 30
