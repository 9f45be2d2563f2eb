"""Model-library plumbing kept apart from the kernels: Hugging Face targets and loading, PEFT."""
