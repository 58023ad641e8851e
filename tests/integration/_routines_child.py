"""Child process of the routines crash tests: runs jobs that SIGKILL themselves.

Run as ``python _routines_child.py '<json config>'``. Config: ``backend`` (``"sqlite"`` or
``"postgres"``), ``store`` (the database file, or the DSN), ``schema`` (Postgres, migrated
already), ``flow`` (``"chain"`` or ``"fanin"``), ``scenarios``: a list of ``{"job_id",
"effects", "kill": [routine id, point]}``.

This process imports flujo once and then forks one process per scenario (it has started no
thread and opened no connection, so the fork is clean); each forked process builds the flow and
a Runtime on its own store connection, runs its job, and dies with SIGKILL at its kill point.
At most ``PARALLEL`` scenarios run at once. Prints one JSON line: job id -> how its process
ended (``"killed"`` for SIGKILL, else the exit code or signal).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

from _routines_flows import FLOWS, KILL, KillingPostgres, KillingSQLite

from flujo.routines import FlowRegistry, Runtime

PARALLEL = 8


def run_scenario(config: dict[str, Any], scenario: dict[str, Any]) -> None:
    """In the forked process: run the job until the kill point kills us."""
    KILL["routine"], KILL["point"] = scenario["kill"]
    build, _, entry = FLOWS[config["flow"]]
    registry = FlowRegistry()
    registry.register_by_name(config["flow"], build(scenario["effects"]))
    if config["backend"] == "sqlite":
        # Up to PARALLEL processes write one file at once, on a machine that may be busy:
        # a long busy timeout, so that waiting for the others never fails a scenario.
        backend: Any = KillingSQLite(config["store"], busy_timeout_s=60.0)
    else:
        backend = KillingPostgres(config["store"], schema=config["schema"], pool_min=0, pool_max=2)
    runtime = Runtime(thread_pool_size=4, state_backend=backend, registry=registry)
    runtime.exec(config["flow"], entry, job_id=scenario["job_id"])
    os._exit(3)  # the kill point was never reached


def ended(status: int) -> str | int:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main() -> None:
    config = json.loads(sys.argv[1])
    outcomes: dict[str, str | int] = {}
    running: dict[int, str] = {}
    pending = list(config["scenarios"])
    while pending or running:
        while pending and len(running) < PARALLEL:
            scenario = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the forked process never returns
                try:
                    run_scenario(config, scenario)
                except BaseException:
                    traceback.print_exc()
                    sys.stderr.flush()
                os._exit(4)
            running[pid] = scenario["job_id"]
        pid, status = os.wait()
        outcomes[running.pop(pid)] = ended(status)
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
