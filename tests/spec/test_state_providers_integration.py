import pytest
from flujo import Flujo, Step
from flujo.domain.models import PipelineContext, ContextReference
from flujo.domain.interfaces import StateProvider

class MockProvider(StateProvider):
    def __init__(self):
        self._data = {}
    
    async def load(self, key: str):
        return self._data.get(key, [])
    
    async def save(self, key: str, data):
        self._data[key] = data

class TestContext(PipelineContext):
    ref: ContextReference[list] = ContextReference(
        provider_id="test_provider",
        key="test_key"
    )

@pytest.mark.asyncio
async def test_state_providers_parameter_accepted():
    """Verify Flujo accepts state_providers parameter."""
    provider = MockProvider()
    step = Step.from_callable(lambda x: x, name="test")
    
    runner = Flujo(
        pipeline=step,
        context_model=TestContext,
        state_providers={"test_provider": provider}
    )
    
    assert runner is not None

@pytest.mark.asyncio
async def test_state_providers_hydration():
    """Verify ContextReference is hydrated from state_providers."""
    provider = MockProvider()
    provider._data["test_key"] = [1, 2, 3]
    
    async def check_context(data: str, *, context: TestContext) -> str:
        assert context.ref.get() == [1, 2, 3]
        return "ok"
    
    step = Step.from_callable(check_context, name="check")
    runner = Flujo(
        pipeline=step,
        context_model=TestContext,
        state_providers={"test_provider": provider}
    )
    
    result = await runner.run_async("test")
    assert result.success

@pytest.mark.asyncio
async def test_state_providers_persistence():
    """Verify ContextReference changes are persisted."""
    provider = MockProvider()
    
    async def modify_context(data: str, *, context: TestContext) -> str:
        current = context.ref.get()
        current.append(4)
        context.ref.set(current)
        return "modified"
    
    step = Step.from_callable(modify_context, name="modify")
    runner = Flujo(
        pipeline=step,
        context_model=TestContext,
        state_providers={"test_provider": provider}
    )
    
    # Initialize data
    provider._data["test_key"] = [1, 2, 3]
    
    await runner.run_async("test")
    
    # Verify persistence
    assert provider._data["test_key"] == [1, 2, 3, 4]

@pytest.mark.asyncio
async def test_state_providers_backward_compatibility():
    """Verify existing code without state_providers still works."""
    step = Step.from_callable(lambda x: x, name="test")
    
    # Should work without state_providers
    runner = Flujo(
        pipeline=step,
        context_model=PipelineContext
    )
    
    result = await runner.run_async("test")
    assert result.success
