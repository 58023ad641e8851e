# The tutorial's step 5 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines). tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001, UP015, E402 - the tutorial's own style, kept
from flujo.routines import Routine
from flujo.routines import immediate_policy
from flujo.routines import Flow
from flujo.routines import Runtime
from flujo.routines import FlowRegistry
import json


class DataSource(Routine):
    def __init__(self):
        super().__init__()
        self.trigger = self.add_slot("trigger")
        self.output = self.add_event("output", ["data"])

        def generate(slot_data, policy_message, job_state):
            trigger_list = slot_data.get("trigger", [])
            data = trigger_list[0].get("data", "default") if trigger_list else "default"
            self.emit("output", data=data)

        self.set_logic(generate)
        self.set_activation_policy(immediate_policy())


class Processor(Routine):
    def __init__(self):
        super().__init__()
        self.input = self.add_slot("input")
        self.output = self.add_event("output", ["result"])

        def process(slot_data, policy_message, job_state):
            # Check if resuming from previous execution
            state = job_state.get_routine_state("processor", {})
            processed_count = state.get("count", 0)

            input_list = slot_data.get("input", [])
            data_value = input_list[0].get("data", "") if input_list else ""

            # Store new count
            job_state.update_routine_state("processor", {"count": processed_count + 1})

            result = f"Processed: {data_value} (attempt #{processed_count + 1})"
            print(result)

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


# Create flow
flow = Flow(flow_id="resume_flow")

source = DataSource()
processor = Processor()

flow.add_routine(source, "source")
flow.add_routine(processor, "processor")
flow.connect("source", "output", "processor", "input")

# Register
FlowRegistry.get_instance().register_by_name("resume_flow", flow)

# First execution
with Runtime(thread_pool_size=5) as runtime:
    job_state1 = runtime.exec("resume_flow", entry_params={"data": "first_input"})

    # Save state
    job_state1.save("state1.json")
    print(f"First execution. Job ID: {job_state1.job_id}")

# Later, load and resume
with open("state1.json", "r") as f:
    state_data = json.load(f)

# Restore JobState
from flujo.routines import JobState

saved_state = JobState.deserialize(state_data)

print(f"Loaded JobState. Status: {saved_state.status}")
print(f"Original Job ID: {saved_state.job_id}")

# Resume execution
with Runtime(thread_pool_size=5) as runtime:
    # Resume with saved state
    job_state2 = runtime.exec("resume_flow", job_state=saved_state)

    runtime.wait_until_all_jobs_finished(timeout=5.0)

    print(f"Resumed execution. Status: {job_state2.status}")
