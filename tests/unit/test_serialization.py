"""flujo.state.serialization: the default handler, the Serializer, error paths, limits."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, field_serializer

from flujo.exceptions import FlujoError, PayloadTooLargeError, SerializationError
from flujo.state import flujo_default_serializer as exported_default
from flujo.state.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Serializer,
    dumps,
    flujo_default_serializer,
    loads,
)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.IntEnum):
    SMALL = 1
    LARGE = 3


class Inner(BaseModel):
    when: datetime
    color: Color
    tags: set[str] = set()


class Outer(BaseModel):
    name: str
    inner: Inner
    items: list[Inner] = []
    amount: Decimal = Decimal("0")
    ident: uuid.UUID | None = None


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    anything: Any = None
    mapping: dict[str, Any] = {}
    number: float = 0.0


class Secret(BaseModel):
    token: str

    @field_serializer("token")
    def _hide(self, value: str) -> str:
        return value[:2] + "***"


@dataclasses.dataclass
class Point:
    x: int
    y: float


@dataclasses.dataclass
class Polygon:
    name: str
    points: list[Point]


class Opaque:
    """Something no serializer knows."""


AT = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
UID = uuid.UUID("0b6f3c1e-6a1d-4a57-9f1c-2b1d3e4f5a6b")


# -- flujo_default_serializer ----------------------------------------------------------------------


def test_the_default_handler_is_exported_from_flujo_state() -> None:
    assert exported_default is flujo_default_serializer
    assert Serializer().default is flujo_default_serializer


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(AT, "2026-05-06T07:08:09.123456+00:00", id="aware-datetime"),
        pytest.param(datetime(2026, 5, 6, 7, 8, 9), "2026-05-06T07:08:09", id="naive-datetime"),
        pytest.param(
            datetime(2026, 5, 6, 7, 8, tzinfo=timezone(timedelta(hours=-5))),
            "2026-05-06T07:08:00-05:00",
            id="offset-datetime",
        ),
        pytest.param(date(2026, 5, 6), "2026-05-06", id="date"),
        pytest.param(time(7, 8, 9, 10), "07:08:09.000010", id="time"),
        pytest.param(Color.RED, "red", id="enum"),
        pytest.param(Size.LARGE, 3, id="int-enum"),
        pytest.param(UID, "0b6f3c1e-6a1d-4a57-9f1c-2b1d3e4f5a6b", id="uuid"),
        pytest.param(Decimal("1.10"), "1.10", id="decimal-keeps-its-digits"),
        pytest.param(Decimal("1E+3"), "1E+3", id="decimal-exponent"),
        pytest.param(PurePosixPath("/data/in.csv"), "/data/in.csv", id="posix-path"),
        pytest.param(PureWindowsPath("C:/data/in.csv"), "C:\\data\\in.csv", id="windows-path"),
        pytest.param({3, 1, 2}, [1, 2, 3], id="set-sorted"),
        pytest.param(frozenset({"b", "a"}), ["a", "b"], id="frozenset-sorted"),
        pytest.param(set(), [], id="empty-set"),
        pytest.param(Point(1, 2.5), {"x": 1, "y": 2.5}, id="dataclass"),
        pytest.param(b"hello", "hello", id="utf8-bytes"),
        pytest.param(bytearray(b"caf\xc3\xa9"), "café", id="bytearray"),
        pytest.param(memoryview(b"abc"), "abc", id="memoryview"),
        pytest.param(Secret(token="abcdef"), {"token": "ab***"}, id="model-field-serializer"),
    ],
)
def test_default_handler_conversions(value: Any, expected: Any) -> None:
    assert flujo_default_serializer(value) == expected


def test_default_handler_dumps_pydantic_models_in_json_mode() -> None:
    """FR-18a: pydantic models go through model_dump(mode="json")."""
    model = Outer(
        name="o",
        inner=Inner(when=AT, color=Color.GREEN, tags={"y", "x"}),
        items=[Inner(when=AT, color=Color.RED)],
        amount=Decimal("2.50"),
        ident=UID,
    )
    assert flujo_default_serializer(model) == model.model_dump(mode="json")
    dumped = flujo_default_serializer(model)
    assert dumped["inner"]["color"] == "green"
    assert dumped["amount"] == "2.50"
    assert dumped["ident"] == str(UID)
    assert datetime.fromisoformat(dumped["inner"]["when"]) == AT


def test_a_set_of_mixed_types_becomes_a_list() -> None:
    result = flujo_default_serializer({1, "a", None})
    assert isinstance(result, list)
    assert sorted(result, key=repr) == sorted([1, "a", None], key=repr)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Opaque(), "Opaque"),
        (object(), "object"),
        (lambda: None, "function"),
        (complex(1, 2), "complex"),
        (Polygon, "type"),  # a dataclass *class* is not data
        (b"\xff\xfe", "Base64Bytes"),
    ],
)
def test_default_handler_refuses_what_it_does_not_know(value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        flujo_default_serializer(value)


# -- Serializer.dumps / loads ----------------------------------------------------------------------


def test_dumps_handles_nested_common_types() -> None:
    """AC-18: nested models and other common types serialize without errors."""
    value = {
        "model": Outer(name="o", inner=Inner(when=AT, color=Color.RED), amount=Decimal("1.5")),
        "when": AT,
        "day": date(2026, 1, 2),
        "color": Color.GREEN,
        "size": Size.SMALL,
        "uid": UID,
        "money": Decimal("0.10"),
        "path": Path("/tmp/x.txt"),
        "tags": {"b", "a"},
        "polygon": Polygon("tri", [Point(0, 0.0), Point(1, 1.5)]),
        "tuple": (1, [2, (3,)]),
        "raw": b"text",
    }
    data = Serializer().dumps(value)

    assert loads(data) == {
        "model": {
            "name": "o",
            "inner": {"when": "2026-05-06T07:08:09.123456Z", "color": "red", "tags": []},
            "items": [],
            "amount": "1.5",
            "ident": None,
        },
        "when": "2026-05-06T07:08:09.123456+00:00",
        "day": "2026-01-02",
        "color": "green",
        "size": 1,
        "uid": str(UID),
        "money": "0.10",
        "path": "/tmp/x.txt",
        "tags": ["a", "b"],
        "polygon": {"name": "tri", "points": [{"x": 0, "y": 0.0}, {"x": 1, "y": 1.5}]},
        "tuple": [1, [2, [3]]],
        "raw": "text",
    }


def test_dumps_writes_compact_json_and_no_type_tags() -> None:
    data = Serializer().dumps({"a": [1, 2.5, None, True, "x"], "m": Inner(when=AT, color="red")})
    assert data == (
        b'{"a":[1,2.5,null,true,"x"],"m":{"when":"2026-05-06T07:08:09.123456Z",'
        b'"color":"red","tags":[]}}'
    )
    assert b"__" not in data
    assert b"Inner" not in data


def test_module_helpers() -> None:
    assert dumps({"a": [1, None]}) == b'{"a":[1,null]}'
    assert loads(b'{"a":[1,null]}') == {"a": [1, None]}
    assert loads('{"a":"é"}') == {"a": "é"}
    assert dumps(Opaque(), default=lambda o: "opaque") == b'"opaque"'
    with pytest.raises(SerializationError):
        dumps(Opaque())


def test_shared_references_that_are_not_cycles_serialize() -> None:
    shared = [1, {"x": 2}]
    assert loads(Serializer().dumps({"a": shared, "b": shared, "c": [shared]})) == {
        "a": [1, {"x": 2}],
        "b": [1, {"x": 2}],
        "c": [[1, {"x": 2}]],
    }


def test_none_does_not_look_like_nan() -> None:
    assert Serializer().dumps({"a": None, "b": [None], "c": "null"}) == (
        b'{"a":null,"b":[null],"c":"null"}'
    )


@pytest.mark.parametrize(
    "data",
    [
        b'{"__class__": "os.system", "args": ["rm -rf /"]}',
        b'{"py/object": "subprocess.Popen", "py/reduce": [{"py/function": "os.system"}]}',
        b'{"lc": 1, "type": "constructor", "id": ["os", "system"], "kwargs": {}}',
        b'"!!python/object/apply:os.system [\\"id\\"]"',
        b'{"$type": "System.Diagnostics.Process, System"}',
    ],
)
def test_loads_only_ever_makes_plain_data(data: bytes) -> None:
    result = Serializer.loads(data)
    assert result == json.loads(data)
    assert type(result) in (dict, str)


@pytest.mark.parametrize("data", [b"", b"{", b"\xff", b"NaN", b"[1,]", b"{'a': 1}", b"Infinity"])
def test_loads_of_invalid_json_raises_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        Serializer.loads(data)


# -- errors name the culprit's path ----------------------------------------------------------------


def _circular_list() -> list[Any]:
    items: list[Any] = ["a"]
    items.append(items)
    return items


def _mutual_dicts() -> dict[str, Any]:
    a: dict[str, Any] = {}
    b: dict[str, Any] = {"a": a}
    a["b"] = b
    return {"root": a}


def _circular_dataclass() -> Polygon:
    p = Polygon("loop", [])
    p.points.append(p)  # type: ignore[arg-type]
    return p


def _circular_model() -> Loose:
    m = Loose()
    m.anything = [m]
    return m


def _nested(levels: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


BAD = [
    pytest.param(Opaque(), "value", "Opaque", id="opaque-top-level"),
    pytest.param({"a": {"b": [1, Opaque()]}}, 'value["a"]["b"][1]', "Opaque", id="opaque-nested"),
    pytest.param((1, (2, Opaque())), "value[1][1]", "Opaque", id="opaque-in-tuples"),
    pytest.param(math.nan, "value", "finite", id="nan"),
    pytest.param(math.inf, "value", "finite", id="inf"),
    pytest.param(-math.inf, "value", "finite", id="-inf"),
    pytest.param({"x": [0.0, -math.inf]}, 'value["x"][1]', "finite", id="nested-inf"),
    pytest.param(Point(1, math.nan), "value.y", "finite", id="nan-in-dataclass"),
    pytest.param(
        Polygon("p", [Point(0, 0.0), Point(1, math.inf)]),
        "value.points[1].y",
        "finite",
        id="inf-in-nested-dataclass",
    ),
    pytest.param(Loose(number=math.nan), "value.number", "finite", id="nan-in-float-field"),
    pytest.param({math.nan}, "value[0]", "finite", id="nan-in-set"),
    pytest.param(2**64, "value", "64-bit", id="int-2**64"),
    pytest.param(-(2**63) - 1, "value", "64-bit", id="int-below-int64"),
    pytest.param({"big": [10**40]}, 'value["big"][0]', "64-bit", id="nested-huge-int"),
    pytest.param({1: "a"}, "value", "1", id="int-key"),
    pytest.param({"ok": {None: 1}}, 'value["ok"]', "None", id="none-key"),
    pytest.param({"ok": {(1, 2): 1}}, 'value["ok"]', "(1, 2)", id="tuple-key"),
    pytest.param({"ok": {True: 1}}, 'value["ok"]', "True", id="bool-key"),
    pytest.param("a\ud800b", "value", "surrogate", id="lone-surrogate"),
    pytest.param(["ok", {"k": "\udfff"}], 'value[1]["k"]', "surrogate", id="nested-surrogate"),
    pytest.param(_circular_list(), "value[1]", "circular", id="circular-list"),
    pytest.param(_mutual_dicts(), 'value["root"]["b"]["a"]', "circular", id="mutual-dicts"),
    pytest.param(_circular_dataclass(), "value.points[0]", "circular", id="circular-dataclass"),
    pytest.param(_circular_model(), "value.anything[0]", "circular", id="circular-model"),
    pytest.param(b"\x80abc", "value", "Base64Bytes", id="binary-bytes"),
    pytest.param(
        {'key with "quotes"': Opaque()}, 'value["key with \\"quotes\\""]', "Opaque", id="quoted-key"
    ),
]


@pytest.mark.parametrize(("value", "path", "reason"), BAD)
def test_errors_name_the_path_of_the_culprit(value: Any, path: str, reason: str) -> None:
    with pytest.raises(SerializationError) as info:
        Serializer().dumps(value)
    assert info.value.path == path
    assert reason in str(info.value)
    assert str(info.value).startswith(path)
    assert isinstance(info.value, FlujoError)
    assert isinstance(info.value, TypeError)
    assert not isinstance(info.value, PayloadTooLargeError)


def test_the_given_path_prefixes_the_culprits_path() -> None:
    with pytest.raises(SerializationError) as info:
        Serializer().dumps({"doc": {"pages": [math.nan]}}, "pipeline_context.scratchpad")
    assert info.value.path == 'pipeline_context.scratchpad["doc"]["pages"][0]'


def test_a_lone_surrogate_in_a_key_names_the_dict_holding_it() -> None:
    """Like a non-string key, a key that is not valid text is reported at its dict."""
    with pytest.raises(SerializationError) as info:
        Serializer().dumps({"ok": 1, "outer": {"\ud800": 1}})
    assert info.value.path == 'value["outer"]'


@pytest.mark.parametrize(
    ("model", "path"),
    [
        pytest.param(Loose(anything=math.nan), "value.anything", id="any-field"),
        pytest.param(Loose(mapping={"x": math.inf}), 'value.mapping["x"]', id="dict-any-field"),
        pytest.param(Loose(extra_field=-math.inf), "value.extra_field", id="extra-field"),
    ],
)
def test_nan_inside_a_pydantic_model_is_refused_not_stored_as_null(
    model: BaseModel, path: str
) -> None:
    """pydantic's JSON mode turns NaN in Any-typed fields into None; the store must refuse it."""
    with pytest.raises(SerializationError) as info:
        Serializer().dumps(model)
    assert info.value.path == path


