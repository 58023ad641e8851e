# The tutorial's step 6 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines) plus the FIX lines. tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001, UP015, F841, RUF059 - the tutorial's own style, kept
from flujo.routines import Routine
from flujo.routines import immediate_policy
from flujo.routines import Flow
from flujo.routines import Runtime
from flujo.routines import FlowRegistry
from flujo.routines import JobState  # FIX: needed by the line that restores the JobState
import json


class DataProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.input = self.add_slot("input")
        self.output = self.add_event("output", ["result"])

        def process(slot_data, policy_message, job_state):
            input_list = slot_data.get("input", [])
            data_value = input_list[0].get("data", 0) if input_list else 0
            result = data_value * 2
            self.emit("output", result=result)

            # Store execution count
            # FIX: moved into the logic; the tutorial runs these three lines in __init__,
            # where there is no job_state
            state = job_state.get_routine_state("processor", {})
            count = state.get("count", 0)
            job_state.update_routine_state("processor", {"count": count + 1})

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


def save_workflow_structure():
    """Save workflow structure for distribution"""
    flow = Flow(flow_id="distributed_workflow")

    processor = DataProcessor()
    flow.add_routine(processor, "processor")

    # Serialize flow structure only (no execution state)
    flow_data = flow.serialize()

    with open("workflow_structure.json", "w") as f:
        json.dump(flow_data, f, indent=2)

    print("Workflow structure saved to workflow_structure.json")
    return flow


def execute_and_save_state():
    """Execute workflow and save execution state"""
    # Load workflow structure
    with open("workflow_structure.json", "r") as f:
        flow_data = json.load(f)

    flow = Flow.deserialize(flow_data)

    # Register
    FlowRegistry.get_instance().register_by_name("distributed_workflow", flow)

    # Execute
    with Runtime(thread_pool_size=5) as runtime:
        job_state = runtime.exec("distributed_workflow", entry_params={"data": 10})

        # Save execution state
        job_state_data = job_state.serialize()

        with open("execution_state.json", "w") as f:
            json.dump(job_state_data, f, indent=2)

        print(f"Execution state saved. Job ID: {job_state.job_id}")
        return job_state


def restore_on_remote_host():
    """Simulate restoring on a remote host"""
    # Load workflow structure
    with open("workflow_structure.json", "r") as f:
        flow_data = json.load(f)

    # Load execution state
    with open("execution_state.json", "r") as f:
        job_state_data = json.load(f)

    # Restore both
    flow = Flow.deserialize(flow_data)
    # FIX: the tutorial uses the dict itself as a JobState
    saved_state = JobState.deserialize(job_state_data)

    print(f"Restored flow: {flow.flow_id}")
    print(f"Restored Job ID: {saved_state.job_id}, Status: {saved_state.status}")

    # Verify state is preserved
    processor = flow.routines["processor"]
    state = saved_state.get_routine_state("processor", {})
    count = state.get("count", 0)

    print(f"Execution count: {count}")

    return flow, saved_state


def main():
    # Step 1: Save workflow structure
    save_workflow_structure()

    # Step 2: Execute and save state
    job_state = execute_and_save_state()

    # Step 3: Simulate restoring on remote host
    restored_flow, restored_job_state = restore_on_remote_host()


if __name__ == "__main__":
    main()
