"""orion-llamaccp: serve GGUF models with llama.cpp's llama-server on the Orion bus."""

__version__ = "0.1.0"
