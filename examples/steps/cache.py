"""CacheStep: memoize an expensive step in a SQLite cache that outlives the runner."""

from flujo import Flujo, PipelineContext, SQLiteCache, Step, step
from flujo.state import SQLiteBackend


class Embedding(PipelineContext):
    model: str = "small"


@step
def embed(text: str, *, context: Embedding) -> list[float]:
    print(f"  embed {text!r} with {context.model}")
    return [float(len(text)), float(text.count(" "))]


def embed_texts(texts: list[str], model: str) -> None:
    store = SQLiteBackend("flujo_ops.db")  # the runs' store; the cache shares its file
    cached = Step.cached(embed, SQLiteCache(store), context_fields=["model"])
    runner = Flujo(
        Step.map_over("embed_all", cached),
        context_model=Embedding,
        initial_context_data={"model": model},
        state_backend=store,
    )
    result = runner.run(texts)
    for item in result.step_history[0].step_history:  # one record per text
        print(f"  {item.output} cache_hit={item.cache_hit}")


print("First runner:")
embed_texts(["hello world", "durable steps", "hello world"], model="small")
print("A new runner, as another process would be:")
embed_texts(["durable steps", "cache me"], model="small")
print("Another model (a context field of the key):")
embed_texts(["durable steps"], model="large")