def test_deep_nesting() -> None:
    assert loads(Serializer().dumps(_nested(200, "leaf"))) == _nested(200, "leaf")

    with pytest.raises(SerializationError) as info:
        Serializer().dumps({"deep": _nested(300, "leaf")}, "pipeline_context")
    assert info.value.path.startswith('pipeline_context["deep"][0][0]')
    assert "nested" in str(info.value)


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 2**64 - 1, 0, -1])
def test_64_bit_integers_are_kept_exactly(value: int) -> None:
    assert loads(Serializer().dumps({"n": value})) == {"n": value}


# -- payload limit ---------------------------------------------------------------------------------


def test_the_default_payload_limit() -> None:
    assert Serializer().max_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 32 * 1024 * 1024


def test_a_value_at_the_limit_passes_and_one_byte_more_fails() -> None:
    serializer = Serializer(max_bytes=100)
    assert len(serializer.dumps("x" * 98)) == 100

    with pytest.raises(PayloadTooLargeError) as info:
        serializer.dumps("x" * 99, "pipeline_context.doc")
    assert info.value.size == 101
    assert info.value.limit == 100
    assert info.value.path == "pipeline_context.doc"
    assert "max_payload_bytes" in str(info.value)
    assert isinstance(info.value, SerializationError)


def test_a_ten_megabyte_value_over_a_one_megabyte_limit() -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        Serializer(max_bytes=1_000_000).dumps({"blob": "y" * 10_000_000})
    assert info.value.size > 10_000_000
    assert info.value.path == "value"


