"""Nesting: a loop inside a map, built with Step.* factories; progress streams as it happens."""

import asyncio
import uuid

from flujo import Flujo, Step, StepResult, step

outage = {"photo.png"}  # compressing this image fails during the first run


@step
def compress(image: dict[str, int | str]) -> dict[str, int | str]:
    name, kb = image["name"], int(image["kb"])
    if name in outage and kb < 300:
        raise OSError(f"cannot write {name}")
    return {"name": name, "kb": kb // 2}


shrink = Step.loop_until(
    "shrink", compress, lambda image, context: int(image["kb"]) <= 100, max_loops=5
)
total_kb = Step.from_callable(lambda images: sum(i["kb"] for i in images), name="total_kb")
pipeline = Step.map_over("each_image", shrink) >> total_kb
runner = Flujo(pipeline)  # runs are stored in ./flujo_ops.db
images = [{"name": "logo.svg", "kb": 180}, {"name": "photo.png", "kb": 900}]


def describe(item: StepResult) -> str:
    where = "top level" if item.path is None else f"path {list(item.path)}"
    return f"{item.name:<10} {where:<20} {'ok' if item.success else 'FAILED'}"


async def stream(run_id: str) -> None:
    async for item in runner.run_stream(images, run_id=run_id):
        if isinstance(item, StepResult):  # sub-steps as they finish, then their step
            print(f"  {describe(item)}")
        else:  # last, the PipelineResult
            print(f"-> {item.status}, output {item.output}")


run_id = f"images-{uuid.uuid4().hex[:8]}"
print("First run, streamed:")
asyncio.run(stream(run_id))
outage.clear()
print("Resumed, streamed (only what had not finished runs):")
asyncio.run(stream(run_id))


def tree(items: list[StepResult], depth: int = 0) -> None:
    for item in items:
        print(f"{'  ' * depth}{describe(item)}")
        tree(item.step_history, depth + 1)


print("History of the stored run:")
tree(runner.run(images, run_id=run_id).step_history)
