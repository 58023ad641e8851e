"""flujo.routines: routines, policies, flows, their serialization and the registries."""

from __future__ import annotations

import builtins
import importlib
import json
from collections import deque
from typing import Any

import pytest

from flujo.exceptions import (
    ConfigurationError,
    EmitError,
    FlowError,
    FlowNotFoundError,
    InvalidRoutineIdError,
    RoutineNotSerializableError,
    SerializationError,
    UnknownRoutineClassError,
)
from flujo.routines import (
    AllSlotsReadyPolicy,
    BatchSizePolicy,
    Connection,
    Flow,
    FlowRegistry,
    ImmediatePolicy,
    Routine,
    all_slots_ready_policy,
    batch_size_policy,
    immediate_policy,
    register_serializable,
)
from flujo.routines.job_state import Delivery
from flujo.routines.routine import find_routine_class, routine_class_name

from .test_routines_helpers import Node, relay


class Doubler(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.input = self.add_slot("input")
        self.output = self.add_event("output", ["result"])
        self.set_config(factor=2, label="x2")

        def double(slot_data: Any, policy_message: Any, job_state: Any) -> None:
            value = slot_data["input"][0]["value"]
            self.emit("output", result=value * self.get_config("factor"))

        self.set_logic(double)


class Joiner(Routine):
    def __init__(self) -> None:
        super().__init__()
        self.add_slot("left")
        self.add_slot("right")
        self.add_event("output")
        self.set_activation_policy(all_slots_ready_policy())


class Parameterized(Routine):
    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold


class WithDefaults(Routine):
    def __init__(self, threshold: int = 10) -> None:
        super().__init__()
        self.set_config(threshold=threshold)


def queues(**lengths: int) -> dict[str, deque[Delivery]]:
    """Slot queues holding ``n`` messages each; ids increase in keyword order."""
    out: dict[str, deque[Delivery]] = {}
    ident = 0
    for slot, n in lengths.items():
        out[slot] = deque()
        for _ in range(n):
            out[slot].append(Delivery(ident, None, None, "r", slot, {}))
            ident += 1
    return out


# -- routines --------------------------------------------------------------------------------------


def test_a_routine_declares_slots_events_config_logic_and_policy() -> None:
    routine = Doubler()
    assert list(routine.slots) == ["input"]
    assert routine.input.name == "input"
    assert routine.output.params == frozenset({"result"})
    assert list(routine.events) == ["output"]
    assert routine.get_config("factor") == 2
    assert routine.get_config("missing") is None
    assert routine.get_config("missing", "fallback") == "fallback"
    assert routine.config == {"factor": 2, "label": "x2"}
    assert routine.logic is not None
    assert routine.activation_policy is immediate_policy()
    assert routine.routine_id is None
    assert routine.get_slot("input") is routine.input
    assert routine.get_event("nope") is None


def test_declaring_twice_or_with_bad_names_is_refused() -> None:
    routine = Routine()
    routine.add_slot("input")
    with pytest.raises(FlowError):
        routine.add_slot("input")
    routine.add_event("output")
    with pytest.raises(FlowError):
        routine.add_event("output")
    for bad in ("", "a/b", "../x", ".hidden", "x" * 129, "a\x00b", "sp ace"):
        with pytest.raises(InvalidRoutineIdError):
            routine.add_slot(bad)
        with pytest.raises(InvalidRoutineIdError):
            routine.add_event(bad)
    with pytest.raises(ConfigurationError):
        routine.add_event("e2", "result")  # a string, not a list of names
    with pytest.raises(ConfigurationError):
        routine.add_event("e3", [1])  # type: ignore[list-item]


def test_logic_and_policy_are_checked() -> None:
    routine = Routine()
    with pytest.raises(ConfigurationError):
        routine.set_logic("not callable")  # type: ignore[arg-type]

    async def coroutine(slot_data: Any, message: Any, job_state: Any) -> None:
        return None

    with pytest.raises(ConfigurationError, match="coroutine"):
        routine.set_logic(coroutine)
    with pytest.raises(ConfigurationError):
        routine.set_activation_policy("immediate")  # type: ignore[arg-type]


def test_emit_outside_logic_is_a_typed_error() -> None:
    routine = Doubler()
    with pytest.raises(EmitError) as caught:
        routine.emit("output", result=1)
    assert caught.value.event == "output"
    with pytest.raises(EmitError):
        routine.output.emit(result=1)


# -- policies --------------------------------------------------------------------------------------


def test_immediate_policy_takes_the_oldest_message_of_any_slot() -> None:
    policy = immediate_policy()
    assert isinstance(policy, ImmediatePolicy)
    assert policy.select(queues(a=0, b=0)) is None
    assert policy.select(queues(a=2)) == (("a", 1),)
    assert policy.select({"a": queues(x=3)["x"], "b": deque()}) == (("a", 1),)
    q = queues(a=1, b=1)
    q["a"][0].id = 9  # b's message is older now
    assert policy.select(q) == (("b", 1),)
    assert dict(policy.message) == {"policy": "immediate"}


def test_all_slots_ready_policy_waits_for_every_slot() -> None:
    policy = all_slots_ready_policy()
    assert isinstance(policy, AllSlotsReadyPolicy)
    assert policy.select({}) is None
    assert policy.select(queues(a=1, b=0)) is None
    assert policy.select(queues(a=2, b=1)) == (("a", 1), ("b", 1))


def test_batch_size_policy_takes_full_batches() -> None:
    policy = batch_size_policy(3)
    assert isinstance(policy, BatchSizePolicy)
    assert policy.select(queues(a=2, b=2)) is None
    assert policy.select(queues(a=2, b=3)) == (("b", 3),)
    assert policy.select(queues(a=4, b=3)) == (("a", 3),)  # a's head is older
    assert dict(policy.message) == {"policy": "batch_size", "size": 3}
    assert policy == batch_size_policy(3)
    assert policy != batch_size_policy(2)
    assert hash(policy) == hash(batch_size_policy(3))
    assert repr(policy) == "BatchSizePolicy(size=3)"
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError):
            batch_size_policy(bad)  # type: ignore[arg-type]


