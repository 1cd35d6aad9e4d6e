"""Loading and building causal language models and their tokenizers (Hugging Face folders, hub ids,
GGUF files and installed model packages by short name, model configs) and the character tokenizer
of the built-in examples."""
