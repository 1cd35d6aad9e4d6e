"""Loading and building causal language models and their tokenizers (Hugging Face folders, hub ids,
model configs) and the character tokenizer of the built-in examples."""
