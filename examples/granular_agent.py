"""GranularStep: an agent loop committed turn by turn; a crash mid-turn repeats nothing done."""

import sqlite3
import uuid
from collections import Counter
from contextlib import closing
from typing import Any

from flujo import AgentTurn, Flujo, Step, ToolCall

crash_in = {"issue_refund"}  # the process dies inside this tool during the first run
asked: Counter[int] = Counter()  # model turns asked, by turn
called: Counter[str] = Counter()  # tool calls made, by tool


class ProcessKilled(BaseException):
    """Stands in for the process dying: a BaseException, so nothing on the way catches it."""


def lookup_order(order_id: str) -> dict[str, Any]:
    called["lookup_order"] += 1
    print(f"    lookup_order({order_id!r})")
    return {"order_id": order_id, "total": 30.0, "status": "delivered"}


def check_policy(order_id: str) -> str:
    called["check_policy"] += 1
    print(f"    check_policy({order_id!r})")
    return "refundable"


def ledger() -> sqlite3.Connection:
    """The payments database: one row per refund, keyed by the tool call's idempotency key."""
    db = sqlite3.connect("payments.db")
    db.execute(
        "CREATE TABLE IF NOT EXISTS refunds (key TEXT PRIMARY KEY, order_id TEXT, amount REAL)"
    )
    return db


def issue_refund(order_id: str, amount: float, idempotency_key: str) -> dict[str, Any]:
    """Pays back once per key: a second call with the same key finds the row and stops."""
    called["issue_refund"] += 1
    with closing(ledger()) as db, db:  # `with db`: one transaction
        inserted = db.execute(
            "INSERT OR IGNORE INTO refunds VALUES (?, ?, ?)", (idempotency_key, order_id, amount)
        ).rowcount
    turn_and_call = idempotency_key.split(":", 1)[1]  # after the run id: step path, turn, call
    what = "refund written" if inserted else "refund already there: not paid twice"
    print(f"    issue_refund({order_id!r}, {amount}) key <run>:{turn_and_call}: {what}")
    if "issue_refund" in crash_in:
        raise ProcessKilled("killed after the refund was written, before the tool returned")
    return {"order_id": order_id, "refunded": amount}


class SupportAgent:
    """A scripted model, offline: it decides from the transcript, as a real model would."""

    tools = {
        "lookup_order": lookup_order,
        "check_policy": check_policy,
        "issue_refund": issue_refund,
    }

    async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
        turn = sum(message["role"] == "assistant" for message in transcript)
        asked[turn] += 1
        print(f"  model turn {turn}")
        if turn == 0:
            order_id = transcript[0]["content"]
            return AgentTurn(
                "Looking up the order.", [ToolCall("lookup_order", {"order_id": order_id})]
            )
        if turn == 1:
            order = transcript[-1]["content"]
            return AgentTurn(
                "Checking the policy and refunding.",
                [
                    ToolCall("check_policy", {"order_id": order["order_id"]}),
                    ToolCall(
                        "issue_refund", {"order_id": order["order_id"], "amount": order["total"]}
                    ),
                ],
            )
        refund = transcript[-1]["content"]
        return AgentTurn(f"Refunded {refund['refunded']:.2f} EUR for order {refund['order_id']}.")


support = Step.granular("support", SupportAgent(), max_turns=5, enforce_idempotency=True)
runner = Flujo(support)  # runs are stored in ./flujo_ops.db
run_id = f"ticket-{uuid.uuid4().hex[:8]}"

print("First run:")
try:
    runner.run("o-17", run_id=run_id)
except ProcessKilled as exc:
    print(f"  ** {exc}")

crash_in.clear()
print("Resumed:")
result = runner.run("o-17", run_id=run_id)
print(f"{result.status}: {result.output}")

print(f"model turns asked: {dict(asked)}")
print(f"tool calls made:   {dict(called)}")
with closing(ledger()) as db:
    (refunds,) = db.execute(
        "SELECT COUNT(*) FROM refunds WHERE key LIKE ?", (f"{run_id}:%",)
    ).fetchone()
print(f"refunds written:   {refunds}")
print("committed turns:")
for turn in result.step_history[0].step_history:
    print(f"  {turn.name}: {[observation['name'] for observation in turn.output]}")
