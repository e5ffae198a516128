"""Ray Data integration: the same payload/executor/cache code, run on Arrow batches in a pool of
Ray actors, for datasets bigger than one machine. Needs the ``ray`` extra
(``pip install "gemframe[ray]"``)::

    import ray, gemframe.ray

    ds = ray.data.read_parquet("s3://bucket/prompts/")
    out = gemframe.ray.generate(ds, "prompt", images="image_path", rpm=1000, num_actors=8)
    out.write_parquet("s3://bucket/replies/")

`generate` adds the reply struct (the polars path's ``reply`` column, same fields, same values)
to every batch. `GeminiBatch` is the callable class it maps, for calling ``map_batches``
yourself.

Limits: ``concurrency``, ``rpm`` and ``tpm`` are totals for the whole cluster. Each of the
``num_actors`` actors gets an equal share (``concurrency // num_actors`` connections,
``rpm / num_actors`` and ``tpm / num_actors``), so the sum never exceeds the total whichever
actors are busy. An idle actor's share is not lent to the others: keep ``num_actors`` at what
the dataset can keep busy (at least a few blocks per actor). Each actor paces its share evenly;
on any short window the cluster may be ahead of ``rpm / 60`` per second by at most one request
per actor.

Placement: an actor mostly waits on the network, so it reserves ``num_cpus=0.1`` by default,
and `generate` checks that the cluster can place the pool (plus one CPU for Ray Data's read and
write tasks) within ``placement_timeout`` seconds, raising a `ConfigError` that names the fix
rather than letting the job wait forever for actors that cannot start.

Cache: every actor opens ``cache_dir`` (diskcache is safe across processes on one machine). On
a multi-node cluster each node has its own cache at that path, unless it is on a shared
filesystem: a rerun serves each row from the cache of the node it lands on (on one machine, or
with a shared directory, that is every row).

Keys: the actors read the key from their own environment (``GEMINI_API_KEY`` /
``GOOGLE_API_KEY`` / ``SEGMIND_API_KEY`` on each node), or from ``api_key=``, which travels to
them wrapped in `Secret` (redacted in every repr). It is never put in the dataset.

This module is ``gemframe.ray`` and imports the ``ray`` package by absolute import; run scripts
from outside the ``gemframe/`` directory so ``import ray`` finds the real Ray.
"""

from __future__ import annotations

if not __package__:  # this file was found as a top-level "ray" (sys.path holds gemframe/ itself)
    raise ImportError(
        f"{__file__} was imported as the top-level module {__name__!r}, shadowing Ray: run "
        "Python from outside the gemframe/ directory"
    )

import os
from collections.abc import Mapping
from typing import Any

import polars as pl
import pyarrow as pa

try:
    import ray  # the Ray package, not this module: imports are absolute
    import ray.data
except ImportError as exc:
    raise ImportError(f'gemframe.ray needs Ray Data: pip install "gemframe[ray]" ({exc})') from exc

from ._core.cache import CacheMode
from ._core.client import Client
from ._core.providers import DEFAULT_MODEL, resolve_provider
from ._core.spec import ASK, Ask, RequestSpec, Unpack, asks, request_spec
from ._errors import ConfigError
from ._polars.expr import IntoExpr
from ._polars.expr import generate as _generate

__all__ = ["GeminiBatch", "Secret", "generate", "share"]


class Secret:
    """A value (an API key) that must reach Ray actors but never be shown: pickles as itself,
    prints as ``Secret('***')``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def reveal(self) -> str:
        return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))


def share(total: float | None, num_actors: int) -> float | None:
    """One actor's share of a cluster-wide rate budget (None: unlimited)."""
    return None if total is None else total / num_actors


def _share_concurrency(concurrency: int, num_actors: int) -> int:
    if num_actors < 1:
        raise ValueError("num_actors must be >= 1")
    if concurrency < num_actors:
        raise ValueError(
            f"concurrency={concurrency} is the total for the cluster and cannot be split over "
            f"num_actors={num_actors} actors; use num_actors <= concurrency"
        )
    return concurrency // num_actors


def _root_names(value: IntoExpr | bytes | bytearray | memoryview | os.PathLike[str] | None) -> list[str]:
    if value is None or isinstance(value, (bytes, bytearray, memoryview, os.PathLike)):
        return []
    if isinstance(value, str):
        return [value]
    return value.meta.root_names()


