"""The adapter's model card (``README.md``), as Hugging Face PEFT writes it and the Hub reads it.

The YAML front matter gets ``library_name: peft``, the tags (the method, ``peftkit``,
``base_model:adapter:<id>``), ``pipeline_tag: text-generation`` for causal LMs and ``base_model: <id>``
when the base model has a Hub name (a local folder or an in-process model has none, and the Hub
rejects a path there). An existing card keeps its text and its own front matter fields; a card that
does not exist yet is written with a body saying what the adapter is and how to load it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import warnings
from typing import Any, Optional

import yaml

from ._io import atomic_write_bytes
from .errors import PeftkitWarning

FORMAT_VERSION = "0.21.2"  # the Hugging Face PEFT version whose folder format peftkit writes
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def model_hub_name(model: Any) -> Optional[str]:
    """The Hub id of a PeftModel's (or a plain model's) base model: its transformers config's
    ``_name_or_path`` when that reads as a Hub id (Hugging Face PEFT's source of ``base_model:``), else
    None (a custom module, a model built from a config, a local folder)."""
    getter = getattr(model, "get_base_model", None)
    base = getter() if callable(getter) else model
    return hub_name(getattr(getattr(base, "config", None), "_name_or_path", None))


def hub_name(base_model: Optional[str]) -> Optional[str]:
    """``base_model`` if it reads as a Hub repository id (``org/name`` or ``name``), else None."""
    if not base_model or os.path.isabs(base_model) or os.path.exists(base_model) or not HUB_ID.match(base_model):
        return None
    return base_model


def split_front_matter(text: str) -> tuple[Optional[dict[str, Any]], str]:
    """(front matter as a dict or None when there is none / it is not a YAML mapping, the rest)."""
    match = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n?", text, re.DOTALL)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None, text
    return (meta if isinstance(meta, dict) else None if meta is not None else {}), text[match.end():]


def _peftkit_version() -> str:
    try:
        return importlib.metadata.version("peftkit")
    except importlib.metadata.PackageNotFoundError:
        return "(source tree)"


def default_body(peft_type: str, base_model: Optional[str], config: dict[str, Any]) -> str:
    """The text of a new card: what the adapter is, its settings, how to load it, the versions."""
    shown = {k: v for k, v in sorted(config.items()) if v not in (None, {}, []) and k not in ("peft_version",)}
    settings = "\n".join(f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in shown.items())
    base = f"`{base_model}`" if base_model else "a model given at load time"
    load_base = f'AutoModelForCausalLM.from_pretrained("{base_model}")' if base_model else "...  # the base model"
    return f"""
# {peft_type} adapter

A {peft_type} adapter for {base}, written by peftkit in the Hugging Face PEFT folder format: this folder
loads with peftkit and with Hugging Face PEFT alike (`adapter_config.json` and
`adapter_model.safetensors`).

## Model details

- **Method:** {peft_type}
- **Base model:** {base}
- **Task type:** {config.get("task_type") or "none (a plain module)"}

### Adapter settings

| field | value |
|---|---|
{settings}

## How to use

```python
from transformers import AutoModelForCausalLM
from peftkit import PeftModel   # or: from peft import PeftModel

base = {load_base}
model = PeftModel.from_pretrained(base, "path/to/this/folder")
```

`model.merge_and_unload()` folds a mergeable adapter into the base weights for inference at the base
model's cost.

## Training procedure

See the training run that produced this folder (peftkit writes its metrics and loss plot beside
the checkpoints when trained with `peftkit train`).

### Framework versions

- PEFT {FORMAT_VERSION}
- peftkit {_peftkit_version()}
"""


def write_model_card(folder: str, base_model: Optional[str], peft_type: str, task_type: Optional[str],
                     config: Optional[dict[str, Any]] = None) -> None:
    """Write or update ``folder/README.md`` (see the module doc); an existing card keeps its text."""
    path = os.path.join(folder, "README.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    meta, body = split_front_matter(text)
    if meta is None:
        warnings.warn(f"{path}: the front matter is not a YAML mapping; the model card was left as it is.",
                      PeftkitWarning, stacklevel=3)
        return
    hub_id = hub_name(base_model)
    meta["library_name"] = "peft"
    if hub_id:
        meta["base_model"] = hub_id
    tags = [t for t in (meta.get("tags") or []) if isinstance(t, str)]
    wanted = ([f"base_model:adapter:{hub_id}"] if hub_id else []) + [peft_type.lower(), "peftkit"]
    meta["tags"] = tags + [t for t in wanted if t not in tags]
    if task_type == "CAUSAL_LM" and not meta.get("pipeline_tag"):
        meta["pipeline_tag"] = "text-generation"
    if not body.strip():
        body = default_body(peft_type, hub_id, config or {})
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    atomic_write_bytes(path, f"---\n{front}---\n{body}".encode("utf-8"))


__all__ = ["FORMAT_VERSION", "default_body", "hub_name", "model_hub_name", "split_front_matter", "write_model_card"]