def test_the_limit_counts_bytes_not_characters() -> None:
    serializer = Serializer(max_bytes=10)
    with pytest.raises(PayloadTooLargeError):
        serializer.dumps("ééééé")  # 5 characters, 12 bytes quoted


# -- a custom default (serializer_default) ---------------------------------------------------------


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


def test_a_custom_default_is_used_for_what_orjson_cannot_serialize() -> None:
    """AC-19."""
    seen: list[Any] = []

    def default(obj: Any) -> Any:
        seen.append(obj)
        if isinstance(obj, Money):
            return {"cents": obj.cents}
        if isinstance(obj, Decimal):
            return float(obj)
        raise TypeError(f"no idea how to store {type(obj).__name__}")

    serializer = Serializer(default)
    assert serializer.default is default
    data = serializer.dumps({"m": Money(5), "d": Decimal("0.5"), "when": AT, "l": [Money(1)]})

    assert loads(data) == {
        "m": {"cents": 5},
        "d": 0.5,
        "when": "2026-05-06T07:08:09.123456+00:00",  # orjson's own, the default is not asked
        "l": [{"cents": 1}],
    }
    assert {type(obj) for obj in seen} == {Money, Decimal}

    with pytest.raises(SerializationError) as info:
        serializer.dumps({"x": {"y": Opaque()}})
    assert info.value.path == 'value["x"]["y"]'
    assert "no idea how to store Opaque" in str(info.value)


