"""Hugging Face Hub names for folders: a repo id (`owner/name`) resolved to its snapshot in the local HF
cache, and the repo id that a Hub cache path stands for (for model cards).

Nothing is downloaded unless the caller allows it (`allow_download=True`); by default a repo id must
already be in the cache (`huggingface_hub.snapshot_download(..., local_files_only=True)`), so loading a
run never reaches the network behind the user's back. huggingface_hub is imported only for a repo id.
"""
from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub spells it (letters, digits, - _ . ; no leading punctuation)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# a Hub cache folder: HF_HUB_CACHE/models--owner--name/snapshots/REV/...
_CACHED = re.compile(r"(?:^|[\\/])(models|datasets)--([^\\/]+?)--([^\\/]+)(?:[\\/]|$)")


def is_repo_id(text: str) -> bool:
    """True for `owner/name` that is not an existing local path (an existing folder always wins)."""
    return bool(REPO_ID.match(str(text))) and not Path(text).exists()


def hub_repo_id(source: str, kind: str = "models") -> str | None:
    """The Hub repo id a source names: `owner/name` as given, or the id inside a Hub cache path
    (`.../models--owner--name/snapshots/...`, kind "models" or "datasets"); None for a plain local path."""
    cached = _CACHED.search(source or "")
    if cached and cached.group(1) == kind:
        return f"{cached.group(2)}/{cached.group(3)}"
    return source if source and is_repo_id(source) else None


def resolve_folder(path_or_repo_id: str | Path, allow_download: bool = False, cache_dir: str | Path | None = None,
                   revision: str | None = None) -> Path:
    """A local folder for a path or a Hub repo id: an existing path as it is; `owner/name` as its snapshot
    folder in the local HF cache (downloaded first only with allow_download). FileNotFoundError otherwise,
    saying how to get it."""
    if Path(path_or_repo_id).exists():
        return Path(path_or_repo_id)
    text = str(path_or_repo_id)
    if not REPO_ID.match(text):
        raise FileNotFoundError(f"{text} does not exist; give a run folder, a diffusers folder or a Hugging Face "
                                "Hub repo id (owner/name) that is in the local HF cache.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{text} is not a folder; as a Hugging Face Hub repo id it needs huggingface_hub "
                                "(pip install huggingface_hub, or the peers extra).") from None
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, local_files_only=not allow_download))
    except FileNotFoundError as e:        # LocalEntryNotFoundError: not in the cache (and offline)
        raise FileNotFoundError(f"{text} is neither a folder nor a Hub repo in the local HF cache; download it "
                                f"first (`hf download {text}`) or give the folder's path.") from e
    except Exception as e:                # the Hub's own errors (repository not found, network) when downloading
        raise FileNotFoundError(f"could not download {text} from the Hugging Face Hub ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'}); check the repo id, or give "
                                "a local folder.") from e
