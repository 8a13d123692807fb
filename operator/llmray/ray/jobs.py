"""Ray Jobs REST client: submit (idempotent by submission id), status, logs, stop, list.

Ray never retries a job; the operator does, with a new submission id per attempt
(:func:`llmray.ray.endpoints.submission_id`). Submitting an id that already exists returns the
existing job, so a reconcile repeated after a crash never starts a second driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import httpx

from ._http import RayHTTP, RayResponse
from .errors import RayAPIError, RayAuthError, RayBadResponse, RayNotFound

DEFAULT_TAIL_LINES = 200
DEFAULT_TAIL_BYTES = 64 * 1024
MAX_TAIL_LINES = 10_000
LOGS_MAX_BYTES = 4 * 2**20
"""Cap of :meth:`JobsAPI.logs` (the whole driver log, for people and tests, never for polling)."""
# Ray answers a submission only after it started the job's supervisor actor (and, on a fresh head,
# after a job agent registered): tens of seconds on a loaded machine.
SUBMIT_TIMEOUT = httpx.Timeout(120.0, connect=3.0)
SUBMIT_DEADLINE_S = 120.0


class JobStatus(StrEnum):
    """Ray's job states (``ray.job_submission.JobStatus``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED)


def _ms_to_datetime(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):  # inf, nan, year 30000...
        return None


@dataclass(frozen=True)
class JobInfo:
    """One submitted job as the head reports it."""

    submission_id: str
    status: JobStatus
    message: str = ""
    entrypoint: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    error_type: str | None = None
    driver_exit_code: int | None = None
    driver_node_id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal


def parse_job(data: Mapping[str, Any]) -> JobInfo:
    """A :class:`JobInfo` from ``GET /api/jobs/{id}`` (unknown fields ignored)."""
    try:
        status = JobStatus(str(data.get("status", "")).upper())
    except ValueError as exc:
        raise ValueError(f"unknown Ray job status {data.get('status')!r}") from exc
    exit_code = data.get("driver_exit_code")
    return JobInfo(
        submission_id=str(data.get("submission_id") or data.get("job_id") or ""),
        status=status,
        message=str(data.get("message") or ""),
        entrypoint=str(data.get("entrypoint") or ""),
        start_time=_ms_to_datetime(data.get("start_time")),
        end_time=_ms_to_datetime(data.get("end_time")),
        metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
        error_type=str(data["error_type"]) if data.get("error_type") else None,
        driver_exit_code=int(exit_code) if isinstance(exit_code, int) else None,
        driver_node_id=str(data["driver_node_id"]) if data.get("driver_node_id") else None,
    )


def _parse_jobs(data: Any) -> list[JobInfo]:
    if not isinstance(data, list):
        raise TypeError(f"expected a JSON list of jobs, got {type(data).__name__}")
    return [parse_job(item) for item in data if isinstance(item, Mapping) and item.get("submission_id")]


def tail_text(text: str, *, max_lines: int = DEFAULT_TAIL_LINES, max_bytes: int = DEFAULT_TAIL_BYTES) -> str:
    """The end of ``text``: at most ``max_lines`` lines and ``max_bytes`` UTF-8 bytes, whole lines.

    Cutting at a line boundary keeps a partial ``LLMRAY_PROGRESS {...}`` line out of the tail.
    """
    if max_lines <= 0 or max_bytes <= 0:
        return ""
    data = text.encode()
    if len(data) > max_bytes:
        start = len(data) - max_bytes
        if data[start - 1 : start] != b"\n":  # the cut falls inside a line: skip to the next one
            newline = data.find(b"\n", start)
            start = newline + 1 if newline >= 0 else len(data)
        text = data[start:].decode(errors="ignore")
    lines = text.splitlines(keepends=True)
    return "".join(lines[-max_lines:])


def _already_exists(response: RayResponse) -> bool:
    # Ray 2.60 answers a duplicate submission id with HTTP 500 and a ValueError traceback.
    return response.status_code in (400, 409, 500) and "already exists" in response.text


@dataclass(frozen=True)
class Submission:
    """Result of :meth:`JobsAPI.submit`: the job, and whether this call created it."""

    job: JobInfo
    created: bool


