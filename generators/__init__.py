"""The diffusion generator: building it, DDIM sampling with log-probs, LoRA, fine-tuning, data."""
