"""MapStep: count the words of five pages; a failure at page 4 resumes at page 4."""

import uuid

from flujo import Flujo, MapStep, step

PAGES = {
    "intro": "flujo runs durable workflows",
    "install": "pip install flujo",
    "steps": "a step is one unit of work",
    "faq": "what happens when a process dies",
    "changelog": "first release",
}
outage = {"faq"}  # this page cannot be fetched during the first run


@step
def fetch(name: str) -> str:
    if name in outage:
        raise ConnectionError(f"cannot fetch {name!r}")
    print(f"  fetch {name}")
    return PAGES[name]


@step
def count_words(text: str) -> int:
    return len(text.split())


@step
def total(counts: list[int]) -> dict[str, int]:
    return {"pages": len(counts), "words": sum(counts)}


count_pages = MapStep(name="count_pages", item_pipeline=fetch >> count_words, max_concurrency=1)
pipeline = count_pages >> total
runner = Flujo(pipeline)  # runs are stored in ./flujo_ops.db
run_id = f"pages-{uuid.uuid4().hex[:8]}"

print("First run:")
first = runner.run(list(PAGES), run_id=run_id)
print(f"{first.status}: {first.error}")

outage.clear()
print("Resumed:")
result = runner.run([], run_id=run_id)  # the stored input is used, not this one
print(f"{result.status}: {result.output}")
for record in result.step_history:  # the failed attempt of the first run is kept
    print(f"  {record.name}: success={record.success}, output={record.output}")
