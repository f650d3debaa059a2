"""Package data: the bundled default model (default/) and its task (spell_task)."""
