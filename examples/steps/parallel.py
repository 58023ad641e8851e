"""ParallelStep: look up a product three ways at once; a failed branch re-runs alone."""

import uuid

from pydantic import Field

from flujo import Flujo, ParallelStep, PipelineContext, step

outage = {"reviews"}  # the reviews service is down during the first run
ran: list[str] = []  # which branches ran, in each run


class Product(PipelineContext):
    price_cents: int | None = None
    in_stock: int | None = None
    sources: dict[str, str] = Field(default_factory=dict)


@step
async def price(sku: str, *, context: Product) -> int:
    ran.append("price")
    context.price_cents = 1999
    context.sources["price"] = "pricing-api"
    return 1999


@step
async def stock(sku: str, *, context: Product) -> int:
    ran.append("stock")
    context.in_stock = 12
    context.sources["stock"] = "warehouse"
    return 12


@step
async def reviews(sku: str, *, context: Product) -> list[str]:
    ran.append("reviews")
    if "reviews" in outage:
        raise ConnectionError("reviews service unavailable")
    context.sources["reviews"] = "reviews-api"
    return ["sturdy", "fast delivery"]


lookup = ParallelStep(name="lookup", branches={"price": price, "stock": stock, "reviews": reviews})
runner = Flujo(lookup, context_model=Product)  # runs are stored in ./flujo_ops.db
run_id = f"product-{uuid.uuid4().hex[:8]}"

first = runner.run("sku-7", run_id=run_id)
print(f"First run ran {sorted(ran)}: {first.status}: {first.error}")

outage.clear()
ran.clear()
result = runner.run("sku-7", run_id=run_id)
print(f"Resumed run ran {ran}: {result.status}")
print(f"output:  {result.output}")
context = result.final_pipeline_context
print(f"context: price_cents={context.price_cents} in_stock={context.in_stock}")
print(f"         sources={context.sources}")