class JobsAPI:
    """``/api/jobs`` of one head."""

    def __init__(self, http: RayHTTP) -> None:
        self._http = http

    async def submit(
        self,
        entrypoint: str,
        *,
        submission_id: str,
        runtime_env: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str] | None = None,
        entrypoint_num_cpus: float | None = None,
        entrypoint_num_gpus: float | None = None,
        entrypoint_memory: int | None = None,
        entrypoint_resources: Mapping[str, float] | None = None,
    ) -> Submission:
        """Submit a job, or return the existing job of that ``submission_id`` (idempotent)."""
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id}
        optional: dict[str, Any] = {
            "runtime_env": dict(runtime_env) if runtime_env is not None else None,
            "metadata": dict(metadata) if metadata is not None else None,
            "entrypoint_num_cpus": entrypoint_num_cpus,
            "entrypoint_num_gpus": entrypoint_num_gpus,
            "entrypoint_memory": entrypoint_memory,
            "entrypoint_resources": dict(entrypoint_resources) if entrypoint_resources else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        created = True
        try:
            await self._http.request(
                "POST", "/api/jobs/", json=body, final=_already_exists, timeout=SUBMIT_TIMEOUT,
                deadline_s=SUBMIT_DEADLINE_S,
            )  # fmt: skip
        except RayAPIError as exc:
            if "already exists" not in exc.body:
                raise
            created = False
        return Submission(job=await self.get(submission_id), created=created)

    async def get(self, submission_id: str) -> JobInfo:
        """The job's status; raises :class:`RayNotFound` when the head does not know it."""
        path = f"/api/jobs/{quote(submission_id, safe='')}"
        job: JobInfo = self._http.parsed(parse_job, await self._http.get_object(path), "GET", path)
        return job

    async def find(self, submission_id: str) -> JobInfo | None:
        """Like :meth:`get`, but None for an unknown job (e.g. after the head restarted)."""
        try:
            return await self.get(submission_id)
        except RayNotFound:
            return None

    async def list(self) -> list[JobInfo]:
        """Every submitted job on the head (drivers started outside the Jobs API are skipped)."""
        data = await self._http.get_json("/api/jobs/")
        jobs: list[JobInfo] = self._http.parsed(_parse_jobs, data, "GET", "/api/jobs/")
        return jobs

    async def logs(self, submission_id: str, *, max_bytes: int = LOGS_MAX_BYTES) -> str:
        """The job driver's whole log, refused (:class:`RayResponseTooLarge`) past ``max_bytes``.

        For people and tests; a controller polls :meth:`tail`, which is bounded however long the
        log grows.
        """
        path = f"/api/jobs/{quote(submission_id, safe='')}/logs"
        data = await self._http.get_object(path, max_bytes=max_bytes, max_values=None)  # one string
        return str(data.get("logs") or "")

    async def tail(
        self,
        submission_id: str,
        *,
        lines: int = DEFAULT_TAIL_LINES,
        max_bytes: int = DEFAULT_TAIL_BYTES,
        driver_node_id: str | None = None,
    ) -> str:
        """The last ``lines`` lines (at most ``max_bytes``) of the job driver's log; "" if none yet.

        Ray 2.60's ``/api/jobs/{id}/logs/tail`` is a websocket stream, so this reads the State API's
        ``/api/v0/logs/file?submission_id=..&node_id=..&lines=N``, which reads only the end of the
        driver log file. Bounded whatever the head does: the answer is streamed keeping only its
        last ``max_bytes`` (so a head that ignores ``lines``, or one enormous line, costs at most
        that much memory), within the call's deadline. It never falls back to the whole log: no
        driver node yet (job pending) or no log file yet gives "". ``driver_node_id`` (from
        :class:`JobInfo`) saves one request when the caller already has it.
        """
        lines = max(0, min(lines, MAX_TAIL_LINES))
        node_id = driver_node_id
        if node_id is None:
            node_id = (await self.get(submission_id)).driver_node_id
        if not node_id or not lines or max_bytes <= 0:
            return ""
        try:
            response = await self._http.request(
                "GET",
                "/api/v0/logs/file",
                params={"submission_id": submission_id, "node_id": node_id, "lines": lines},
                final=lambda _r: True,  # a 500 here means "no such file (yet)": not worth a retry
                max_bytes=max_bytes,
                tail=True,
            )
        except (RayAuthError, RayBadResponse):
            raise
        except RayAPIError:  # no log file (yet), or no State API on this head: nothing to show
            return ""
        return tail_text(response.text, max_lines=lines, max_bytes=max_bytes)

    async def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; True if it was running, False if it had already ended."""
        path = f"/api/jobs/{quote(submission_id, safe='')}/stop"
        data = self._http.decode(await self._http.request("POST", path), "POST", path)
        return bool(data.get("stopped")) if isinstance(data, Mapping) else False

    async def delete(self, submission_id: str) -> bool:
        """Forget a finished job on the head (Ray refuses to delete a running one)."""
        path = f"/api/jobs/{quote(submission_id, safe='')}"
        data = self._http.decode(await self._http.request("DELETE", path), "DELETE", path)
        return bool(data.get("deleted")) if isinstance(data, Mapping) else False
