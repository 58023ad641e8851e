"""flujo.routines: event-driven workflows of routines, slots and events, on flujo's stores.

A :class:`Routine` receives messages in slots and emits events; a :class:`Flow` connects events
to slots; a :class:`Runtime` runs jobs of registered flows on a thread pool, each job's state in
a :class:`JobState`. With a ``state_backend``, every routine activation commits atomically (its
state update, the messages it emitted, the consumption of its inputs) and ``Runtime.resume``
continues a job after a crash without re-running committed work. See ``docs/routines.md``.

>>> from flujo.routines import Flow, FlowRegistry, Routine, Runtime
>>> class Hello(Routine):
...     def __init__(self):
...         super().__init__()
...         self.add_slot("input")
...         self.set_logic(lambda slot_data, policy, job_state: print("hello", slot_data))
>>> flow = Flow("hello_flow")
>>> _ = flow.add_routine(Hello(), "hello")
>>> registry = FlowRegistry()
>>> registry.register(flow)
>>> with Runtime(thread_pool_size=2, registry=registry) as runtime:
...     print(runtime.exec("hello_flow", entry_params={"name": "x"}).status)
hello {'input': [{'name': 'x'}]}
completed
"""

from flujo.exceptions import (
    EmitError,
    FlowError,
    FlowNotFoundError,
    InvalidRoutineIdError,
    JobFlowMismatchError,
    JobStateError,
    RoutineNotSerializableError,
    UnknownRoutineClassError,
)
from flujo.routines.flow import Connection, Flow
from flujo.routines.job_state import JobState, JobStatus
from flujo.routines.policies import (
    ActivationPolicy,
    AllSlotsReadyPolicy,
    BatchSizePolicy,
    ImmediatePolicy,
    all_slots_ready_policy,
    batch_size_policy,
    immediate_policy,
)
from flujo.routines.registry import FlowRegistry
from flujo.routines.routine import Event, Routine, Slot, register_serializable
from flujo.routines.runtime import Runtime

__all__ = [
    "ActivationPolicy",
    "AllSlotsReadyPolicy",
    "BatchSizePolicy",
    "Connection",
    "EmitError",
    "Event",
    "Flow",
    "FlowError",
    "FlowNotFoundError",
    "FlowRegistry",
    "ImmediatePolicy",
    "InvalidRoutineIdError",
    "JobFlowMismatchError",
    "JobState",
    "JobStateError",
    "JobStatus",
    "Routine",
    "RoutineNotSerializableError",
    "Runtime",
    "Slot",
    "UnknownRoutineClassError",
    "all_slots_ready_policy",
    "batch_size_policy",
    "immediate_policy",
    "register_serializable",
]
