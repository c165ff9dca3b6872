"""Paths of the assets bundled inside the package (no network needed).

``stories260k``: a real pretrained 260K-parameter Llama trained on TinyStories (MIT licence, see
``assets/stories260k/LICENSE`` and ``ORIGIN.md``), as a Hugging Face folder with its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def model_path(name: str = "stories260k") -> Path:
    """The folder of a bundled model, loadable with ``AutoModelForCausalLM.from_pretrained``."""
    from .errors import PeftkitError

    path = ASSETS_DIR / name
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())
        raise PeftkitError(f"No bundled model {name!r}; bundled models: {known}.")
    return path


def load_model(name: str = "stories260k", **kwargs):
    """The bundled causal LM (float32, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
