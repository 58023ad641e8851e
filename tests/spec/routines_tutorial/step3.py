# The tutorial's step 3 program (spec 004) as written: only its import lines changed
# (routilux -> flujo.routines) plus one FIX line. tests/spec/test_routines_tutorial.py runs it.
# ruff: noqa: I001 - the tutorial's own style, kept
from flujo.routines import Routine
from flujo.routines import immediate_policy
from flujo.routines import Flow  # FIX: the tutorial uses Flow without importing it


class ConfigurableProcessor(Routine):
    """Correct: Uses _config for configuration"""

    def __init__(self):
        super().__init__()
        self.input = self.add_slot("input")
        self.output = self.add_event("output", ["result"])
        # Configuration stored in _config (serializable)
        self.set_config(threshold=10, enabled=True)

        def process(slot_data, policy_message, job_state):
            threshold = self.get_config("threshold", default=5)
            enabled = self.get_config("enabled", default=False)

            if enabled:
                input_list = slot_data.get("input", [])
                data_value = input_list[0].get("data", 0) if input_list else 0
                result = data_value * threshold
                self.emit("output", result=result)

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


# Create flow
flow = Flow(flow_id="config_flow")
processor = ConfigurableProcessor()
flow.add_routine(processor, "processor")

# Serialize (configuration is preserved)
flow_data = flow.serialize()

# Deserialize
restored_flow = Flow.deserialize(flow_data)

# Verify configuration preserved
restored_processor = restored_flow.routines["processor"]
threshold = restored_processor.get_config("threshold")
enabled = restored_processor.get_config("enabled", False)

print(f"Restored threshold: {threshold}")
print(f"Restored enabled: {enabled}")
