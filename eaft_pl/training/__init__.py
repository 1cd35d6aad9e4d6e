"""What makes a fit reliable and scalable: exact resume, graceful stops, atomic checkpoints, non-finite
step handling, sharding strategies and full-weight gathers, LoRA, and export to a Hugging Face folder."""
