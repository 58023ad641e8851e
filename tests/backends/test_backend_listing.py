"""The StateBackend contract for run metadata, filtered and paged listing, and bulk deletion.

Runs against every backend in conftest.BACKEND_FACTORIES (Postgres included). See
test_backend_contract.py for the rest of the contract.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from backend_helpers import CREATED, T0, checkpoint, run_header, sample_state, step_record

from flujo.exceptions import FlujoError, InvalidMetadataError, SerializationError
from flujo.state.backends.base import MAX_METADATA_KEY_LENGTH, StateBackend, to_datetime
from flujo.state.backends.postgres import PostgresBackend


def _ids(runs: list[dict[str, Any]]) -> list[str]:
    return [run["run_id"] for run in runs]


def _refuses_nul(backend: StateBackend) -> bool:
    """Postgres cannot store NUL in metadata (JSONB) or in text columns (status, pipeline
    name): storing it raises SerializationError, and filtering by it finds nothing."""
    return isinstance(backend, PostgresBackend)


async def _snapshot(backend: StateBackend) -> dict[str, Any]:
    """Everything the store holds, as the API shows it."""
    runs = await backend.list_runs(limit=10_000)
    return {
        "listing": runs,
        "states": {run_id: await backend.load_state(run_id) for run_id in _ids(runs)},
    }


# -- metadata stored with a run --------------------------------------------------------------------

METADATA: dict[str, Any] = {
    "tenant": "acme",
    "user_id": 42,
    "ratio": 0.25,
    "beta": True,
    "off": False,
    "nothing": None,
    "label": "Zoë ✓ 東京",
    "tags": ["a", "b"],
    "nested": {"deep": {"er": [1, {"x": None}]}},
    "A-b.c_d": "edge-key",
    "0": "digit key",
    "k" * MAX_METADATA_KEY_LENGTH: "longest key",
    "big": 2**63 - 1,
    "small": -(2**63),
    "tiny": 5e-324,
}


async def test_metadata_stored_by_the_first_checkpoint(backend: StateBackend) -> None:
    header = run_header(metadata=METADATA)
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=header, context={"a": 1}))

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["metadata"] == METADATA
    [summary] = await backend.list_runs()
    assert summary["metadata"] == METADATA

    # Later checkpoints carry no header: the metadata stays as it was.
    for version in (1, 2):
        await backend.write_checkpoint(
            checkpoint(
                backend,
                "r",
                version,
                steps=[step_record(version - 1, "s")],
                step_offset=version - 1,
                index=version,
            )
        )
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["metadata"] == METADATA
    assert (await backend.list_runs())[0]["metadata"] == METADATA
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "acme"})) == ["r"]


async def test_metadata_stored_by_save_state(backend: StateBackend) -> None:
    state = sample_state("r", metadata=METADATA)
    await backend.save_state("r", state)

    assert await backend.load_state("r") == state
    assert (await backend.list_runs())[0]["metadata"] == METADATA


async def test_a_run_without_metadata_has_an_empty_object(backend: StateBackend) -> None:
    await backend.write_checkpoint(checkpoint(backend, "by-header", 0, header=run_header()))
    state = sample_state("by-save")
    del state["metadata"]
    await backend.save_state("by-save", state)
    await backend.save_state("none", sample_state("none", metadata=None))

    for run_id in ("by-header", "by-save", "none"):
        loaded = await backend.load_state(run_id)
        assert loaded is not None
        assert loaded["metadata"] == {}, run_id
    assert [run["metadata"] for run in await backend.list_runs()] == [{}, {}, {}]


async def test_save_state_replaces_the_metadata_and_what_filters_find(
    backend: StateBackend,
) -> None:
    await backend.save_state("r", sample_state("r", metadata={"tenant": "old", "keep": 1}))
    await backend.save_state("r", sample_state("r", metadata={"tenant": "new"}))

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["metadata"] == {"tenant": "new"}
    assert await backend.list_runs(metadata_filter={"tenant": "old"}) == []
    assert await backend.list_runs(metadata_filter={"keep": 1}) == []
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "new"})) == ["r"]


BAD_METADATA_KEYS: list[Any] = [
    "",
    "has space",
    ".starts-with-dot",
    "-starts-with-dash",
    "a/b",
    "x' OR 1=1 --",
    'a"); DROP TABLE runs; --',
    "$.a",
    "a.b[0]",
    "a' || '",
    "a\x00b",
    "\x00",
    "k" * (MAX_METADATA_KEY_LENGTH + 1),
    "k" * 10_000,
    "ключ",
    "tab\t",
    "new\nline",
    "*",
    "%",
    1,
    None,
    1.5,
    True,
    ("a",),
    b"key",
]


def _key_param(key: Any) -> Any:
    shown = repr(key)
    return pytest.param(key, id=shown if len(shown) <= 30 else shown[:27] + "...")


BAD_KEY_PARAMS = [_key_param(key) for key in BAD_METADATA_KEYS]


async def test_save_state_refuses_bad_metadata_keys(backend: StateBackend) -> None:
    """Every key of BAD_METADATA_KEYS, in one test (the same check for each)."""
    await backend.save_state("kept", sample_state("kept"))

    for key in BAD_METADATA_KEYS:
        with pytest.raises(InvalidMetadataError) as info:
            await backend.save_state("new", sample_state("new", metadata={"ok": 1, key: "v"}))
        assert info.value.key == str(key)
        with pytest.raises(InvalidMetadataError):
            await backend.save_state("kept", sample_state("kept", metadata={key: "v"}, version=9))

    assert await backend.load_state("new") is None
    assert await backend.load_state("kept") == sample_state("kept")


@pytest.mark.parametrize("metadata", [["a", 1], "tenant=acme", 7])
async def test_save_state_refuses_metadata_that_is_not_an_object(
    backend: StateBackend, metadata: Any
) -> None:
    with pytest.raises((InvalidMetadataError, SerializationError)):
        await backend.save_state("r", sample_state("r", metadata=metadata))
    assert await backend.load_state("r") is None
    assert await backend.list_runs() == []


# -- list_runs(metadata_filter=...) ----------------------------------------------------------------

# Created in this order (so listed in the reverse one). m-e holds look-alikes of the others'
# values in other JSON types.
FILTER_RUNS: list[tuple[str, dict[str, Any]]] = [
    (
        "m-a",
        {
            "tenant": "acme",
            "tier": "gold",
            "n": 1,
            "ratio": 0.5,
            "flag": True,
            "none": None,
            "label": "Zoë ✓",
            "big": 2**63 - 1,
            "neg": -7,
            "nested": {"n": 1},
            "list": [1, "acme"],
        },
    ),
    ("m-b", {"tenant": "acme", "tier": "silver", "n": 2, "ratio": 0.5, "flag": False}),
    ("m-c", {"tenant": "beta", "n": 1, "flag": True, "none": None, "label": "Zoe"}),
    ("m-d", {}),
    (
        "m-e",
        {
            "tenant": "ACME",
            "n": "1",
            "flag": "true",
            "none": "null",
            "ratio": "0.5",
            "big": str(2**63 - 1),
        },
    ),
]


async def _save_filter_runs(backend: StateBackend) -> None:
    for i, (run_id, metadata) in enumerate(FILTER_RUNS):
        header = run_header(created_at=T0 + i, metadata=metadata)
        await backend.write_checkpoint(checkpoint(backend, run_id, 0, header=header))


@pytest.mark.parametrize(
    ("metadata_filter", "expected"),
    [
        # one key, each scalar type
        ({"tenant": "acme"}, ["m-b", "m-a"]),
        ({"tenant": "ACME"}, ["m-e"]),
        ({"tier": "gold"}, ["m-a"]),
        ({"label": "Zoë ✓"}, ["m-a"]),
        ({"label": "Zoe"}, ["m-c"]),
        ({"n": 1}, ["m-c", "m-a"]),
        ({"n": 2}, ["m-b"]),
        ({"n": "1"}, ["m-e"]),
        ({"neg": -7}, ["m-a"]),
        ({"big": 2**63 - 1}, ["m-a"]),
        ({"big": str(2**63 - 1)}, ["m-e"]),
        ({"ratio": 0.5}, ["m-b", "m-a"]),
        ({"ratio": "0.5"}, ["m-e"]),
        ({"flag": True}, ["m-c", "m-a"]),
        ({"flag": False}, ["m-b"]),
        ({"flag": "true"}, ["m-e"]),
        ({"none": None}, ["m-c", "m-a"]),
        ({"none": "null"}, ["m-e"]),
        # a value of another JSON type never matches
        ({"n": True}, []),
        ({"flag": 1}, []),
        ({"flag": 0}, []),
        ({"none": 0}, []),
        ({"none": False}, []),
        ({"none": ""}, []),
        ({"tenant": None}, []),
        # several keys: all must match
        ({"tenant": "acme", "n": 1}, ["m-a"]),
        ({"tenant": "acme", "flag": False}, ["m-b"]),
        ({"n": 1, "flag": True, "none": None}, ["m-c", "m-a"]),
        ({"n": 1, "flag": True, "tenant": "beta"}, ["m-c"]),
        ({"tenant": "beta", "n": 2}, []),
        ({"tenant": "acme", "tier": "gold", "ratio": 0.5, "n": 1, "flag": True}, ["m-a"]),
        # no match, and keys some runs (or all) lack
        ({"tenant": "nobody"}, []),
        ({"missing": None}, []),
        ({"missing": "x"}, []),
        ({"tier": None}, []),
        ({"tenant": "acme", "missing": 1}, []),
        # a scalar filter does not look inside objects and lists
        ({"nested": 1}, []),
        ({"list": 1}, []),
        ({"list": "acme"}, []),
        ({"n.nested": 1}, []),
    ],
)
async def test_metadata_filter(
    backend: StateBackend, metadata_filter: dict[str, Any], expected: list[str]
) -> None:
    await _save_filter_runs(backend)
    assert _ids(await backend.list_runs(metadata_filter=metadata_filter)) == expected


async def test_metadata_filter_with_the_other_filters(backend: StateBackend) -> None:
    await _save_filter_runs(backend)
    await backend.write_checkpoint(checkpoint(backend, "m-a", 1, status="completed", index=3))
    acme = {"tenant": "acme"}

    assert _ids(await backend.list_runs(metadata_filter=acme, status="completed")) == ["m-a"]
    assert _ids(await backend.list_runs(metadata_filter=acme, status="running")) == ["m-b"]
    assert _ids(await backend.list_runs(metadata_filter=acme, pipeline_name="ingest")) == [
        "m-b",
        "m-a",
    ]
    assert await backend.list_runs(metadata_filter=acme, pipeline_name="other") == []
    assert _ids(await backend.list_runs(metadata_filter=acme, since=to_datetime(T0 + 1))) == ["m-b"]
    assert _ids(await backend.list_runs(metadata_filter=acme, limit=1)) == ["m-b"]
    assert _ids(await backend.list_runs(metadata_filter=acme, offset=1)) == ["m-a"]
    assert await backend.list_runs(metadata_filter=acme, offset=2) == []
    summaries = await backend.list_runs(metadata_filter={"n": 2})
    assert summaries[0]["metadata"] == dict(FILTER_RUNS)["m-b"]


# (stored, filter): equal as JSON numbers, whatever the spelling (int or integral float).
EQUAL_NUMBERS = [
    (3, 3.0),
    (3.0, 3),
    (3.0, 3.0),
    (0, 0.0),
    (0.0, 0),
    (-0.0, 0),
    (0, -0.0),
    (-2, -2.0),
    (-2.0, -2),
    (10**15, 1e15),
    (1e15, 10**15),
    (2**53 - 1, float(2**53 - 1)),
    (float(2**53 - 1), 2**53 - 1),
]


@pytest.mark.parametrize(("stored", "wanted"), EQUAL_NUMBERS)
async def test_metadata_numbers_compare_as_json_numbers(
    backend: StateBackend, stored: float, wanted: float
) -> None:
    """A filter {"n": 3.0} finds a run stored with 3, and {"n": 3} one stored with 3.0, on
    every backend; the stored metadata itself is given back as it was written."""
    await backend.save_state("r", sample_state("r", metadata={"n": stored, "k": "v"}))
    await backend.save_state("other", sample_state("other", metadata={"n": stored - 1}))
    await backend.save_state("text", sample_state("text", metadata={"n": str(stored)}))

    assert _ids(await backend.list_runs(metadata_filter={"n": wanted})) == ["r"]
    assert _ids(await backend.list_runs(metadata_filter={"n": wanted, "k": "v"})) == ["r"]
    assert await backend.list_runs(metadata_filter={"n": wanted, "k": "w"}) == []
    assert _ids(await backend.list_runs(metadata_filter={"n": wanted - 1})) == ["other"]
    assert await backend.list_runs(metadata_filter={"n": 0.5}) == []
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["metadata"] == {"n": stored, "k": "v"}
    assert type(loaded["metadata"]["n"]) is type(stored)


@pytest.mark.parametrize("key", ["a", "A-b.c_d", "0", "_", "k" * MAX_METADATA_KEY_LENGTH])
async def test_edge_case_metadata_keys_are_filterable(backend: StateBackend, key: str) -> None:
    await backend.save_state("r", sample_state("r", metadata={key: "v", "other": 1}))
    await backend.save_state("s", sample_state("s", metadata={"other": 1}))
    assert _ids(await backend.list_runs(metadata_filter={key: "v"})) == ["r"]


@pytest.mark.parametrize("key", BAD_KEY_PARAMS)
async def test_a_bad_metadata_filter_key_is_refused(backend: StateBackend, key: Any) -> None:
    await _save_filter_runs(backend)
    before = await _snapshot(backend)

    with pytest.raises(InvalidMetadataError) as info:
        await backend.list_runs(metadata_filter={key: "acme"})
    with pytest.raises(InvalidMetadataError):
        await backend.list_runs(metadata_filter={"tenant": "acme", key: 1})

    assert info.value.key == str(key)
    assert isinstance(info.value, FlujoError)
    assert isinstance(info.value, ValueError)
    assert await _snapshot(backend) == before


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(["acme"], id="list"),
        pytest.param({"tenant": "acme"}, id="dict"),
        pytest.param(("acme",), id="tuple"),
        pytest.param({"acme"}, id="set"),
        pytest.param(b"acme", id="bytes"),
        pytest.param(Decimal("1"), id="decimal"),
        pytest.param(datetime(2026, 1, 1, tzinfo=UTC), id="datetime"),
        pytest.param(_Opaque(), id="object"),
        pytest.param(2**64, id="int-over-64-bits"),
        pytest.param(-(2**63) - 1, id="int-under-int64"),
        pytest.param("abc\ud800", id="lone-surrogate"),
    ],
)
async def test_a_bad_metadata_filter_value_is_refused(backend: StateBackend, value: Any) -> None:
    await _save_filter_runs(backend)
    before = await _snapshot(backend)

    with pytest.raises(InvalidMetadataError) as info:
        await backend.list_runs(metadata_filter={"none": value})

    assert info.value.key == "none"
    assert await _snapshot(backend) == before


async def test_a_non_finite_metadata_filter_value_is_refused(backend: StateBackend) -> None:
    """NaN and the infinities are not JSON (orjson would write them as null, so they would
    match runs whose value is None)."""
    await _save_filter_runs(backend)
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidMetadataError) as info:
            await backend.list_runs(metadata_filter={"none": value})
        assert info.value.key == "none"


@pytest.mark.parametrize("metadata_filter", [["tenant", "acme"], "tenant=acme", 7])
async def test_a_metadata_filter_that_is_not_a_mapping_is_refused(
    backend: StateBackend, metadata_filter: Any
) -> None:
    await _save_filter_runs(backend)
    with pytest.raises(InvalidMetadataError):
        await backend.list_runs(metadata_filter=metadata_filter)


HOSTILE_VALUES = [
    "x' OR 1=1 --",
    "x' OR '1'='1",
    'a"); DROP TABLE runs; --',
    "'; DROP TABLE flujo_runs; --",
    "acme' --",
    'acme" --',
    "$.a",
    "$.tenant",
    "a.b[0]",
    "a' || '",
    "' || (SELECT 1) || '",
    "%",
    "_",
    "*",
    "?",
    "$1",
    "\\",
    '"',
    "'",
    "{}",
    '{"tenant": "acme"}',
    "null",
    "true",
    "1",
    "x" * 100_000,
]
#: Hostile values with the NUL character, which Postgres cannot store in metadata (looking for
#: them there finds nothing; elsewhere they match like any other text).
NUL_VALUES = ["a\x00b", "\x00", "acme\x00"]


def _value_param(value: str) -> Any:
    shown = repr(value)
    return pytest.param(value, id=shown if len(shown) <= 30 else shown[:27] + "...")


@pytest.mark.parametrize("value", [_value_param(v) for v in HOSTILE_VALUES])
async def test_hostile_metadata_filter_values_are_data(backend: StateBackend, value: str) -> None:
    """A hostile value matches no run (none holds it), drops nothing, changes nothing."""
    await _save_filter_runs(backend)
    before = await _snapshot(backend)

    for key in ("tenant", "tier", "missing"):
        assert await backend.list_runs(metadata_filter={key: value}) == []
    assert await backend.list_runs(metadata_filter={"tenant": "acme", "n": value}) == []
    assert await backend.list_runs(metadata_filter={"tenant": value}, status="running") == []

    assert await _snapshot(backend) == before
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "acme"})) == ["m-b", "m-a"]
    # The store still takes writes (no table was dropped).
    await backend.write_checkpoint(checkpoint(backend, "after", 0, header=run_header()))
    assert len(await backend.list_runs()) == len(FILTER_RUNS) + 1


@pytest.mark.parametrize("value", [_value_param(v) for v in HOSTILE_VALUES])
async def test_a_run_holding_a_hostile_value_is_found_by_exactly_that_value(
    backend: StateBackend, value: str
) -> None:
    await _save_filter_runs(backend)
    header = run_header(created_at=T0 + 100, metadata={"tenant": value, "n": 1})
    await backend.write_checkpoint(checkpoint(backend, "hostile", 0, header=header))

    assert _ids(await backend.list_runs(metadata_filter={"tenant": value})) == ["hostile"]
    assert _ids(await backend.list_runs(metadata_filter={"tenant": value, "n": 1})) == ["hostile"]
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "acme"})) == ["m-b", "m-a"]
    assert len(await backend.list_runs()) == len(FILTER_RUNS) + 1


async def test_nul_in_metadata_filter_values_is_data(backend: StateBackend) -> None:
    """A value with NUL matches no run and breaks nothing; a run holding one is found by it
    (on Postgres, which cannot store NUL, storing it is refused with SerializationError)."""
    await _save_filter_runs(backend)
    before = await _snapshot(backend)
    for value in NUL_VALUES:
        assert await backend.list_runs(metadata_filter={"tenant": value}) == [], repr(value)
        assert await backend.list_runs(metadata_filter={"tenant": "acme", "n": value}) == []
    assert await _snapshot(backend) == before

    for i, value in enumerate(NUL_VALUES):
        header = run_header(created_at=T0 + 100 + i, metadata={"tenant": value})
        cp = checkpoint(backend, f"nul-{i}", 0, header=header)
        if _refuses_nul(backend):
            with pytest.raises(SerializationError):
                await backend.write_checkpoint(cp)
            expected = []
        else:
            await backend.write_checkpoint(cp)
            expected = [f"nul-{i}"]
        assert _ids(await backend.list_runs(metadata_filter={"tenant": value})) == expected
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "acme"})) == ["m-b", "m-a"]


# -- since -----------------------------------------------------------------------------------------


async def test_since_keeps_runs_created_at_or_after_it(backend: StateBackend) -> None:
    for i in range(5):
        header = run_header(created_at=T0 + 10 * i)
        # Updated long after creation, in the reverse order: `since` looks at creation only.
        cp = checkpoint(backend, f"r{i}", 0, header=header, updated_at=T0 + 1000 - i)
        await backend.write_checkpoint(cp)

    def since(seconds: float) -> list[str]:
        return [f"r{i}" for i in reversed(range(5)) if 10 * i >= seconds]

    for offset in (-1.0, 0.0, 0.5, 10.0, 19.999, 20.0, 40.0, 40.001, 500.0):
        found = _ids(await backend.list_runs(since=to_datetime(T0 + offset)))
        assert found == since(offset), offset


async def test_since_compares_instants_whatever_the_time_zone(backend: StateBackend) -> None:
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))
    plus_five = CREATED.astimezone(timezone(timedelta(hours=5)))

    assert _ids(await backend.list_runs(since=plus_five)) == ["r"]
    assert await backend.list_runs(since=plus_five + timedelta(seconds=1)) == []
    assert _ids(await backend.list_runs(since=plus_five - timedelta(days=1))) == ["r"]


# -- paging ----------------------------------------------------------------------------------------


async def _save_many(backend: StateBackend, count: int) -> list[str]:
    """``count`` runs, some created at the same instant; returns their ids, newest first."""
    for i in range(count):
        header = run_header(created_at=T0 + i // 3, metadata={"parity": i % 2})
        await backend.write_checkpoint(checkpoint(backend, f"p{i:02}", 0, header=header))
    return [f"p{i:02}" for i in reversed(range(count))]


async def _pages(backend: StateBackend, size: int, **filters: Any) -> list[list[str]]:
    pages = []
    offset = 0
    while True:
        page = _ids(await backend.list_runs(limit=size, offset=offset, **filters))
        if not page:
            return pages
        assert len(page) <= size
        pages.append(page)
        offset += size


@pytest.mark.parametrize("size", [1, 4, 7, 25, 26, 100])
async def test_paging_walks_every_run_once_newest_first(backend: StateBackend, size: int) -> None:
    newest_first = await _save_many(backend, 25)

    pages = await _pages(backend, size)

    assert [run_id for page in pages for run_id in page] == newest_first
    assert all(len(page) == size for page in pages[:-1])
    assert _ids(await backend.list_runs(limit=25)) == newest_first


async def test_paging_with_filters(backend: StateBackend) -> None:
    newest_first = await _save_many(backend, 25)
    even = [run_id for run_id in newest_first if int(run_id[1:]) % 2 == 0]

    pages = await _pages(backend, 4, metadata_filter={"parity": 0})
    assert [run_id for page in pages for run_id in page] == even

    since = to_datetime(T0 + 4)  # runs 12.. were created at T0 + 4 and later
    pages = await _pages(backend, 3, metadata_filter={"parity": 0}, since=since)
    assert [run_id for page in pages for run_id in page] == [
        run_id for run_id in even if int(run_id[1:]) >= 12
    ]


async def test_pages_are_stable_while_runs_advance(backend: StateBackend) -> None:
    """Listing by creation: checkpoints between two pages move no run across pages."""
    newest_first = await _save_many(backend, 12)
    first = _ids(await backend.list_runs(limit=5))
    for run_id in reversed(newest_first):  # every run advances, oldest first
        await backend.write_checkpoint(
            checkpoint(backend, run_id, 1, status="completed", index=3, updated_at=T0 + 999)
        )
    second = _ids(await backend.list_runs(limit=5, offset=5))
    third = _ids(await backend.list_runs(limit=5, offset=10))

    assert first + second + third == newest_first


async def test_an_offset_past_the_end_is_empty(backend: StateBackend) -> None:
    await _save_many(backend, 3)
    assert await backend.list_runs(offset=3) == []
    assert await backend.list_runs(offset=10**6) == []
    assert await backend.list_runs(limit=0, offset=1) == []


# -- delete_runs -----------------------------------------------------------------------------------

# run id, status, updated_at (seconds after T0)
PRUNE_SPECS = [
    ("old-done", "completed", 10.0),
    ("old-failed", "failed", 20.0),
    ("old-running", "running", 30.0),
    ("edge-done", "completed", 50.0),  # updated exactly at the cutoff: kept
    ("new-done", "completed", 60.0),
    ("new-failed", "failed", 70.0),
]
CUTOFF = to_datetime(T0 + 50.0)


async def _save_prunable(backend: StateBackend) -> None:
    for i, (run_id, status, updated) in enumerate(PRUNE_SPECS):
        header = run_header(created_at=T0 - 100 + i, metadata={"tenant": "acme", "i": i})
        await backend.write_checkpoint(
            checkpoint(
                backend,
                run_id,
                0,
                header=header,
                context={"field": run_id, "scratchpad": {"i": i}},
                steps=[step_record(0, "a", run_id), step_record(1, "b", i)],
                output=run_id,
                index=2,
                updated_at=T0,
            )
        )
        await backend.write_checkpoint(
            checkpoint(
                backend,
                run_id,
                1,
                status=status,
                context={"field": f"{run_id}-2"},
                steps=[step_record(2, "c", None)],
                step_offset=2,
                index=3,
                error={"type": "E", "message": "m", "step": "c"} if status == "failed" else None,
                updated_at=T0 + updated,
            )
        )


async def _assert_gone(backend: StateBackend, run_id: str) -> None:
    """No part of the run is left: not its row, context fields, step records or metadata."""
    assert await backend.load_state(run_id) is None
    assert run_id not in _ids(await backend.list_runs(limit=1000))
    assert run_id not in _ids(await backend.list_runs(metadata_filter={"tenant": "acme"}))
    # Re-created under the same id, it starts empty: nothing of the old run shows through.
    await backend.write_checkpoint(checkpoint(backend, run_id, 0, header=run_header()))
    fresh = await backend.load_state(run_id)
    assert fresh is not None
    assert fresh["pipeline_context"] == {}
    assert fresh["step_history"] == []
    assert fresh["metadata"] == {}
    assert fresh["version"] == 1
    assert run_id not in _ids(await backend.list_runs(metadata_filter={"tenant": "acme"}))
    await backend.delete_state(run_id)


@pytest.mark.parametrize(
    ("status", "deleted"),
    [
        (None, ["old-done", "old-failed", "old-running"]),
        ("completed", ["old-done"]),
        ("failed", ["old-failed"]),
        ("running", ["old-running"]),
        ("paused", []),
        ("x' OR 1=1 --", []),
    ],
)
async def test_delete_runs_deletes_exactly_the_runs_updated_before_the_cutoff(
    backend: StateBackend, status: str | None, deleted: list[str]
) -> None:
    await _save_prunable(backend)
    before = await _snapshot(backend)

    count = await backend.delete_runs(updated_before=CUTOFF, status=status)

    assert count == len(deleted)
    after = await _snapshot(backend)
    kept = [run_id for run_id in _ids(before["listing"]) if run_id not in deleted]
    assert _ids(after["listing"]) == kept
    for run_id in kept:  # untouched, every part
        assert after["states"][run_id] == before["states"][run_id]
    for run_id in deleted:
        await _assert_gone(backend, run_id)
    assert _ids(await backend.list_runs(metadata_filter={"tenant": "acme"})) == kept


async def test_delete_runs_looks_at_the_last_update_not_creation(backend: StateBackend) -> None:
    await _save_prunable(backend)
    # Created long before the cutoff, but updated after it.
    await backend.write_checkpoint(
        checkpoint(backend, "old-running", 2, updated_at=T0 + 1000, index=3)
    )
    assert await backend.delete_runs(updated_before=CUTOFF) == 2
    assert await backend.load_state("old-running") is not None


async def test_delete_runs_with_nothing_to_delete(backend: StateBackend) -> None:
    assert await backend.delete_runs(updated_before=to_datetime(T0 + 10**6)) == 0
    await _save_prunable(backend)
    before = await _snapshot(backend)

    assert await backend.delete_runs(updated_before=to_datetime(T0 + 10.0)) == 0
    assert await backend.delete_runs(updated_before=to_datetime(0)) == 0
    assert await _snapshot(backend) == before

    # Everything, then nothing is left to delete.
    assert await backend.delete_runs(updated_before=to_datetime(T0 + 10**6)) == len(PRUNE_SPECS)
    assert await backend.list_runs() == []
    assert await backend.delete_runs(updated_before=to_datetime(T0 + 10**6)) == 0


async def test_delete_runs_compares_instants_whatever_the_time_zone(
    backend: StateBackend,
) -> None:
    await _save_prunable(backend)
    cutoff = CUTOFF.astimezone(timezone(timedelta(hours=-7)))
    assert await backend.delete_runs(updated_before=cutoff, status="completed") == 1
    assert await backend.load_state("old-done") is None
    assert await backend.load_state("edge-done") is not None
