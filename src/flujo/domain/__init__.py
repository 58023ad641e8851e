"""Steps, pipelines and the data models a run works with."""
