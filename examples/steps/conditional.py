"""ConditionalStep: route support tickets; a failed refund resumes in the branch it chose."""

import uuid

from flujo import ConditionalStep, Flujo, step

outage = {"payments"}  # the payments API is down during the first run


def kind(ticket: str, context: object) -> str:
    if "refund" in ticket:
        return "refund"
    return "question" if ticket.endswith("?") else "other"


@step
def find_order(ticket: str) -> str:
    print("  find_order")
    return "order-1042"


@step
def refund(order: str) -> str:
    if "payments" in outage:
        raise ConnectionError("payments API unavailable")
    print(f"  refund {order}")
    return f"refunded {order}"


@step
def answer(ticket: str) -> str:
    return "answered from the FAQ"


@step
def escalate(ticket: str) -> str:
    return "sent to a human"


route = ConditionalStep(
    name="route",
    condition_callable=kind,
    branches={"refund": find_order >> refund, "question": answer},
    default_branch=escalate,
)
runner = Flujo(route)  # runs are stored in ./flujo_ops.db

for ticket in ("How do I reset my password?", "My screen is cracked"):
    print(f"{ticket!r}: {runner.run(ticket).output}")

run_id = f"ticket-{uuid.uuid4().hex[:8]}"
print("First run:")
first = runner.run("Please refund my order", run_id=run_id)
print(f"{first.status}: {first.error}")

outage.clear()
print("Resumed:")
result = runner.run("Please refund my order", run_id=run_id)
print(f"{result.status}: {result.output}")
