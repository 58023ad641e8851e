from pathlib import Path
from flujo import Flujo, Step, PipelineRegistry, step
from flujo.state import SQLiteBackend

@step
async def greet(name: str) -> str:
    return f"Hello, {name}!"

pipeline = greet
registry = PipelineRegistry()
registry.register(pipeline, "hello", "1.0.0")
backend = SQLiteBackend(Path("workflow.db"))

runner = Flujo(
    registry=registry,
    pipeline_name="hello",
    pipeline_version="1.0.0",
    state_backend=backend,
)
result = runner.run("world", run_id="run1")

# To resume later just create a new runner with the same ``run_id``
runner2 = Flujo(
    registry=registry,
    pipeline_name="hello",
    pipeline_version="1.0.0",
    state_backend=backend,
)
resumed = runner2.run("world", run_id="run1")