# -- flows -----------------------------------------------------------------------------------------


def test_a_flow_adds_routines_and_connects_events_to_slots() -> None:
    flow = Flow("orders")
    source, target = Doubler(), Doubler()
    assert flow.add_routine(source, "source") == "source"
    flow.add_routine(target, "target")
    connection = flow.connect("source", "output", "target", "input")
    assert connection == Connection("source", "output", "target", "input")
    assert flow.connections == (connection,)
    assert list(flow.routines) == ["source", "target"]
    assert flow.routines["source"] is source
    assert source.routine_id == "source"
    with pytest.raises(TypeError):
        flow.routines["x"] = Doubler()  # type: ignore[index]
    assert "orders" in repr(flow)
    assert "source" in repr(source)


def test_flow_definition_errors_are_typed() -> None:
    flow = Flow("f")
    routine = Doubler()
    flow.add_routine(routine, "a")
    with pytest.raises(FlowError, match="already has a routine"):
        flow.add_routine(Doubler(), "a")
    with pytest.raises(FlowError, match="already"):
        Flow("g").add_routine(routine, "b")  # one routine object belongs to one flow
    with pytest.raises(FlowError):
        flow.add_routine("not a routine", "c")  # type: ignore[arg-type]
    flow.add_routine(Doubler(), "b")
    with pytest.raises(FlowError, match="no routine"):
        flow.connect("a", "output", "zz", "input")
    with pytest.raises(FlowError, match="no event"):
        flow.connect("a", "nope", "b", "input")
    with pytest.raises(FlowError, match="no slot"):
        flow.connect("a", "output", "b", "nope")
    flow.connect("a", "output", "b", "input")
    with pytest.raises(FlowError, match="already has"):
        flow.connect("a", "output", "b", "input")

    class Forgetful(Routine):
        def __init__(self) -> None:  # does not call super().__init__()
            pass

    with pytest.raises(FlowError, match="super"):
        flow.add_routine(Forgetful(), "forgetful")


