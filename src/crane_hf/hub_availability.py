"""Whether a Hub id can be loaded here without waiting, and a clear error where it cannot.

Where a Hub id is neither in the Hugging Face cache nor reachable, huggingface_hub retries the download (five times,
about 30 seconds) and transformers then raises a generic message about offline mode. A user on an offline machine
should instead learn at once which model is missing and how to get it. So a Hub id that is not cached is tried only
where the Hub endpoint answers one connection attempt (`hub_unreachable`: no retries), or where a proxy decides (then
the download itself is the test).

`BackboneUnavailableError` is the one error for a backbone (CLIP, DINOv2) that cannot be had here, raised by the
presets (`crane_hf.presets`), by loading a prompts-only model folder (`crane_hf.model_loading`) and by training
(`crane_hf.training.train`) before any work, with the commands that download each backbone into the folder the next
command points at (`backbone_unavailable_message`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
HUB_CACHE_HINT = "~/.cache/huggingface/hub"


class BackboneUnavailableError(OSError):
    """A backbone (a Hub id) is neither in the Hugging Face cache nor downloadable here."""


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub endpoint cannot be reached (one connection attempt, no retries), or None if it can (or if a
    proxy decides: then the download itself is the test)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"{constants.ENDPOINT} cannot be reached: {error}"
    return None


def is_valid_hub_id(name: str) -> bool:
    """Whether `name` can be a Hub repository id ("org/name" or "name"; huggingface_hub's rules), and is not written
    as a relative path ("./name", "../name", "~/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(("./", "../", "~"))


def is_cached(repo_id: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the Hugging Face cache holds the `config.json` of the model repository `repo_id`."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir), str)


def unavailable_reason(repo_id: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """None where the Hub id `repo_id` loads without waiting (cached, or the Hub answers); else why it cannot."""
    return None if is_cached(repo_id, cache_dir) else hub_unreachable()


def local_dir_name(repo_id: str) -> str:
    """The folder `hf download` writes a backbone to in our instructions: the repository's name."""
    return repo_id.rsplit("/", 1)[-1]


def download_commands(repo_ids: Sequence[str]) -> list[str]:
    """One `hf download ID --local-dir NAME` per backbone (one command downloads one repository)."""
    return [f"hf download {repo_id} --local-dir {local_dir_name(repo_id)}" for repo_id in repo_ids]


def backbone_unavailable_message(
    needed_by: str, missing: str, reason: str, backbones: Sequence[str], usage: str, offline_trial: str = ""
) -> str:
    """The text of `BackboneUnavailableError`.

    Args:
        needed_by: what needs the backbone ("Preset crane+/mvtec", "Training").
        missing: the Hub id that cannot be had.
        reason: why (HF_HUB_OFFLINE is set, the endpoint cannot be reached, the download's error).
        backbones: every backbone Hub id the work needs (each gets its download command).
        usage: how to point at the downloaded folders (lines, already indented).
        offline_trial: a last paragraph (e.g. how to try the work offline without the backbones).
    """
    lines = [
        f"{needed_by} needs the backbone {missing}, which is neither in the Hugging Face cache nor downloadable "
        f"here ({reason}).",
        "Where the Hub is reachable, download the backbones into folders and copy them to this machine:",
        *(f"  {command}" for command in download_commands(backbones)),
        "then point at the folders:",
        usage,
        f"(or download without --local-dir and copy the Hugging Face cache, {HUB_CACHE_HINT}, to this machine).",
    ]
    return "\n".join(lines + ([offline_trial] if offline_trial else []))


__all__ = [
    "BackboneUnavailableError",
    "backbone_unavailable_message",
    "download_commands",
    "hub_unreachable",
    "is_cached",
    "is_valid_hub_id",
    "local_dir_name",
    "unavailable_reason",
]