def test_a_custom_default_replaces_the_flujo_default() -> None:
    serializer = Serializer(lambda obj: "custom")
    assert serializer.dumps({3, 1}) == b'"custom"'  # flujo's default would give [1,3]


def test_a_custom_default_that_raises_any_exception_gives_a_serialization_error() -> None:
    def default(obj: Any) -> Any:
        raise ValueError("refused by policy")

    with pytest.raises(SerializationError) as info:
        Serializer(default).dumps([1, Opaque()])
    assert info.value.path == "value[1]"
    assert "refused by policy" in str(info.value)


def test_a_custom_default_that_returns_its_argument_does_not_loop() -> None:
    with pytest.raises(SerializationError) as info:
        Serializer(lambda obj: obj).dumps({"x": Opaque()})
    assert info.value.path == 'value["x"]'


def test_nan_from_a_custom_default_is_refused() -> None:
    with pytest.raises(SerializationError) as info:
        Serializer(lambda obj: [math.nan]).dumps({"x": Opaque()})
    assert info.value.path == 'value["x"][0]'


# -- properties ------------------------------------------------------------------------------------

json_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(json_values)
def test_json_data_round_trips(value: Any) -> None:
    data = Serializer().dumps(value)
    assert loads(data) == value
    assert data == orjson.dumps(value)


@st.composite
def _value_with_a_culprit(draw: st.DrawFn) -> tuple[Any, str, Any]:
    """A nested value with one bad leaf somewhere, and the path flujo must report for it."""
    bad = draw(st.sampled_from([math.nan, math.inf, Opaque(), 2**70, "\ud800"]))
    value: Any = bad
    suffixes: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        siblings = draw(st.lists(json_values, max_size=2))
        if draw(st.booleans()):
            key = draw(json_text)
            others = dict(zip(draw(st.lists(json_text, max_size=2)), siblings, strict=False))
            others.pop(key, None)
            value = {**others, key: value}
            suffixes.append(f"[{json.dumps(key)}]")
        else:
            position = len(siblings)
            value = [*siblings, value]
            suffixes.append(f"[{position}]")
    return value, "value" + "".join(reversed(suffixes)), bad


@settings(max_examples=200, deadline=None, database=None)
@given(_value_with_a_culprit())
def test_the_reported_path_is_where_the_bad_value_sits(case: tuple[Any, str, Any]) -> None:
    value, path, _ = case
    with pytest.raises(SerializationError) as info:
        Serializer().dumps(value)
    assert info.value.path == path