@pytest.mark.parametrize(
    "bad", ["", "..", "../../etc/passwd", "/abs", "a/b", "a\\b", "a\x00b", "x" * 10_000, 7, None]
)
def test_bad_routine_and_flow_ids_are_refused(bad: Any) -> None:
    flow = Flow("f")
    with pytest.raises(InvalidRoutineIdError) as caught:
        flow.add_routine(Doubler(), bad)
    assert caught.value.flow_id == "f"
    if bad is not None:
        with pytest.raises(InvalidRoutineIdError):
            Flow(bad)
    with pytest.raises(InvalidRoutineIdError):
        FlowRegistry().register_by_name(bad, flow)


def test_a_flow_without_id_gets_one() -> None:
    assert len(Flow().flow_id) == 32


def test_the_plan_compiles_routes_and_entries_and_follows_changes() -> None:
    flow = Flow("f")
    flow.add_routine(Doubler(), "a")
    flow.add_routine(Joiner(), "j")
    flow.add_routine(Routine(), "no_slots")
    plan = flow.plan()
    assert plan.entries == (("a", "input"), ("j", "left"))
    assert flow.plan() is plan
    flow.connect("a", "output", "j", "right")
    changed = flow.plan()
    assert changed is not plan
    assert changed.routes["a"] == {"output": (("j", "right"),)}
    assert changed.entries == (("a", "input"),)
    flow.routines["a"].add_slot("extra")
    assert flow.plan().slots["a"] == ("input", "extra")


# -- serialization ---------------------------------------------------------------------------------


def two_step_flow() -> Flow:
    flow = Flow("pipeline_v2")
    first, second = Doubler(), Doubler()
    second.set_config(factor=10, nested={"list": [1, 2.5, None, True]})
    flow.add_routine(first, "first")
    flow.add_routine(second, "second")
    flow.add_routine(Joiner(), "join")
    flow.connect("first", "output", "second", "input")
    flow.connect("second", "output", "join", "left")
    return flow


def test_serialize_gives_structure_and_config_as_json_data() -> None:
    data = two_step_flow().serialize()
    assert json.loads(json.dumps(data)) == data
    assert data["flow_id"] == "pipeline_v2"
    assert list(data["routines"]) == ["first", "second", "join"]
    assert data["routines"]["first"] == {
        "class": f"{__name__}.Doubler",
        "config": {"factor": 2, "label": "x2"},
    }
    assert data["routines"]["second"]["config"]["nested"] == {"list": [1, 2.5, None, True]}
    assert data["connections"] == [
        {"source": "first", "event": "output", "target": "second", "slot": "input"},
        {"source": "second", "event": "output", "target": "join", "slot": "left"},
    ]
    assert data["format"] == "flujo.routines.flow/1"


def test_deserialize_restores_classes_config_logic_policy_and_connections() -> None:
    original = two_step_flow()
    restored = Flow.deserialize(json.loads(json.dumps(original.serialize())))
    assert restored.flow_id == "pipeline_v2"
    assert restored.connections == original.connections
    second = restored.routines["second"]
    assert type(second) is Doubler
    assert second.get_config("factor") == 10
    assert second.get_config("label") == "x2"
    assert second.logic is not None
    assert second.routine_id == "second"
    assert restored.routines["join"].activation_policy == all_slots_ready_policy()
    assert restored.serialize() == original.serialize()


def test_deserialize_copies_the_config_it_is_given() -> None:
    data = two_step_flow().serialize()
    restored = Flow.deserialize(data)
    data["routines"]["second"]["config"]["nested"]["list"].append("changed")
    assert restored.routines["second"].get_config("nested") == {"list": [1, 2.5, None, True]}


def test_deserialize_never_imports_anything() -> None:
    data = two_step_flow().serialize()
    hostile = {**data, "routines": {"x": {"class": "os.system", "config": {}}}}
    imported: list[Any] = []
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def spy(*args: Any, **kwargs: Any) -> Any:
        imported.append(args[:1])
        return real_import(*args, **kwargs)

    def spy_module(*args: Any, **kwargs: Any) -> Any:
        imported.append(args[:1])
        return real_import_module(*args, **kwargs)

    builtins.__import__, importlib.import_module = spy, spy_module  # type: ignore[assignment]
    try:
        restored = Flow.deserialize(data)
        with pytest.raises(UnknownRoutineClassError):
            Flow.deserialize(hostile)
    finally:
        builtins.__import__, importlib.import_module = real_import, real_import_module
    assert imported == []
    assert list(restored.routines) == ["first", "second", "join"]


