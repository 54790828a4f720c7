"""corral: a local model server speaking OpenAI's and Ollama's APIs over llama.cpp."""

__version__ = "0.1.0"
