"""LoRA adapters in peft's format for encdec (entry point ``encdec`` -> ``lora``)."""
