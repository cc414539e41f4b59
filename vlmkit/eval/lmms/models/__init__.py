"""What lmms-eval reads from a plugin: its model entries, `{name: class name}` in the module of that name."""

AVAILABLE_MODELS = {"vlmkit": "VlmkitLMM"}
