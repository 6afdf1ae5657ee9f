"""How ComfyUI's answers become the agent's errors: rejected graphs, failed and interrupted prompts, HTTP statuses."""

from __future__ import annotations

from typing import Any

import httpx

from sdagent.backends.comfyui.graph import CHECKPOINT_LOADER
from sdagent.errors import BackendError, BackendUnavailable, JobAborted, ModelNotFound, UnsupportedJob


def history_status(entry: dict[str, Any]) -> dict[str, Any]:
    status = entry.get("status")
    return status if isinstance(status, dict) else {}


def raise_for_outcome(entry: dict[str, Any], prompt_id: str) -> None:
    """Raise for a history entry of a prompt that did not succeed (polling and after the websocket)."""
    status = history_status(entry)
    for message in status.get("messages") or []:
        if not (isinstance(message, list) and len(message) == 2 and isinstance(message[1], dict)):
            continue
        if message[0] == "execution_error":
            raise execution_error(message[1])
        if message[0] == "execution_interrupted":
            raise JobAborted("interrupted")
    if status and not status.get("completed", False):
        raise BackendError(f"ComfyUI ended prompt {prompt_id} with status {status.get('status_str')!r}")


def execution_error(data: dict[str, Any]) -> BackendError:
    """An ``execution_error``: a node raised while the prompt ran."""
    exception_type = str(data.get("exception_type") or "")
    said = str(data.get("exception_message") or "").strip().splitlines()
    first = said[0] if said else ""
    where = f"node {data.get('node_id')} ({data.get('node_type')})"
    if "OutOfMemoryError" in exception_type or "out of memory" in first.lower():
        return BackendError(f"ComfyUI ran out of GPU memory at {where}: {first}")
    return BackendError(f"ComfyUI failed at {where}: {exception_type}: {first}")


def rejected(body: Any) -> BackendError:
    """A 400 from ``POST /prompt``: the graph did not validate."""
    body = body if isinstance(body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    message = str(error.get("message") or "invalid prompt")
    node_errors = body.get("node_errors") if isinstance(body.get("node_errors"), dict) else {}
    # Current ComfyUI says missing_node_type; older ones invalid_prompt "... node X does not exist."
    if error.get("type") == "missing_node_type" or "does not exist" in message:
        return UnsupportedJob(f"ComfyUI has no such node class (custom node not installed?): {message}")
    for node in node_errors.values():
        if isinstance(node, dict) and node.get("class_type") == CHECKPOINT_LOADER:
            for reason in node.get("errors") or []:
                if isinstance(reason, dict) and reason.get("type") == "value_not_in_list":
                    return ModelNotFound(f"ComfyUI does not have the checkpoint: {reason.get('details')}")
    summary = summarise_node_errors(node_errors) if node_errors else str(error.get("details") or "")
    return BackendError(f"ComfyUI rejected the graph: {message}: {summary}")


def summarise_node_errors(node_errors: Any, limit: int = 5) -> str:
    """``node 3 (KSampler): Value 0 smaller than min of 1: steps; ...``, a few nodes at most."""
    if not isinstance(node_errors, dict):
        return str(node_errors)
    parts = []
    for node_id, node in list(node_errors.items())[:limit]:
        reasons = node.get("errors") if isinstance(node, dict) else None
        texts = [
            f"{reason.get('message')}: {reason.get('details')}" for reason in reasons or [] if isinstance(reason, dict)
        ]
        class_type = node.get("class_type") if isinstance(node, dict) else "?"
        parts.append(f"node {node_id} ({class_type}): {'; '.join(texts) or 'invalid'}")
    if len(node_errors) > limit:
        parts.append(f"and {len(node_errors) - limit} more nodes")
    return "; ".join(parts)


def raise_for_status(response: httpx.Response, what: str) -> None:
    """ComfyUI answers its own errors in plain text or ``{error}``; 5xx and 429 are transient."""
    status = response.status_code
    if status < 400:
        return
    said = response.text[:300].strip()
    if status >= 500 or status == 429:
        raise BackendUnavailable(f"{what}: ComfyUI answered {status}: {said}")
    raise BackendError(f"{what}: ComfyUI answered {status}: {said}")
