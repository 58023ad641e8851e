"""LoopStep: tighten a headline until it fits; a failure in iteration 3 resumes in iteration 3."""

import uuid

from pydantic import Field

from flujo import Flujo, LoopStep, PipelineContext, step

FILLER = ("really", "very", "quite", "just")
outage = {"review"}  # the review service is down during the first run


class Headline(PipelineContext):
    drafts: list[str] = Field(default_factory=list)


@step
def tighten(text: str, *, context: Headline) -> str:
    words = text.split()
    for filler in FILLER:
        if filler in words:
            words.remove(filler)
            break
    shorter = " ".join(words)
    context.drafts.append(shorter)
    print(f"  iteration {len(context.drafts)}: tighten -> {shorter!r}")
    return shorter


@step
def review(text: str, *, context: Headline) -> str:
    if "review" in outage and len(context.drafts) == 3:
        raise ConnectionError("review service unavailable")
    print(f"  iteration {len(context.drafts)}: review  -> {len(text)} characters")
    return text


fit = LoopStep(
    name="fit_headline",
    loop_body_pipeline=tighten >> review,
    exit_condition_callable=lambda text, context: len(text) <= 16,
    max_loops=6,
)
runner = Flujo(fit, context_model=Headline)  # runs are stored in ./flujo_ops.db
run_id = f"headline-{uuid.uuid4().hex[:8]}"

print("First run:")
first = runner.run("Flujo is really very quite just durable", run_id=run_id)
print(f"{first.status}: {first.error}")

outage.clear()  # the service is back: resume the run by its id
print("Resumed:")
result = runner.run("ignored on resume", run_id=run_id)
print(f"{result.status}: {result.output!r}")
print("drafts:", *result.final_pipeline_context.drafts, sep="\n  ")
