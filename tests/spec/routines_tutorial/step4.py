# The tutorial's step 4 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines). tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001 - the tutorial's own style, kept
from flujo.routines import Routine
from flujo.routines import immediate_policy
from flujo.routines import Flow
from flujo.routines import Runtime
from flujo.routines import FlowRegistry


class DataSource(Routine):
    def __init__(self):
        super().__init__()
        self.trigger = self.add_slot("trigger")
        self.output = self.add_event("output", ["data"])

        def generate(slot_data, policy_message, job_state):
            trigger_list = slot_data.get("trigger", [])
            data = trigger_list[0].get("data", "test_data") if trigger_list else "test_data"
            self.emit("output", data=data)

        self.set_logic(generate)
        self.set_activation_policy(immediate_policy())


class Processor(Routine):
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
flow = Flow(flow_id="recovery_flow")

source = DataSource()
processor = Processor()

flow.add_routine(source, "source")
flow.add_routine(processor, "processor")
flow.connect("source", "output", "processor", "input")

# Register and execute
FlowRegistry.get_instance().register_by_name("recovery_flow", flow)

with Runtime(thread_pool_size=5) as runtime:
    job_state = runtime.exec("recovery_flow", entry_params={"data": "important_data"})

    # Save JobState to file
    job_state.save("workflow_state.json")
    print(f"JobState saved. Status: {job_state.status}")
    print(f"Job ID: {job_state.job_id}")
