# The tutorial's step 1 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines). tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001, F401 - the tutorial's own style, kept
from flujo.routines import Routine
from flujo.routines import immediate_policy
from flujo.routines import Flow
from flujo.routines import Runtime
from flujo.routines import FlowRegistry
import json


class SimpleProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.input = self.add_slot("input")
        self.output = self.add_event("output", ["result"])

        def process(slot_data, policy_message, job_state):
            input_list = slot_data.get("input", [])
            data_value = input_list[0].get("data", "") if input_list else ""
            result = f"Processed: {data_value}"
            self.emit("output", result=result)

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


# Create flow
flow = Flow(flow_id="serializable_flow")
processor = SimpleProcessor()
flow.add_routine(processor, "processor")

# Serialize flow structure (no execution state)
flow_data = flow.serialize()

# Save to file
with open("flow.json", "w") as f:
    json.dump(flow_data, f, indent=2)

print("Flow serialized to flow.json")
print(f"Flow ID: {flow_data['flow_id']}")
print(f"Routines: {list(flow_data['routines'].keys())}")
