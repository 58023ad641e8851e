"""Human in the loop: a run pauses for an editor's approval; another process answers it."""

import asyncio
import uuid

from pydantic import BaseModel

from flujo import (
    Flujo,
    HumanInTheLoopStep,
    PipelineContext,
    PipelineRegistry,
    TaskClient,
    step,
)
from flujo.exceptions import HumanInputError, StateConflictError
from flujo.state import SQLiteBackend


class Post(PipelineContext):
    title: str = ""


class Review(BaseModel):
    approved: bool
    comment: str = ""


@step
def draft(topic: str, *, context: Post) -> str:
    context.title = f"Five reasons to try {topic}"
    print(f"  draft: {context.title!r}")
    return context.title


approve = HumanInTheLoopStep(
    "approve",
    message_for_user=lambda title, context: f"Publish {title!r}? Send {{approved, comment}}.",
    input_schema=Review,
)


@step
def publish(review: Review, *, context: Post) -> str:
    print(f"  publish: approved={review.approved}, comment={review.comment!r}")
    return f"published {context.title!r}" if review.approved else "sent back to the author"


registry = PipelineRegistry()
registry.register(draft >> approve >> publish, "blog_post", "1.0.0", context_model=Post)


async def web_request(topic: str) -> str:
    """Process 1: a request starts the run; it pauses at the approval and returns."""
    runner = Flujo(
        registry=registry,
        pipeline_name="blog_post",
        context_model=Post,
        state_backend=SQLiteBackend("flujo_ops.db"),
    )
    async with runner:
        result = await runner.run_async(
            topic, run_id=f"post-{uuid.uuid4().hex[:8]}", metadata={"author": "ana"}
        )
    print(f"status: {result.status}, at step {result.failed_step!r}")
    return result.run_id


async def editor_dashboard(run_id: str) -> None:
    """Process 2: a dashboard lists what waits for a person, and answers from a webhook."""
    async with TaskClient("sqlite:///flujo_ops.db", registry=registry) as client:
        for task in await client.list_tasks(status="paused", metadata_filter={"author": "ana"}):
            print(f"waiting: step {task.error['step']!r} of {task.pipeline_name!r}")
            print(f"  question: {task.question}")

        try:
            await client.resume_task(run_id, {"approved": "sure"})
        except HumanInputError as exc:
            error = exc.errors[0]
            print(f"rejected: {error['loc'][0]}: {error['msg']}")
        print(f"status after the rejected answer: {(await client.get_task(run_id)).status}")

        result = await client.resume_task(run_id, {"approved": True, "comment": "ship it"})
        print(f"status: {result.status}, output: {result.output!r}")
        print(f"history: {[r.name for r in result.step_history]}")


async def late_click(run_id: str) -> None:
    """Another process answers the same question again: a conflict, and nothing runs."""
    runner = Flujo(
        registry=registry,
        pipeline_name="blog_post",
        context_model=Post,
        state_backend=SQLiteBackend("flujo_ops.db"),
    )
    async with runner:
        try:
            await runner.resume_async(run_id, {"approved": False})
        except StateConflictError:
            print("second answer: StateConflictError (the question was answered already)")


print("Process 1 starts the run:")
paused_run = asyncio.run(web_request("sourdough"))
print("Process 2 answers it:")
asyncio.run(editor_dashboard(paused_run))
print("Process 3 answers too late:")
asyncio.run(late_click(paused_run))
