"""flujo's headline demo: a process is killed mid-run, and the run resumes by its id.

Run it with ``make demo`` (or ``python examples/demo.py``). It uses the embedded default
store, ``flujo_ops.db`` in the working directory:

1. a child process starts run ``order-<n>`` of a five-step pipeline and is killed (SIGKILL)
   as it enters the fourth step;
2. this process looks at what the store kept, then resumes the run by its ``run_id``: the
   three committed steps are skipped, the last two run, and the result is printed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from pydantic import Field

from flujo import Flujo, PipelineContext, step


class OrderContext(PipelineContext):
    """What the run knows about the order; checkpointed after every step."""

    order_id: str = ""
    total_cents: int = 0
    charged: bool = False
    tracking: str | None = None
    log: list[str] = Field(default_factory=list)


KILL_AT = os.environ.get("FLUJO_DEMO_KILL_AT", "")


def announce(name: str) -> None:
    if name == KILL_AT:
        print(f"    {name:<12} <- process killed here (SIGKILL)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    print(f"    {name:<12} ran in process {os.getpid()}", flush=True)


@step
async def fetch_order(order_id: str, *, context: OrderContext) -> dict[str, int]:
    announce("fetch_order")
    context.order_id = order_id
    context.log.append("fetched")
    return {"widgets": 3, "unit_cents": 1250}


@step
async def price(order: dict[str, int], *, context: OrderContext) -> int:
    announce("price")
    context.total_cents = order["widgets"] * order["unit_cents"]
    context.log.append("priced")
    return context.total_cents


@step
async def charge_card(total_cents: int, *, context: OrderContext) -> str:
    announce("charge_card")
    context.charged = True
    context.log.append(f"charged {total_cents} cents")
    return f"receipt-{context.order_id}"


@step
async def ship(receipt: str, *, context: OrderContext) -> str:
    announce("ship")
    context.tracking = f"TRACK-{context.order_id.upper()}"
    context.log.append("shipped")
    return context.tracking


@step
async def notify(tracking: str, *, context: OrderContext) -> str:
    announce("notify")
    context.log.append("notified")
    return f"Order {context.order_id}: {context.total_cents / 100:.2f} EUR charged, {tracking}"


pipeline = fetch_order >> price >> charge_card >> ship >> notify


def make_runner() -> Flujo[str, str, OrderContext]:
    # No state_backend: the embedded default, flujo_ops.db in the working directory.
    return Flujo(pipeline, context_model=OrderContext, pipeline_name="orders")


def child(run_id: str) -> None:
    make_runner().run(run_id.removeprefix("order-"), run_id=run_id)


def main() -> None:
    run_id = f"order-{int(time.time())}"
    print(f"1. A worker process starts run {run_id!r} and dies on entering 'ship':")
    env = {**os.environ, "FLUJO_DEMO_KILL_AT": "ship"}
    crashed = subprocess.run([sys.executable, __file__, "--child", run_id], env=env, check=False)
    print(f"   the worker exited with {crashed.returncode} (-9 is SIGKILL)\n")

    runner = make_runner()
    stored = asyncio.run(runner.state_backend.load_state(run_id))  # type: ignore[union-attr]
    assert stored is not None, "the run should have been checkpointed"
    done = stored["current_step_index"]
    print(f"2. What {os.path.basename(os.getcwd())}/flujo_ops.db kept of the run:")
    print(f"   status={stored['status']!r}, {done} of {len(pipeline)} steps committed,")
    print(f"   context log={stored['pipeline_context']['log']}\n")

    print(f"3. This process (pid {os.getpid()}) resumes the run by its run_id:")
    result = runner.run("ignored on resume", run_id=run_id)
    print()
    print("   step          outcome")
    for record in result.step_history:
        if record.index < done:
            outcome = "skipped: committed before the crash, not re-run"
        else:
            outcome = f"ran after the resume ({record.latency_s * 1e3:.2f} ms)"
        print(f"   {record.name:<13} {outcome}")
    print(f"\n   status:  {result.status}")
    print(f"   output:  {result.output}")
    print(f"   context: {result.final_pipeline_context.log}")  # type: ignore[union-attr]

    again = make_runner().run("ignored", run_id=run_id)
    print(f"\n4. Asking for {run_id!r} once more returns the stored result; nothing runs:")
    print(f"   status={again.status!r}, output={again.output!r}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
