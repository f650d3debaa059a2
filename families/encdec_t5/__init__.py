"""T5 family plugin: T5, T5 v1.1 / Flan-T5, mT5, ByT5 and UMT5."""
