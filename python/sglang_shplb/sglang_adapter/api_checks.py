"""Request checks stock SGLang 0.5.23 lacks, as a hook on its OpenAI chat validator.

`/v1/chat/completions` with `max_tokens: 0` (or `max_completion_tokens: 0`) returns 200 with an
empty answer, and a negative value is refused as "max_new_tokens must be at least 0", naming a
field the client never sent. `/v1/completions` already says "max_tokens must be positive"; chat
now answers the same way (400, naming the field). Native `/generate` keeps `max_new_tokens: 0`
(a prefill-only request is legitimate there).
"""
from __future__ import annotations

TARGET = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"
_registered = False


def check_max_tokens(request) -> str | None:
    for field in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, field, None)
        if value is not None and value <= 0:
            return f"{field} must be at least 1, got {value}"
    return None


def validate_after(result, _serving, request, *args, **kwargs):
    """AFTER hook: keep SGLang's own error; otherwise add ours (None keeps the original result)."""
    if result:
        return None
    return check_max_tokens(request)


def register_api_checks() -> None:
    """Idempotent. Only the process that serves HTTP needs it: spawned workers skip the import."""
    global _registered
    import multiprocessing

    if _registered or multiprocessing.parent_process() is not None:
        return
    _registered = True
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:  # an SGLang without hooks: stock behaviour, nothing else breaks
        return
    HookRegistry.register(TARGET, validate_after, HookType.AFTER)