@pytest.mark.parametrize(
    "name",
    ["os.system", "subprocess.Popen", "builtins.eval", "flujo.routines.Runtime", "NoSuchClass"],
)
def test_an_unknown_class_is_a_typed_error(name: str) -> None:
    data = two_step_flow().serialize()
    data["routines"]["second"]["class"] = name
    with pytest.raises(UnknownRoutineClassError) as caught:
        Flow.deserialize(data)
    assert caught.value.class_name == name
    assert caught.value.path == "routines.second.class"
    assert caught.value.flow_id == "pipeline_v2"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda d: d.update(routines=[]), "routines"),
        (lambda d: d.update(connections={}), "connections"),
        (lambda d: d.update(format="other/9"), "format"),
        (lambda d: d["routines"]["first"].update({"class": 5}), "routines.first.class"),
        (lambda d: d["routines"].update(first="Doubler"), "routines.first"),
        (lambda d: d["routines"]["first"].update(config=[1]), "routines.first.config"),
        (lambda d: d["routines"]["first"].update(config={"x": object()}), "routines.first.config"),
        (lambda d: d["connections"].append({"source": "first"}), "connections[2]"),
        (lambda d: d["connections"].append(["first"]), "connections[2]"),
        (
            lambda d: d["connections"].append(
                {"source": "first", "event": "output", "target": "nope", "slot": "input"}
            ),
            "connections[2]",
        ),
    ],
)
def test_malformed_flow_data_is_a_typed_error(mutate: Any, path: str) -> None:
    data = two_step_flow().serialize()
    mutate(data)
    with pytest.raises(FlowError) as caught:
        Flow.deserialize(data)
    assert caught.value.path == path


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "flow",
        {},
        {"flow_id": "../x", "routines": {}},
        {"flow_id": "f", "routines": {"../../etc/passwd": {"class": "x"}}},
    ],
)
def test_garbage_instead_of_flow_data_is_a_typed_error(data: Any) -> None:
    with pytest.raises(FlowError):
        Flow.deserialize(data)


def test_deeply_nested_config_is_a_typed_error() -> None:
    data = two_step_flow().serialize()
    deep: Any = []
    for _ in range(1000):
        deep = [deep]
    data["routines"]["first"]["config"] = {"deep": deep}
    with pytest.raises(FlowError):
        Flow.deserialize(data)


def test_a_routine_needing_constructor_arguments_fails_at_serialize_naming_its_class() -> None:
    flow = Flow("f")
    flow.add_routine(Parameterized(3), "bad")  # adding and running are fine
    with pytest.raises(RoutineNotSerializableError) as caught:
        flow.serialize()
    error = caught.value
    assert error.class_name == f"{__name__}.Parameterized"
    assert error.routine_id == "bad"
    assert error.path == "routines.bad"
    assert "Parameterized" in str(error)
    assert "threshold" in str(error)
    assert isinstance(error, SerializationError)


def test_constructor_arguments_with_defaults_are_fine() -> None:
    flow = Flow("f")
    flow.add_routine(WithDefaults(), "ok")
    assert Flow.deserialize(flow.serialize()).routines["ok"].get_config("threshold") == 10


def test_a_routine_changed_after_construction_cannot_be_serialized() -> None:
    changes = [
        lambda r: r.add_slot("extra"),
        lambda r: r.add_event("extra"),
        lambda r: r.set_activation_policy(batch_size_policy(2)),
    ]
    for change in changes:
        flow = Flow("f")
        routine = Doubler()
        change(routine)
        flow.add_routine(routine, "r")
        with pytest.raises(RoutineNotSerializableError, match="differs"):
            flow.serialize()
    flow = Flow("f")
    plain = Routine()
    plain.set_logic(lambda slot_data, message, job_state: None)
    flow.add_routine(plain, "r")
    with pytest.raises(RoutineNotSerializableError, match="logic"):
        flow.serialize()


