"""Workers: processes that run queued runs and background tasks from a shared store.

``flujo worker --queue default --concurrency 8 --app myapp.pipelines:registry`` (or
:class:`Worker` in code) claims runs from the store (Postgres, or SQLite on one machine), runs
them as any run is run (a checkpoint after every step), and releases them. Each claim is a
*lease*: the worker renews it every ``heartbeat_s`` seconds; a worker that dies stops renewing,
and once its leases expire another worker claims the runs and resumes them from their last
checkpoint. A claim moves the run's version on, so a worker that lost a run (paused too long, cut
off) can no longer checkpoint it: no step is committed twice.

Postgres wakes idle workers with ``LISTEN/NOTIFY`` when work is queued; they also wake when the
earliest foreign lease expires (to take over a dead worker's runs). On SQLite, workers of other
processes are not notified and poll (every ``poll_s``).

Cancellation (``TaskClient.cancel``) reaches the worker through a notification or its next
lease renewal; the run stops at its next step boundary, as ``cancelled``. ``SIGTERM`` (or
:meth:`Worker.stop`) stops claiming, lets running runs finish for up to ``grace_s`` seconds, then
cuts them off and hands them back to the queue, from their last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flujo.domain.events import HookEvent, PostStep
from flujo.exceptions import CancelRequested, ConfigurationError, StateConflictError
from flujo.state.backends.base import Claim, validate_queue_name

if TYPE_CHECKING:
    from flujo.application.runner import Flujo
    from flujo.domain.models import AppResources
    from flujo.domain.pipeline import PipelineRegistry
    from flujo.domain.usage import UsageLimits
    from flujo.state.backends.base import StateBackend

__all__ = ["Worker"]

logger = logging.getLogger("flujo.worker")

#: How long after a foreign lease's expiry an idle worker looks again (store clock).
_TAKEOVER_MARGIN_S = 0.05


class Worker:
    """Runs queued runs (and background tasks) of the pipelines in ``registry``.

    >>> worker = Worker(registry, state_backend=backend, queues=["default"], concurrency=8)
    >>> await worker.run()            # until worker.stop() or SIGTERM     # doctest: +SKIP

    Only runs of pipeline versions the registry has are claimed; the others stay queued for a
    worker that has them. ``lease_s`` and ``heartbeat_s`` default to the settings
    ``worker_lease_s`` (30) and ``worker_heartbeat_s`` (10).
    """

    def __init__(
        self,
        registry: PipelineRegistry,
        *,
        state_backend: StateBackend | None = None,
        queues: Sequence[str] = ("default",),
        concurrency: int = 8,
        lease_s: float | None = None,
        heartbeat_s: float | None = None,
        grace_s: float = 30.0,
        poll_s: float = 0.5,
        worker_id: str | None = None,
        resources: AppResources | None = None,
        state_providers: Mapping[str, Any] | None = None,
        usage_limits: UsageLimits | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigurationError(f"concurrency must be an int >= 1, got {concurrency!r}")
        if not queues:
            raise ConfigurationError("a worker needs at least one queue")
        self.queues = [validate_queue_name(queue) for queue in queues]
        if lease_s is None or heartbeat_s is None:
            from flujo.config import load_settings  # noqa: PLC0415 - settings on demand

            settings = load_settings()
            lease_s = settings.worker_lease_s if lease_s is None else lease_s
            heartbeat_s = settings.worker_heartbeat_s if heartbeat_s is None else heartbeat_s
        if not 0 < heartbeat_s < lease_s:
            raise ConfigurationError(
                f"heartbeat_s ({heartbeat_s}) must be above 0 and below lease_s ({lease_s})"
            )
        if state_backend is None:
            from flujo.config import configured_backend  # noqa: PLC0415

            state_backend = configured_backend()
        if not state_backend.supports_queues:
            raise ConfigurationError(
                f"workers need a store that queues runs (SQLite or Postgres), got "
                f"{type(state_backend).__name__}"
            )
        self.registry = registry
        self.backend = state_backend
        self.concurrency = concurrency
        self.lease_s = float(lease_s)
        self.heartbeat_s = float(heartbeat_s)
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.resources = resources
        self.state_providers = dict(state_providers or {})
        self.usage_limits = usage_limits
        self._runners: dict[tuple[str, str], Flujo[Any, Any, Any]] = {}
        self._active: dict[str, asyncio.Task[None]] = {}
        self._cancel: set[str] = set()
        self._finishing: set[str] = set()
        self._stopping: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self.completed = 0
        """How many runs this worker finished (any final status)."""

    # -- the public face ---------------------------------------------------------------------

    @property
    def pipelines(self) -> list[str]:
        """The pipeline versions this worker runs, as ``"name@version"``."""
        return [
            f"{name}@{version}"
            for name in self.registry.names()
            for version in self.registry.versions(name)
        ]

    @property
    def active(self) -> list[str]:
        """The runs this worker is running now."""
        return list(self._active)

    def stop(self) -> None:
        """Stop gracefully: claim nothing more, let running runs finish (``grace_s``)."""
        if self._stopping is not None:
            self._stopping.set()

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Claim and run until :meth:`stop` (or SIGTERM/SIGINT, with
        ``install_signal_handlers``)."""
        self._stopping = asyncio.Event()
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        await self.backend.register_worker(self.worker_id, self._info())
        heartbeat = asyncio.ensure_future(self._heartbeat())
        logger.info(
            "worker %s serving queues %s with pipelines %s (concurrency %d)",
            self.worker_id,
            self.queues,
            self.pipelines,
            self.concurrency,
        )
        try:
            await self._claim_loop()
        finally:
            await self._shut_down()
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.backend.remove_worker(self.worker_id)
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            logger.info("worker %s stopped", self.worker_id)

    # -- claiming ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self._stopping is not None
        assert self._changed is not None
        stopping, changed = self._stopping, self._changed
        pipelines = self.pipelines
        while not stopping.is_set():
            free = self.concurrency - len(self._active)
            claimed: list[Claim] = []
            if free > 0:
                claimed = await self.backend.claim_runs(
                    worker_id=self.worker_id,
                    queues=self.queues,
                    limit=free,
                    lease_s=self.lease_s,
                    pipelines=pipelines,
                    exclude=list(self._active),
                )
                for claim in claimed:
                    self._start(claim)
            if claimed and len(claimed) == free:
                continue  # full: wait below for a run to finish
            if claimed:
                continue  # there may be more right away
            await self._idle(free > 0)
            if stopping.is_set():
                break
            changed.clear()

    async def _idle(self, can_take_more: bool) -> None:
        """Wait for a reason to claim again: a notification, a run finishing, a foreign
        lease expiring, a stop; never longer than a heartbeat."""
        assert self._stopping is not None
        assert self._changed is not None
        timeout = self.heartbeat_s
        if can_take_more:
            expiry = await self.backend.next_lease_expiry(self.queues)
            if expiry is not None:
                wait = expiry - await self.backend.store_time() + _TAKEOVER_MARGIN_S
                # An expiry already past is one the claim just passed over (this worker's own
                # run, a pipeline it lacks, a full queue): look again soon, but do not spin.
                timeout = min(timeout, wait if wait > 0 else self.poll_s)
            if not getattr(self.backend, "notifies_other_processes", False):
                timeout = min(timeout, self.poll_s)
        waits = {
            asyncio.ensure_future(self.backend.wait_for_work(timeout)),
            asyncio.ensure_future(self._changed.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        }
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            # A wait may have finished while being cancelled: its cancellations still count.
            for result in await asyncio.gather(*waits, return_exceptions=True):
                if isinstance(result, set):
                    self._note_cancelled(result)

    def _note_cancelled(self, run_ids: set[str]) -> None:
        self._cancel.update(run_id for run_id in run_ids if run_id in self._active)

    # -- running -----------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        task = asyncio.ensure_future(self._work(claim))
        self._active[claim.run_id] = task

    async def _work(self, claim: Claim) -> None:
        run_id = claim.run_id
        release = True
        try:
            runner = self._runner(claim.pipeline_name, claim.pipeline_version)
            result = await runner.run_async(None, run_id=run_id)
            logger.debug("worker %s: run %s %s", self.worker_id, run_id, result.status)
        except StateConflictError:
            # Another worker took the run over (this one's lease had expired): it goes on there.
            logger.warning("worker %s lost run %s to another worker", self.worker_id, run_id)
            release = False
        except asyncio.CancelledError:
            raise  # cut off (shutdown, or the lease was lost): handed back below
        except Exception:
            logger.exception("worker %s: run %s stopped with an error", self.worker_id, run_id)
        finally:
            # The run is over here: renewals leave it alone, and its slot is freed even if
            # this task is cancelled while the release is under way.
            self._finishing.add(run_id)
            try:
                if release:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._release(run_id))
            finally:
                self._active.pop(run_id, None)
                self._cancel.discard(run_id)
                self._finishing.discard(run_id)
                self.completed += 1
                if self._changed is not None:
                    self._changed.set()

    async def _release(self, run_id: str) -> None:
        await self.backend.release_runs(worker_id=self.worker_id, run_ids=[run_id])

    def _runner(self, name: str, version: str) -> Flujo[Any, Any, Any]:
        runner = self._runners.get((name, version))
        if runner is None:
            from flujo.application.runner import Flujo  # noqa: PLC0415

            runner = Flujo(
                registry=self.registry,
                pipeline_name=name,
                pipeline_version=version,
                context_model=self.registry.get_context_model(name, version),
                state_backend=self.backend,
                resources=self.resources,
                hooks=[self._cancel_hook],
                state_providers=self.state_providers or None,
                usage_limits=self.usage_limits,
                background_mode="queue",
            )
            self._runners[(name, version)] = runner
        return runner

    def _cancel_hook(self, event: HookEvent) -> None:
        """After each step: stop a run whose cancellation was requested (status cancelled)."""
        if isinstance(event, PostStep) and event.run_id in self._cancel:
            raise CancelRequested

    # -- leases ------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._renew()
            except Exception:
                logger.exception("worker %s could not renew its leases", self.worker_id)

    async def _renew(self) -> None:
        held_ids = list(self._active)
        held = await self.backend.renew_leases(
            worker_id=self.worker_id, run_ids=held_ids, lease_s=self.lease_s
        )
        for run_id in held_ids:
            task = self._active.get(run_id)
            if task is None or task.done() or run_id in self._finishing:
                continue
            if run_id not in held:
                # Taken over after this worker's lease expired (or finished by a checkpoint a
                # moment ago): a run still going here stops (its next checkpoint is refused).
                logger.warning("worker %s no longer holds run %s", self.worker_id, run_id)
                task.cancel()
            elif held[run_id]:
                self._cancel.add(run_id)
        await self.backend.register_worker(self.worker_id, self._info())

    async def _shut_down(self) -> None:
        """Let running runs finish for ``grace_s``, then cut them off and hand them back."""
        tasks = list(self._active.values())
        if not tasks:
            return
        logger.info(
            "worker %s stopping: waiting up to %gs for %d run(s)",
            self.worker_id,
            self.grace_s,
            len(tasks),
        )
        _, late = await asyncio.wait(tasks, timeout=self.grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for queue in self.queues:  # what was handed back is there for the other workers
            with contextlib.suppress(Exception):
                await self.backend.notify_work(queue)

    def _info(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": self.queues,
            "pipelines": self.pipelines,
            "concurrency": self.concurrency,
            "lease_s": self.lease_s,
            "heartbeat_s": self.heartbeat_s,
            "active": len(self._active),
        }
