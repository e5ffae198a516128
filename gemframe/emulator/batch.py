"""The emulator's Batch Mode: ``models/{m}:batchGenerateContent`` jobs with inlined requests,
polled through ``batches/{id}`` as long-running operations, in the real API's shapes.

A job answers every request exactly as ``generateContent`` would, but only when polled: it is
``BATCH_STATE_PENDING`` on creation, ``RUNNING`` for the next ``polls - 1`` polls, then ends in
``outcome`` (``BATCH_STATE_SUCCEEDED``, or ``FAILED``/``EXPIRED`` to test those paths). Every
``fail_every``-th request of a succeeded job gets a per-request error instead of a response.

Finished jobs are freed: a finished job stays gettable (with its answers) while it is among
the last ``keep`` jobs to finish; an older one is deleted and then answers 404 NOT_FOUND, as a
batch past the API's retention does. So a long-running emulator holds the unfinished jobs and
at most ``keep`` finished ones, however many jobs it has served.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .validation import STATUS_NAMES

BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
FINAL = {"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"}


class BatchError(Exception):
    """A batch call the API would refuse: (HTTP code, message)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Job:
    name: str
    model: str
    display_name: str
    requests: list[dict[str, Any]]  # InlinedRequest: {"request": {...}, "metadata": {...}}
    created: str
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    ended: str = ""  # endTime, once finished


class BatchStore:
    """Jobs of one emulator; ``answer(model, request) -> response or raise`` does the work."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], dict[str, Any]], keep: int = 100) -> None:
        self.answer = answer
        self.jobs: dict[str, _Job] = {}
        self.keep = keep  # finished jobs kept; older finished jobs are deleted
        self.finished: deque[str] = deque()  # names of kept finished jobs, oldest first
        self.polls = 2
        self.outcome = "BATCH_STATE_SUCCEEDED"
        self.fail_every = 0
        self.creates = 0  # how many jobs were submitted, for tests
        # Held around each call: the emulator makes them from worker threads (a poll that
        # finishes a job answers all its requests, too long to do on its event loop).
        self.lock = threading.Lock()

    def create(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        batch = body.get("batch")
        if not isinstance(batch, dict):
            raise BatchError(400, "Invalid JSON payload received. Expected a 'batch' object.")
        config = batch.get("input_config") or batch.get("inputConfig") or {}
        container = config.get("requests") or {}
        requests = container.get("requests") if isinstance(container, dict) else None
        if not isinstance(requests, list) or not requests:
            raise BatchError(400, "* BatchGenerateContentRequest.batch.input_config: requests is not specified")
        if not all(isinstance(r, dict) and isinstance(r.get("request"), dict) for r in requests):
            raise BatchError(400, "Each InlinedRequest needs a 'request' object.")
        display = batch.get("display_name") or batch.get("displayName") or ""
        digest = hashlib.sha256(json.dumps(requests, sort_keys=True).encode()).hexdigest()[:12]
        name = f"batches/{self.creates + 1}{digest}"  # unique even after jobs are deleted
        self.jobs[name] = _Job(name, model, display, requests, _now())
        self.creates += 1
        return self._operation(self.jobs[name])

    def get(self, name: str) -> dict[str, Any]:
        job = self._job(name)
        if job.state not in FINAL:
            job.polls += 1
            if job.polls >= self.polls:
                self._finish(job, self.outcome)
            elif job.polls >= 1:
                job.state = "BATCH_STATE_RUNNING"
        return self._operation(job)

    def cancel(self, name: str) -> dict[str, Any]:
        job = self._job(name)
        if job.state not in FINAL:
            job.state = "BATCH_STATE_CANCELLED"
            self._retire(job)
        return {}

    def list(self) -> dict[str, Any]:
        return {"operations": [self._operation(job) for job in self.jobs.values()]}

    def _job(self, name: str) -> _Job:
        if name not in self.jobs:
            raise BatchError(404, f"Batch {name} not found.")
        return self.jobs[name]

    def _retire(self, job: _Job) -> None:
        """Count a job that just finished among the kept ones; delete the oldest beyond keep."""
        job.ended = _now()
        self.finished.append(job.name)
        while len(self.finished) > max(self.keep, 0):
            self.jobs.pop(self.finished.popleft(), None)

    def _finish(self, job: _Job, state: str) -> None:
        job.state = state
        self._retire(job)
        if state != "BATCH_STATE_SUCCEEDED":
            return
        for i, item in enumerate(job.requests, 1):
            if self.fail_every and i % self.fail_every == 0:
                job.output.append(
                    {
                        "error": {
                            "code": 500,
                            "message": "Internal error while processing this request.",
                            "status": "INTERNAL",
                        }
                    }
                )
                continue
            try:
                job.output.append({"response": self.answer(job.model, item["request"])})
            except Exception as err:  # the generate path's ErrorAnswer: a per-request error
                code = getattr(err, "code", 400)
                # The error's own canonical status: a missing uploaded file or cache is 403
                # PERMISSION_DENIED, a file not yet ACTIVE 400 FAILED_PRECONDITION.
                status = getattr(err, "status", None) or STATUS_NAMES.get(code, "INTERNAL")
                job.output.append(
                    {"error": {"code": code, "message": getattr(err, "message", str(err)), "status": status}}
                )

    def _operation(self, job: _Job) -> dict[str, Any]:
        done = job.state in FINAL
        succeeded = sum(1 for o in job.output if "response" in o)
        stats = {"requestCount": str(len(job.requests))}
        if done:
            stats["successfulRequestCount"] = str(succeeded)
            stats["failedRequestCount"] = str(len(job.output) - succeeded)
        else:
            stats["pendingRequestCount"] = str(len(job.requests))
        metadata: dict[str, Any] = {
            "@type": BATCH_TYPE,
            "model": f"models/{job.model}",
            "displayName": job.display_name,
            "createTime": job.created,
            "updateTime": _now(),
            "batchStats": stats,
            "state": job.state,
            "name": job.name,
        }
        if job.ended:
            metadata["endTime"] = job.ended
        operation: dict[str, Any] = {"name": job.name, "metadata": metadata}
        if done:
            operation["done"] = True
            if job.state == "BATCH_STATE_SUCCEEDED":
                # The results twice, as the API answers them: in the batch resource's `output`
                # (the operation's metadata, which the google-genai SDK reads as `dest`) and in
                # the operation's `response` (which gemframe's batch client reads).
                output = {"inlinedResponses": {"inlinedResponses": job.output}}
                metadata["output"] = output
                operation["response"] = {"@type": OUTPUT_TYPE, **output}
            else:
                operation["error"] = {
                    "code": 4 if job.state == "BATCH_STATE_EXPIRED" else 13,
                    "message": f"Batch ended in {job.state}.",
                }
        return operation
