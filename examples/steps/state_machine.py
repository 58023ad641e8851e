"""StateMachineStep: Draft -> Critique -> Edit -> Approval; a failure in Edit resumes in Edit."""

import uuid

from flujo import Flujo, PipelineContext, StateMachineStep, Transition, step

outage = {"edit"}  # the editing model is down during the first run


class Review(PipelineContext):
    edits: int = 0


@step
def draft(topic: str) -> Transition:
    print("  draft")
    return Transition("critique", f"Notes on {topic}")


@step
def critique(text: str, *, context: Review) -> Transition:
    verdict = "approval" if context.edits >= 2 else "edit"
    print(f"  critique -> {verdict}")
    return Transition(verdict, text)


@step
def edit(text: str, *, context: Review) -> Transition:
    if "edit" in outage and context.edits == 1:
        raise TimeoutError("editing model timed out")
    context.edits += 1
    print(f"  edit {context.edits}")
    return Transition("critique", f"{text}, edited")


@step
def approve(text: str) -> str:
    print("  approval")
    return f"{text}. Approved."


review = StateMachineStep(
    name="review",
    states={"draft": draft, "critique": critique, "edit": edit, "approval": approve},
    start_state="draft",
    end_states=["approval"],
    max_transitions=10,
)
runner = Flujo(review, context_model=Review)  # runs are stored in ./flujo_ops.db
run_id = f"review-{uuid.uuid4().hex[:8]}"

print("First run:")
first = runner.run("durable state machines", run_id=run_id)
print(f"{first.status}: {first.error}")

outage.clear()
print("Resumed:")
result = runner.run("ignored on resume", run_id=run_id)
print(f"{result.status}: {result.output!r}")
# Each state's step ran at path (0, turn, state, step index); the history has all of them.
states = [record.path[2] for record in result.step_history[-1].step_history]
print(f"states visited: {states}")
