"""ParallelStep merging: how the branches' context changes come back, and who wins a field."""

from collections.abc import Mapping

from pydantic import Field

from flujo import (
    BranchFailureStrategy,
    DynamicParallelRouterStep,
    Flujo,
    MergeStrategy,
    ParallelStep,
    PipelineContext,
    Step,
    step,
)


class Article(PipelineContext):
    title: str = ""
    summary: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


@step
async def editor(text: str, *, context: Article) -> str:
    context.title = "Durable workflows"
    context.summary = "Steps that survive crashes."
    context.tags["tone"] = "plain"
    return "edited"


@step
async def marketer(text: str, *, context: Article) -> str:
    context.summary = "The best workflows ever!"
    context.tags["audience"] = "developers"
    return "pitched"


@step
async def translator(text: str) -> str:
    raise ConnectionError("translation service unavailable")


def show(label: str, parallel: Step) -> None:
    result = Flujo(parallel, context_model=Article, persist_state=False).run("draft")
    if not result.success:
        print(f"{label}: {result.error}")
        return
    article = result.final_pipeline_context
    print(f"{label}: output={result.output}")
    print(f"    title={article.title!r} summary={article.summary!r} tags={article.tags}")


both = {"editor": editor, "marketer": marketer}

# Both branches changed `summary`: a conflict, unless field_mapping settles it.
show("CONTEXT_UPDATE", ParallelStep("write", both))
show("field_mapping", ParallelStep("write", both, field_mapping={"marketer": ["tags"]}))
show("OVERWRITE", ParallelStep("write", both, merge_strategy=MergeStrategy.OVERWRITE))
show("NO_MERGE", ParallelStep("write", both, merge_strategy=MergeStrategy.NO_MERGE))


def keep_longest(context: Article, branches: Mapping[str, Article]) -> None:
    context.summary = max((b.summary for b in branches.values()), key=len)


show("callable", ParallelStep("write", both, merge_strategy=keep_longest))

# A failing branch fails the step (PROPAGATE), or is left out (IGNORE).
with_translator = {"editor": editor, "translator": translator}
show("PROPAGATE", ParallelStep("write", with_translator))
show(
    "IGNORE",
    ParallelStep("write", with_translator, on_branch_failure=BranchFailureStrategy.IGNORE),
)


# A router picks the branches per run: a name or a list of names.
def pick(text: str, context: Article) -> list[str]:
    return ["editor"] if text == "draft" else ["editor", "marketer"]


show("router", DynamicParallelRouterStep("write", router_agent=pick, branches=both))
