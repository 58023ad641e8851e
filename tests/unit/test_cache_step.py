"""CacheStep: memoize a step on its identity, its input and declared context fields."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flujo import (
    CacheBackend,
    CacheStep,
    Flujo,
    InMemoryCache,
    PipelineContext,
    PipelineResult,
    PostgresCache,
    SQLiteCache,
    Step,
    step,
)
from flujo.exceptions import ConfigurationError
from flujo.state import InMemoryBackend, PostgresBackend, SQLiteBackend

from .steplib_helpers import Calls, shape


class Ctx(PipelineContext):
    locale: str = "en"
    unrelated: int = 0


class Summary(BaseModel):
    words: int
    first: str


def counting(calls: Calls, name: str = "work") -> Step[Any, Any]:
    def work(data: Any) -> dict[str, Any]:
        calls.add(repr(data))
        return {"echo": data}

    return Step.from_callable(work, name=name)


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    options.setdefault("context_model", Ctx)
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


# -- hits and misses -------------------------------------------------------------------------------


async def test_a_second_call_with_the_same_input_is_a_hit() -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls))
    first = await run(cached, "hello")
    second = await run(cached, "hello")
    assert first.output == second.output == {"echo": "hello"}
    assert calls.log == ["'hello'"]
    assert first.step_history[0].cache_hit is False
    assert second.step_history[0].cache_hit is True
    assert second.step_history[0].name == "work"


async def test_a_different_input_is_a_miss() -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls))
    await run(cached, "a")
    result = await run(cached, "b")
    assert result.output == {"echo": "b"}
    assert result.step_history[0].cache_hit is False
    assert calls.log == ["'a'", "'b'"]


async def test_async_wrapped_step() -> None:
    calls = Calls()

    @step
    async def shout(text: str) -> str:
        calls.add(text)
        return text.upper()

    cached = CacheStep.cached(shout)
    assert (await run(cached, "hi")).output == "HI"
    assert (await run(cached, "hi")).output == "HI"
    assert calls.log == ["hi"]


async def test_a_hit_comes_back_in_the_declared_output_type() -> None:
    def summarize(text: str) -> Summary:
        words = text.split()
        return Summary(words=len(words), first=words[0])

    cached = CacheStep.cached(Step.from_callable(summarize, name="summarize"))
    await run(cached, "one two three")
    hit = await run(cached, "one two three")
    assert hit.step_history[0].cache_hit is True
    assert hit.output == Summary(words=3, first="one")


async def test_a_none_output_is_cached_too() -> None:
    calls = Calls()
    cached = CacheStep.cached(Step.from_callable(calls.add, name="nothing"))
    await run(cached, 1)
    hit = await run(cached, 1)
    assert hit.output is None
    assert hit.step_history[0].cache_hit is True
    assert calls.log == [1]


async def test_dict_inputs_with_another_key_order_hit() -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls))
    await run(cached, {"a": 1, "b": {"x": 1, "y": [1, 2]}})
    hit = await run(cached, {"b": {"y": [1, 2], "x": 1}, "a": 1})
    assert hit.step_history[0].cache_hit is True
    assert len(calls.log) == 1


async def test_pydantic_inputs_are_keyed_by_their_data() -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls))
    await run(cached, Summary(words=1, first="a"))
    assert (await run(cached, Summary(words=1, first="a"))).step_history[0].cache_hit
    assert not (await run(cached, Summary(words=2, first="a"))).step_history[0].cache_hit


async def test_step_identity_is_part_of_the_key(tmp_path: Path) -> None:
    shared = SQLiteCache(tmp_path / "cache.db")
    calls = Calls()

    def other_work(data: Any) -> str:
        calls.add(("other", data))
        return "other"

    work = CacheStep.cached(counting(calls, "work"), shared)
    renamed = CacheStep.cached(counting(calls, "renamed"), shared)
    same_name_other_fn = CacheStep.cached(Step.from_callable(other_work, name="work"), shared)
    same_again = CacheStep.cached(counting(calls, "work"), shared)

    assert not (await run(work, "x")).step_history[0].cache_hit
    assert not (await run(renamed, "x")).step_history[0].cache_hit
    result = await run(same_name_other_fn, "x")
    assert not result.step_history[0].cache_hit
    assert result.output == "other"
    hit = await run(same_again, "x")  # the same step (name and function) shares the entry
    assert hit.step_history[0].cache_hit
    assert hit.output == {"echo": "x"}
    assert calls.log == ["'x'", "'x'", ("other", "x")]
    await shared.aclose()


async def test_an_in_memory_cache_passed_in_is_the_one_used() -> None:
    """An explicit (still empty) InMemoryCache is shared by the steps given it."""
    shared = InMemoryCache()
    calls = Calls()
    one = CacheStep.cached(counting(calls), shared)
    two = CacheStep.cached(counting(calls), shared)
    assert one.cache is shared
    await run(one, "x")
    assert len(shared) == 1
    assert (await run(two, "x")).step_history[0].cache_hit is True
    assert calls.log == ["'x'"]


async def test_declared_context_fields_are_part_of_the_key() -> None:
    calls = Calls()

    def greet(name: str, *, context: Ctx) -> str:
        calls.add((name, context.locale))
        return f"{context.locale}:{name}"

    cached = CacheStep.cached(Step.from_callable(greet, name="greet"), context_fields=["locale"])
    assert (await run(cached, "ana")).output == "en:ana"
    other_locale = await run(cached, "ana", initial_context_data={"locale": "es"})
    assert other_locale.output == "es:ana"
    assert not other_locale.step_history[0].cache_hit
    unrelated = await run(cached, "ana", initial_context_data={"locale": "es", "unrelated": 5})
    assert unrelated.step_history[0].cache_hit
    assert calls.log == [("ana", "en"), ("ana", "es")]


async def test_a_context_field_the_context_lacks_fails_the_step() -> None:
    cached = CacheStep.cached(counting(Calls()), context_fields=["no_such_field"])
    result = await run(cached, "x")
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ConfigurationError"
    assert "no_such_field" in result.error.message


async def test_failures_are_not_cached() -> None:
    calls = Calls()
    state = {"fail": True}

    def flaky(x: str) -> str:
        calls.add(x)
        if state["fail"]:
            raise ConnectionError("upstream down")
        return x * 2

    cached = CacheStep.cached(Step.from_callable(flaky, name="flaky"))
    failed = await run(cached, "ab")
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "ConnectionError"
    state["fail"] = False
    ok = await run(cached, "ab")
    assert ok.output == "abab"
    assert ok.step_history[0].cache_hit is False
    assert (await run(cached, "ab")).step_history[0].cache_hit is True
    assert calls.log == ["ab", "ab"]


async def test_an_output_that_cannot_be_serialized_is_a_serialization_error() -> None:
    cached = CacheStep.cached(Step.from_callable(lambda x: object(), name="opaque"))
    result = await run(cached, 1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "SerializationError"
    assert "opaque" in result.error.message


async def test_an_input_that_cannot_be_serialized_is_a_serialization_error() -> None:
    make = Step.from_callable(lambda x: object(), name="make_opaque")
    cached = CacheStep.cached(counting(Calls()))
    result = await run(make >> cached, 1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "SerializationError"


# -- history ---------------------------------------------------------------------------------------


async def test_a_hit_is_visible_in_the_stored_history(tmp_path: Path) -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls))
    first = Step.from_callable(lambda x: x, name="first")
    backend = SQLiteBackend(tmp_path / "runs.db")
    async with Flujo(first >> cached, state_backend=backend) as runner:
        await runner.run_async("x")
        live = await runner.run_async("x")
        assert [r.cache_hit for r in live.step_history] == [False, True]
        again = await runner.run_async("x", run_id=live.run_id)
        state = await backend.load_state(live.run_id)
    assert shape(again.step_history) == shape(live.step_history)
    assert state is not None
    assert [record.get("cache_hit", False) for record in state["step_history"]] == [False, True]
    assert calls.log == ["'x'"]


# -- cache backends --------------------------------------------------------------------------------


async def test_in_memory_cache_is_a_bounded_lru() -> None:
    cache = InMemoryCache(maxsize=2)
    await cache.set("a", b"1")
    await cache.set("b", b"2")
    assert await cache.get("a") == b"1"  # "a" is now the most recently used
    await cache.set("c", b"3")
    assert await cache.get("b") is None
    assert (await cache.get("a"), await cache.get("c")) == (b"1", b"3")
    assert len(cache) == 2


async def test_a_tiny_in_memory_cache_evicts_old_entries() -> None:
    calls = Calls()
    cached = CacheStep.cached(counting(calls), InMemoryCache(maxsize=1))
    for data in ["a", "b", "a"]:
        await run(cached, data)
    assert calls.log == ["'a'", "'b'", "'a'"]


@pytest.mark.parametrize("maxsize", [0, -1, True, 1.5, "10"])
def test_bad_in_memory_cache_size(maxsize: Any) -> None:
    with pytest.raises(ConfigurationError):
        InMemoryCache(maxsize=maxsize)


def test_cache_step_wraps_steps_and_takes_cache_backends() -> None:
    with pytest.raises(ConfigurationError):
        CacheStep(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        CacheStep(counting(Calls()), {})  # type: ignore[arg-type]
    custom = CacheStep(counting(Calls()), name="custom_name")
    assert custom.name == "custom_name"
    assert isinstance(custom.cache, InMemoryCache)
    assert isinstance(custom.cache, CacheBackend)


async def test_sqlite_cache_is_shared_by_two_runners_on_one_file(tmp_path: Path) -> None:
    calls = Calls()
    path = tmp_path / "cache.db"
    cache_one = SQLiteCache(path)
    cache_two = SQLiteCache(path)
    try:
        first = await run(CacheStep.cached(counting(calls), cache_one), "x")
        second = await run(CacheStep.cached(counting(calls), cache_two), "x")
    finally:
        await cache_one.aclose()
        await cache_two.aclose()
    assert first.step_history[0].cache_hit is False
    assert second.step_history[0].cache_hit is True
    assert second.output == {"echo": "x"}
    assert calls.log == ["'x'"]


async def test_sqlite_cache_shares_the_runs_store(tmp_path: Path) -> None:
    calls = Calls()
    path = tmp_path / "runs.db"
    for _ in range(2):
        backend = SQLiteBackend(path)
        cached = CacheStep.cached(counting(calls), SQLiteCache(backend))
        async with Flujo(cached, state_backend=backend) as runner:
            result = await runner.run_async("x")
    assert result.step_history[0].cache_hit is True
    assert calls.log == ["'x'"]


@pytest.mark.slow
async def test_sqlite_cache_is_shared_across_processes(tmp_path: Path) -> None:
    """Another process fills the cache; this one hits it (and gets the other's output)."""
    (tmp_path / "probe_steps.py").write_text(
        textwrap.dedent(
            """
            import os

            CALLS = []

            def probe(data):
                CALLS.append(data)
                return {"pid": os.getpid(), "data": data}
            """
        )
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from flujo import CacheStep, Flujo, SQLiteCache, Step
        from probe_steps import probe

        cache = SQLiteCache({str(tmp_path / "cache.db")!r})
        cached = CacheStep.cached(Step.from_callable(probe, name="probe"), cache)
        result = Flujo(cached, persist_state=False).run("shared")
        assert result.output["data"] == "shared", result
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert child.returncode == 0, child.stderr

    sys.path.insert(0, str(tmp_path))
    try:
        import probe_steps  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    cache = SQLiteCache(tmp_path / "cache.db")
    try:
        cached = CacheStep.cached(Step.from_callable(probe_steps.probe, name="probe"), cache)
        result = await run(cached, "shared")
    finally:
        await cache.aclose()
        sys.modules.pop("probe_steps", None)
    assert result.step_history[0].cache_hit is True
    assert probe_steps.CALLS == []
    assert result.output["data"] == "shared"
    assert result.output["pid"] != __import__("os").getpid()


async def test_postgres_cache(postgres_dsn: str, postgres_schema: str) -> None:
    calls = Calls()
    backend = PostgresBackend(postgres_dsn, schema=postgres_schema)
    try:
        await backend.migrate()
        first = await run(CacheStep.cached(counting(calls), PostgresCache(backend)), {"q": 1})
        assert first.step_history[0].cache_hit is False
    finally:
        await backend.aclose()
    other = PostgresBackend(postgres_dsn, schema=postgres_schema)  # as another process would
    try:
        cached = CacheStep.cached(counting(calls), PostgresCache(other))
        async with Flujo(cached, state_backend=other) as runner:
            second = await runner.run_async({"q": 1})
            miss = await runner.run_async({"q": 2})
    finally:
        await other.aclose()
    assert second.step_history[0].cache_hit is True
    assert second.output == {"echo": {"q": 1}}
    assert miss.step_history[0].cache_hit is False
    assert calls.log == ["{'q': 1}", "{'q': 2}"]


# -- durability ------------------------------------------------------------------------------------


async def test_a_cached_step_in_a_resumed_run(tmp_path: Path) -> None:
    """A run that failed after a cached step resumes after it; a new run hits the cache."""
    calls = Calls()
    state = {"fail": True}

    def last(x: Any) -> str:
        if state["fail"]:
            raise RuntimeError("down")
        return "done"

    backend = InMemoryBackend()
    pipeline = CacheStep.cached(counting(calls)) >> Step.from_callable(last, name="last")
    first = await Flujo(pipeline, state_backend=backend).run_async("x")
    assert first.status == "failed"
    state["fail"] = False
    resumed = await Flujo(pipeline, state_backend=backend).run_async("x", run_id=first.run_id)
    assert resumed.output == "done"
    fresh = await Flujo(pipeline, state_backend=backend).run_async("x")
    assert fresh.step_history[0].cache_hit is True
    assert calls.log == ["'x'"]


def test_step_cached_is_cache_step_cached(tmp_path: Path) -> None:
    calls = Calls()
    cache = SQLiteCache(tmp_path / "cache.db")
    made = Step.cached(counting(calls), cache, context_fields=["locale"])
    assert isinstance(made, CacheStep)
    assert made.cache is cache
    assert made.context_fields == ("locale",)
    assert made.identity() == CacheStep.cached(counting(calls)).identity()
