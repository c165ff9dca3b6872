"""peftkit serve: one base model, many adapters, an OpenAI-compatible server (and a hand-over to vLLM)."""
