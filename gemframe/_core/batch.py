"""Batch Mode: the misses of a call go to the provider's batch API as one or more jobs (inlined
requests, each job under the API's ~20 MB inline limit), answered asynchronously at half price.

The jobs are recorded in a small JSON state file *before* they are submitted and after every
change, so a run that is stopped — Ctrl-C, kill -9, a closed laptop — and started again polls the
same jobs instead of submitting new ones: a row is never submitted twice. A job whose creation
may or may not have reached the server is found again by its display name. Answers go into the
cache as each job is collected, so batch and live runs share them; with ``cache='off'`` they are
kept in memory for the call that waits for them (`Client.send` refuses ``cache='off'`` with
``wait=False``: nothing would keep those answers).

Every state a rerun cannot get out of by itself (a job the provider no longer has, a state
file for another model, an unreadable one) names the state file and what deleting it does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .._errors import ConfigError, RowError
from .._files import atomic_write
from .providers import providers_with

if TYPE_CHECKING:
    from .cache import ResponseCache
    from .executor import Executor
    from .progress import Progress
    from .providers import BatchCapable, Provider

STATE_FORMAT = 1
JOB_LIMIT_BYTES = 18 * 2**20  # stay under the API's 20 MB inline batch limit
JOB_LIMIT_REQUESTS = 10_000
FINAL_STATES = {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"}


@dataclass
class Job:
    """One submitted (or about to be submitted) batch job and what came of it."""

    display_name: str
    keys: list[str]
    name: str | None = None  # batches/...; None until the create call answered
    state: str = "UNSUBMITTED"
    collected: bool = False
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> RowError fields


def _chunks(bodies: dict[str, bytes]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for key, content in bodies.items():
        if chunk and (size + len(content) > JOB_LIMIT_BYTES or len(chunk) >= JOB_LIMIT_REQUESTS):
            yield chunk
            chunk, size = [], 0
        chunk.append(key)
        size += len(content)
    if chunk:
        yield chunk


class BatchJobs:
    """The batch jobs of one state file, for one provider and model."""

    def __init__(
        self,
        provider: Provider,
        executor: Executor,
        cache: ResponseCache | None,
        model: str,
        state_path: str,
        poll_interval: float,
        progress: Progress,
    ) -> None:
        if "batch" not in provider.capabilities:  # declared by the provider, see providers.py
            able = " or ".join(providers_with("batch"))  # "google or emulator"
            raise ConfigError(f"batch mode needs the {able} provider, not {provider.name!r}")
        self.provider = provider
        self.batch_api = cast("BatchCapable", provider)  # its batch URLs: declared, so present (register_provider)
        self.executor = executor
        self.cache = cache  # None: cache='off', answers kept in `collected` instead
        self.collected: dict[str, bytes] = {}  # cache='off': the answers this object collected
        self.model = model
        self.path = state_path
        self.poll_interval = poll_interval
        self.progress = progress
        self.jobs = self._load()

    # -- the state file ---------------------------------------------------------------------
    def _load(self) -> list[Job]:
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            if (state.get("provider"), state.get("model")) != (self.provider.name, self.model):
                raise ConfigError(
                    f"{self.path} holds batch jobs for {state.get('provider')}/{state.get('model')}, "
                    f"not {self.provider.name}/{self.model}; pass another state path or delete it"
                )
            return [Job(**job) for job in state["jobs"]]
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # not JSON, or not ours
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"{self.path} is not a readable batch state file ({type(exc).__name__}: {exc}); "
                "delete it to submit its rows again, or pass another batch_state"
            ) from None

    def _save(self) -> None:
        state = {
            "format": STATE_FORMAT,
            "provider": self.provider.name,
            "model": self.model,
            "jobs": [asdict(job) for job in self.jobs],
        }
        with atomic_write(self.path, "w", encoding="utf-8") as f:  # never through a planted symlink
            json.dump(state, f)

    # -- the work ----------------------------------------------------------------------------
    def resolve(self, bodies: dict[str, bytes], wait: bool) -> dict[str, bytes | RowError]:
        """Answers (raw response bytes) or row errors for the keys of ``bodies`` (request JSON)."""
        covered = {k for job in self.jobs if not job.collected for k in job.keys}
        covered |= {k for job in self.jobs for k in job.errors}
        new = {k: v for k, v in bodies.items() if k not in covered}
        for keys in _chunks(new):
            digest = hashlib.sha256("".join(keys).encode()).hexdigest()[:16]
            self.jobs.append(Job(display_name=f"gemframe-{digest}", keys=keys))
            self._save()  # recorded before it is sent: a crash now cannot submit it twice
        self._submit_unsubmitted(bodies)
        self._poll(wait)
        answers: dict[str, bytes | RowError] = {}
        if self.cache is not None:
            found = self.cache.get_many(bodies)
        else:
            found = {k: self.collected[k] for k in bodies if k in self.collected}
        pending = {k: job for job in self.jobs if not job.collected for k in job.keys}
        errors = {k: e for job in self.jobs for k, e in job.errors.items()}
        for key in bodies:
            if key in errors:
                answers[key] = RowError(**errors[key])
            elif key in found:
                answers[key] = found[key]
            elif key in pending:
                job = pending[key]
                answers[key] = RowError(
                    None,
                    "BATCH_PENDING",
                    f"batch job {job.name} is {job.state}; run again to collect it (state: {self.path})",
                )
            else:
                answers[key] = RowError(
                    None,
                    "BATCH_LOST",
                    (
                        f"answered by a batch job but no longer in the cache; delete {self.path} "
                        "to submit this row again"
                    ),
                )
        return answers

    def wait(self) -> None:
        """Poll until every recorded job has finished and been collected into the cache."""
        self._poll(wait=True)

    def _submit_unsubmitted(self, contents: dict[str, bytes]) -> None:
        todo = [job for job in self.jobs if job.name is None]
        if not todo:
            return
        existing = {
            op.get("metadata", {}).get("displayName"): op.get("name")
            for op in self._call("GET", self.batch_api.batches_url()).get("operations", [])
        }
        for job in todo:
            if job.display_name in existing:  # created before a crash: adopt it
                job.name = existing[job.display_name]
            else:
                missing = [k for k in job.keys if k not in contents]
                if missing:
                    raise ConfigError(
                        f"{self.path}: an unsubmitted job lists rows this call does not have; delete the state file"
                    )
                requests = b",".join(
                    b'{"request":' + contents[k] + b',"metadata":{"key":"' + k.encode() + b'"}}' for k in job.keys
                )
                body = (
                    b'{"batch":{"display_name":"'
                    + job.display_name.encode()
                    + b'","input_config":{"requests":{"requests":['
                    + requests
                    + b"]}}}}"
                )
                job.name = self._call("POST", self.batch_api.batch_url(self.model), body)["name"]
            job.state = "BATCH_STATE_PENDING"
            self._save()

    def _poll(self, wait: bool) -> None:
        while True:
            for job in self.jobs:
                if job.collected or job.name is None:
                    continue
                response = self.executor.call("GET", self.batch_api.operation_url(job.name)).result()
                if response.status_code == 404:
                    self._gone(job, self.provider.failure(response).message)
                    self._save()
                    continue
                operation = self._answer(response)
                job.state = operation.get("metadata", {}).get("state", job.state)
                if operation.get("done") or job.state in FINAL_STATES:
                    self._collect(job, operation)
                self._save()
            open_jobs = [job for job in self.jobs if not job.collected]
            self.progress.status(
                batch=", ".join(sorted({j.state.removeprefix("BATCH_STATE_").lower() for j in open_jobs})) or "done",
                jobs=f"{len(self.jobs) - len(open_jobs)}/{len(self.jobs)}",
            )
            if not open_jobs or not wait:
                return
            time.sleep(self.poll_interval)

    def _collect(self, job: Job, operation: dict[str, Any]) -> None:
        """Write a finished job's answers to the cache; remember its per-row errors."""
        if job.state == "BATCH_STATE_SUCCEEDED":
            output = (operation.get("response") or {}).get("inlinedResponses") or {}
            items = output.get("inlinedResponses", []) if isinstance(output, dict) else output
            by_key = {(i.get("metadata") or {}).get("key"): i for i in items}
            entries = []
            for position, key in enumerate(job.keys):
                item = by_key.get(key) or (items[position] if position < len(items) else {})
                if "response" in item:
                    entries.append((key, self.model, json.dumps(item["response"], separators=(",", ":")).encode()))
                else:
                    error = item.get("error") or {"message": "missing from the job's results"}
                    job.errors[key] = asdict(
                        RowError(error.get("code"), error.get("status") or "BATCH_ERROR", error.get("message", ""))
                    )
            if self.cache is not None:
                self.cache.set_many(entries)
            else:  # cache='off': kept for this call (which waits for it: see Client.send)
                self.collected.update((key, raw) for key, _, raw in entries)
        else:
            message = (operation.get("error") or {}).get("message") or f"batch job ended in {job.state}"
            status = job.state.removeprefix("BATCH_STATE_")
            job.errors = {key: asdict(RowError(None, f"BATCH_{status}", message)) for key in job.keys}
        job.collected = True

    def _gone(self, job: Job, message: str) -> None:
        """A recorded job the provider answers 404 for: past its retention, deleted, or made by
        an in-process emulator that ended with its process. Its answers can never be collected,
        so its rows get an error naming the state file, which a rerun repeats without polling:
        deleting the file submits them again (and pays again) — the user's call, not ours."""
        where = ""
        if self.provider.name == "emulator" and self.provider.base_url == self.provider.default_base_url:
            where = (
                " Jobs of the in-process emulator end with the process that submitted them; to "
                "collect from another process, serve one (`gemframe emulator`) and pass its base_url."
            )
        error = RowError(
            404,
            "BATCH_GONE",
            (
                f"batch job {job.name} is gone ({message.strip() or '404 NOT_FOUND'}); its answers "
                f"cannot be collected.{where} Delete {self.path} to submit these rows again."
            ),
        )
        job.state = "GONE"
        job.errors = {key: asdict(error) for key in job.keys}
        job.collected = True

    def _call(self, method: str, url: str, content: bytes | None = None) -> dict[str, Any]:
        return self._answer(self.executor.call(method, url, content).result())

    def _answer(self, response: Any) -> dict[str, Any]:
        if response.status_code != 200:
            raise self.provider.failure(response).as_api_error()
        return cast(dict[str, Any], response.json())  # the API's answer: a JSON object


def default_state_path(cache_dir: str, model: str, keys: list[str]) -> str:
    """Where an expression's batch state lives when none is given: in the cache directory,
    named by the requests, so running the same cell again finds its jobs."""
    digest = hashlib.sha256((model + "".join(sorted(keys))).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, "batches", f"{digest}.json")
