"""The run configuration: the typed `RunConfig` schema (`schema`) and its YAML loading with dotted
overrides and located errors (`loading`).

Names of losses, estimators and aggregations come from the registries, and their valid pairings
from the loss recipes, so the schema imports the algorithm to check them once, at load time.

May import: pydantic, PyYAML, `megatron_dapo.algo` and `pipeline` (whose config sections it
composes). Never Megatron.
"""