class GeminiBatch:
    """A callable class for ``Dataset.map_batches``: each actor builds one `gemframe.Client`
    and answers each Arrow batch with `gemframe.generate`, adding the reply struct column
    ``output`` (or its fields, with ``unnest=True``) to the batch's columns::

        ds.map_batches(
            GeminiBatch,
            fn_constructor_kwargs=dict(prompt="prompt", rpm=600, num_actors=4),
            batch_format="pyarrow",
            batch_size=256,
            compute=ray.data.ActorPoolStrategy(size=4),  # the same num_actors
        )

    ``concurrency``, ``rpm`` and ``tpm`` are cluster-wide totals: each actor takes
    ``1/num_actors`` of them, so ``num_actors`` must be the pool's (maximum) size. ``provider``
    None picks it from the actor's environment. ``api_key`` is best left out (the actor reads
    its environment) or passed as a `Secret`; a plain string works but shows wherever Ray shows
    constructor arguments. What to ask is a `gemframe.RequestSpec` (``spec=``) or its keywords
    (``model``, ``system``, ``config``, ...); the other arguments are `gemframe.generate`'s and
    `gemframe.Client`'s; ``client_options`` go to `gemframe.Client` (``timeout``,
    ``max_attempts``, ``adaptive``, ...).
    """

    @asks
    def __init__(
        self,
        prompt: IntoExpr = "prompt",
        *,
        images: Any = None,
        history: IntoExpr | None = None,
        spec: RequestSpec | None = None,
        provider: str | None = None,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        concurrency: int = 64,
        rpm: float | None = None,
        tpm: float | None = None,
        num_actors: int = 1,
        cache: str | CacheMode = CacheMode.USE,
        cache_dir: str | None = None,
        image_dir: str | None = None,
        raw: bool = False,
        output: str = "reply",
        unnest: bool = False,
        client_options: Mapping[str, Any] | None = None,
        **ask: Unpack[Ask],
    ) -> None:
        spec = request_spec(spec, ask, "GeminiBatch")  # `generate` hands its spec over, checked
        key = api_key.reveal() if isinstance(api_key, Secret) else api_key
        self.output = output
        self.unnest = unnest
        self.num_actors = num_actors
        self.client = Client(
            provider,
            api_key=key,
            base_url=base_url,
            model=spec.model_for(DEFAULT_MODEL),
            concurrency=_share_concurrency(concurrency, num_actors),
            rpm=share(rpm, num_actors),
            tpm=share(tpm, num_actors),
            cache=cache,
            cache_dir=cache_dir,
            progress=False,
            **dict(client_options or {}),
        )
        if self.client.cache_mode is not CacheMode.READ:
            self.client.provider.check_key()  # fail at actor start, not on the first batch
        if self.client.cache_mode is not CacheMode.OFF:
            _ = self.client.cache  # open it now: one handle, no race between batches
        self.columns = list(dict.fromkeys(_root_names(prompt) + _root_names(images) + _root_names(history)))
        self.expr = _generate(
            prompt,
            images=images,
            history=history,
            spec=spec,
            client=self.client,
            progress=False,
            image_dir=image_dir,
            raw=raw,
        ).alias(output)

    def __repr__(self) -> str:
        return f"GeminiBatch({self.client!r}, num_actors={self.num_actors}, output={self.output!r})"

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.columns if c not in batch.column_names]
        if missing:
            raise KeyError(f"gemframe: column(s) {missing} not in the dataset (it has {batch.column_names})")
        frame = pl.from_arrow(batch.select(self.columns))  # one chunk: polars calls the
        # expression once per chunk, and one call keeps the whole batch in flight
        if isinstance(frame, pl.Series):
            frame = frame.to_frame()
        reply = frame.select(self.expr).to_series()
        array = reply.to_arrow(compat_level=pl.CompatLevel.oldest())
        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks()
        if not self.unnest:
            return _append(batch, [(self.output, array)])
        return _append(batch, [(f.name, child) for f, child in zip(array.type, array.flatten())])

    def close(self) -> None:
        """Close the HTTP connections and the cache (Ray Data calls ``__del__`` when it shuts
        an actor down gracefully)."""
        self.client.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def _append(batch: pa.Table, columns: list[tuple[str, pa.Array]]) -> pa.Table:
    clash = [name for name, _ in columns if name in batch.column_names]
    if clash:
        raise ValueError(
            f"gemframe: the dataset already has column(s) {clash}; choose output=... "
            "(or unnest=False) so the reply does not overwrite them"
        )
    for name, array in columns:
        batch = batch.append_column(name, array)
    return batch


def _provider_name(provider: str | None) -> str:
    """The provider the driver would use: the actors then use the same one (a worker without a
    key fails loudly instead of silently falling back to the emulator)."""
    if provider is not None:
        if not isinstance(provider, str):
            raise TypeError(
                "provider must be a name ('google', 'segmind', 'emulator'): a Provider "
                "instance would carry its key into the actors' arguments"
            )
        return provider
    return resolve_provider(None).name