def test_a_routine_whose_constructor_raises_cannot_be_serialized() -> None:
    class Flaky(Routine):
        built = 0

        def __init__(self) -> None:
            super().__init__()
            type(self).built += 1
            if type(self).built > 1:
                raise RuntimeError("only once")

    flow = Flow("f")
    flow.add_routine(Flaky(), "r")
    with pytest.raises(RoutineNotSerializableError, match="only once"):
        flow.serialize()


def test_config_that_is_not_json_data_fails_at_serialize_naming_the_path() -> None:
    for value in ({1, 2}, object(), float("nan"), b"\xff", {"nested": float("inf")}):
        flow = Flow("f")
        routine = Doubler()
        routine.set_config(bad=value)
        flow.add_routine(routine, "r")
        with pytest.raises(SerializationError) as caught:
            flow.serialize()
        assert caught.value.path.startswith("routines.r.config")


def test_routines_configured_by_constructor_arguments_are_not_serializable() -> None:
    flow = Flow("f")
    flow.add_routine(Node(), "plain")  # optional arguments left at their defaults: fine
    assert Flow.deserialize(flow.serialize()).routines["plain"].logic is None
    flow.add_routine(Node(relay, slots=("a", "b")), "configured")
    with pytest.raises(RoutineNotSerializableError, match="differs"):
        flow.serialize()


# -- the class registry ----------------------------------------------------------------------------


def test_every_subclass_is_registered_under_module_and_qualname() -> None:
    assert find_routine_class(f"{__name__}.Doubler") is Doubler
    assert find_routine_class("flujo.routines.routine.Routine") is Routine
    assert routine_class_name(Doubler) == f"{__name__}.Doubler"


def test_the_newest_definition_of_a_class_wins() -> None:
    def define() -> type[Routine]:
        class Redefined(Routine):
            pass

        return Redefined

    old, new = define(), define()
    assert find_routine_class(routine_class_name(new)) is new
    flow = Flow("f")
    flow.add_routine(old(), "old")
    with pytest.raises(RoutineNotSerializableError, match="newer"):
        flow.serialize()


def test_register_serializable_gives_a_stable_name() -> None:
    @register_serializable(name="acme.Stable")
    class Stable(Routine):
        pass

    assert routine_class_name(Stable) == "acme.Stable"
    assert find_routine_class("acme.Stable") is Stable
    flow = Flow("f")
    flow.add_routine(Stable(), "s")
    data = flow.serialize()
    assert data["routines"]["s"]["class"] == "acme.Stable"
    assert type(Flow.deserialize(data).routines["s"]) is Stable

    @register_serializable
    class Bare(Routine):
        pass

    assert routine_class_name(Bare).endswith("Bare")

    class Other(Routine):
        pass

    with pytest.raises(ConfigurationError, match="taken"):
        register_serializable(Other, name="acme.Stable")
    with pytest.raises(ConfigurationError):
        register_serializable(dict)  # type: ignore[type-var]
    with pytest.raises(InvalidRoutineIdError):
        register_serializable(Other, name="bad name")


# -- the flow registry -----------------------------------------------------------------------------


def test_flow_registry_by_name() -> None:
    registry = FlowRegistry()
    flow = Flow("f")
    registry.register_by_name("alias", flow)
    registry.register(flow)
    assert registry.get("alias") is flow
    assert registry.get_by_name("f") is flow
    assert registry.names() == ["alias", "f"]
    assert registry.get("missing") is None
    with pytest.raises(FlowNotFoundError) as caught:
        registry.get_by_name("missing")
    assert caught.value.name == "missing"
    with pytest.raises(FlowError):
        registry.register_by_name("x", "not a flow")  # type: ignore[arg-type]
    assert registry.unregister("alias") is True
    assert registry.unregister("alias") is False
    registry.clear()
    assert registry.names() == []


def test_the_process_wide_registry_is_one_object() -> None:
    assert FlowRegistry.get_instance() is FlowRegistry.get_instance()
