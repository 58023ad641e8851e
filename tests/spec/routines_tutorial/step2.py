# The tutorial's step 2 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines). tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001, UP015 - the tutorial's own style, kept
from flujo.routines import Flow
from flujo.routines import Runtime
from flujo.routines import FlowRegistry
import json

# Load from file
with open("flow.json", "r") as f:
    flow_data = json.load(f)

# Deserialize flow (create new instance and deserialize)
restored_flow = Flow.deserialize(flow_data)

print(f"Restored flow ID: {restored_flow.flow_id}")
print(f"Routines: {list(restored_flow.routines.keys())}")

# Register with FlowRegistry
FlowRegistry.get_instance().register_by_name("restored_flow", restored_flow)

# Execute restored flow
with Runtime(thread_pool_size=5) as runtime:
    job_state = runtime.exec("restored_flow", entry_params={"data": "test"})
    runtime.wait_until_all_jobs_finished(timeout=5.0)

    print(f"Execution status: {job_state.status}")