@asks
# Its keywords repeat GeminiBatch's on purpose: the one call users make, typed and documented
# (what to ask is one `Ask`/`RequestSpec`; the rest is how to run on Ray).
def generate(
    dataset: ray.data.Dataset,
    prompt: IntoExpr = "prompt",
    *,
    images: Any = None,
    history: IntoExpr | None = None,
    spec: RequestSpec | None = None,
    provider: str | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    concurrency: int = 64,
    rpm: float | None = None,
    tpm: float | None = None,
    cache: str | CacheMode = CacheMode.USE,
    cache_dir: str | None = None,
    image_dir: str | None = None,
    raw: bool = False,
    output: str = "reply",
    unnest: bool = False,
    num_actors: int = 2,
    batch_size: int = 256,
    num_cpus: float = 0.1,
    placement_timeout: float | None = 30.0,
    client_options: Mapping[str, Any] | None = None,
    **map_batches_options: Any,
) -> ray.data.Dataset:
    """The dataset with Gemini's reply to every row: ``map_batches`` of `GeminiBatch` over a
    fixed pool of ``num_actors`` actors (lazy, like every Ray Data transform).

    Arguments are those of `gemframe.generate` (``prompt``, ``images``, ``history`` name
    columns or are polars expressions over them) and `gemframe.Client`; ``concurrency``,
    ``rpm`` and ``tpm`` are totals for the whole cluster, split evenly over the actors.
    ``provider`` None is chosen here, from the driver's environment, as `gemframe.Client`
    would; ``api_key`` None lets each actor read its own environment. The reply struct is
    added as column ``output`` (its fields as columns with ``unnest=True``). What to ask is a
    `gemframe.RequestSpec` (``spec=``) or its keywords (``model``, ``system``, ``config``,
    ``safety``, ``response_schema``, ``sample``): checked here, on the driver, and handed to
    the actors as one object. Other keywords (``map_batches_options``) go to
    ``Dataset.map_batches``.

    ``num_cpus`` is what Ray reserves per actor: a tenth of a CPU by default, because an
    actor mostly waits on the network (8 actors and Ray Data's read and write tasks fit a
    2-CPU machine). Give it more only if the work around each call is heavy. The pool is
    checked here: if the cluster cannot place ``num_actors`` actors of ``num_cpus`` each and
    still keep one CPU for Ray Data's tasks (reading, writing) within ``placement_timeout``
    seconds, a `ConfigError` names the fix (fewer actors, a smaller ``num_cpus``, more
    nodes) instead of a job that waits forever. On an autoscaling cluster give new nodes
    time (``placement_timeout=600``); None skips the check.

    The dataset should have several blocks per actor (``ds.repartition(n)``), since one
    block is one task for one actor. Bad options (config keys, schema) raise here, before
    anything runs.
    """
    ask = {k: map_batches_options.pop(k) for k in ASK if k in map_batches_options}
    spec = request_spec(spec, ask, "gemframe.ray.generate")  # checked on the driver, once
    _share_concurrency(concurrency, num_actors)
    CacheMode(cache)
    if placement_timeout is not None:
        _check_placement(num_actors, num_cpus, placement_timeout, map_batches_options)
    kwargs = dict(
        prompt=prompt,
        images=images,
        history=history,
        spec=spec,
        provider=_provider_name(provider),
        api_key=Secret(api_key) if api_key is not None else None,
        base_url=base_url,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        num_actors=num_actors,
        cache=cache,
        cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
        image_dir=image_dir,
        raw=raw,
        output=output,
        unnest=unnest,
        client_options=client_options,
    )
    options: dict[str, Any] = dict(
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus,
    )
    options.update(map_batches_options)
    return dataset.map_batches(GeminiBatch, fn_constructor_kwargs=kwargs, **options)


def _check_placement(num_actors: int, num_cpus: float, timeout: float, options: Mapping[str, Any]) -> None:
    """Raise a `ConfigError` naming the fix if the cluster cannot hold the actor pool.

    Ray Data starts a pool it cannot place and then waits for the missing actors forever
    ("Actors: 8 (running=2, pending=6)"); a pool that takes every CPU starves its own read and
    write tasks (1 CPU each) just as forever. So before the job is built, one placement group
    asks the cluster for what the job needs: a bundle per actor plus one CPU for those tasks
    (SPREAD: any node will do, as for the actors), within ``timeout`` seconds (time enough for
    an autoscaler to add nodes, if it is given that long); it is removed again at once.
    """
    bundle = {"CPU": float(num_cpus)}
    if options.get("num_gpus"):
        bundle["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        bundle["memory"] = float(options["memory"])
    bundle.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    bundle = {k: v for k, v in bundle.items() if v > 0}
    if not bundle:  # nothing reserved per actor: nothing to place
        return
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([bundle] * num_actors + [{"CPU": 1.0}], strategy="SPREAD")
    try:
        placed = group.wait(timeout)
    finally:
        remove_placement_group(group)
    if placed:
        return
    total = ray.cluster_resources().get("CPU", 0)
    free = ray.available_resources().get("CPU", 0)
    fits = int((total - 1) // num_cpus) if num_cpus else num_actors
    raise ConfigError(
        f"gemframe.ray: the cluster could not place num_actors={num_actors} actors of "
        f"{bundle} each, plus 1 CPU for Ray Data's read/write tasks, within {timeout:g} s "
        f"(it has {total:g} CPUs, {free:g} free): use fewer actors "
        f"(num_actors={max(1, min(fits, num_actors - 1))}), or a smaller num_cpus (e.g. "
        "num_cpus=0.1: actors mostly wait on the network), or more nodes; on an autoscaling "
        "cluster, a longer placement_timeout"
    )
