"""Finding adapter files in a local folder or a Hugging Face Hub repository (through its cache).

Only this module talks to huggingface_hub. Local folders always win; a string that is not a local
folder is treated as a Hub repository id and resolved with ``hf_hub_download``, which works offline
from a filled cache (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .errors import CheckpointError

_HUB_KWARGS = ("cache_dir", "token", "local_files_only", "force_download", "proxies", "user_agent")


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}


def resolve_file(
    path_or_repo: str | os.PathLike,
    filename: str,
    *,
    subfolder: Optional[str] = None,
    revision: Optional[str] = None,
    missing_ok: bool = False,
    **kwargs: Any,
) -> Optional[str]:
    """The local path of ``filename`` in a folder or Hub repo; ``None`` if missing and ``missing_ok``."""
    root = os.fspath(path_or_repo)
    if os.path.isdir(root):
        path = os.path.join(root, subfolder or "", filename)
        if os.path.isfile(path):
            return path
        if missing_ok:
            return None
        raise CheckpointError(f"{os.path.join(root, subfolder or '')} has no {filename}; is it an adapter folder?")
    if os.path.exists(root):
        raise CheckpointError(f"{root} is a file; pass the adapter folder that contains it.")
    if root.count("/") > 1 or root.startswith((".", "/", "~")) or not root:
        raise CheckpointError(f"No folder {root!r} (and it is not a Hub repository id).")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError(f"No folder {root!r}, and huggingface_hub is not installed to fetch it.") from None
    try:
        return hf_hub_download(root, filename, subfolder=subfolder, revision=revision, **_hub_kwargs(kwargs))
    except EntryNotFoundError:
        if missing_ok:
            return None
        raise CheckpointError(f"Hub repository {root!r} has no {filename}.") from None
    except LocalEntryNotFoundError:
        if missing_ok and _repo_cached(root, revision, kwargs):
            return None
        raise CheckpointError(
            f"{root!r} is not a local folder and {filename} is not in the Hugging Face cache "
            "(offline, or the repository does not exist)."
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"Could not fetch {filename} from Hub repository {root!r}: {exc}") from None


def _repo_cached(repo_id: str, revision: Optional[str], kwargs: dict[str, Any]) -> bool:
    """Whether the cache has a snapshot of ``repo_id`` (so a missing file is really missing)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=kwargs.get("cache_dir"))
        return True
    except Exception:
        return False


def push_folder_to_hub(folder: str, repo_id: str, *, private: Optional[bool] = None, token: Optional[str] = None,
                       commit_message: str = "Upload adapter", revision: Optional[str] = None) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` to it."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision)
