"""Request checks stock SGLang 0.5.23 lacks: hooks on its OpenAI chat endpoint (HTTP process only).

Measured on stock 0.5.23 (`/v1/completions` and `/generate` already refuse all of these with 400):
- `max_tokens: 0` (or `max_completion_tokens: 0`) returns 200 with an empty answer; a negative value
  is refused as "max_new_tokens must be at least 0", naming a field the client never sent.
- `n: 0` is refused as "range() arg 3 must not be zero".
- A JSON body that is not an object (`[]`, `1`, `null`) is a 500 with a traceback in the log: a
  pydantic before-validator calls `.get` on it.
Native `/generate` keeps `max_new_tokens: 0` (a prefill-only request is legitimate there).
"""
from __future__ import annotations

import json

CHAT_PATH = "/v1/chat/completions"
VALIDATE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"
HTTP_SETUP = "sglang.srt.entrypoints.http_server._setup_and_run_http_server"
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
_registered = False


def check_sampling(request) -> str | None:
    for field in ("max_completion_tokens", "max_tokens", "n"):
        value = getattr(request, field, None)
        if value is not None and value <= 0:
            return f"{field} must be at least 1, got {value}"
    return None


def validate_after(result, _serving, request, *args, **kwargs):
    """AFTER hook: keep SGLang's own error; otherwise add ours (None keeps the original result)."""
    if result:
        return None
    return check_sampling(request)


def body_problem(body: bytes) -> str | None:
    """Why a chat body is not a JSON object, or None (then SGLang parses and validates it)."""
    if body.lstrip()[:1] == b"{":
        return None  # the common case costs one byte look
    try:
        value = json.loads(body)
    except ValueError:
        return None  # SGLang answers malformed JSON with a clear 400 itself
    kind = JSON_TYPES.get(type(value), type(value).__name__)
    return f"the request body must be a JSON object with 'messages', got a JSON {kind}"


class ChatBodyIsObject:
    """ASGI middleware: a 400 naming the problem instead of stock's 500 for non-object bodies."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:  # buffer the chat body (KBs) so it can be looked at and replayed
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        problem = None if dict(scope["headers"]).get(b"content-encoding") else body_problem(body)
        if problem:
            return await _send_400(send, problem)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


async def _send_400(send, message: str) -> None:
    payload = json.dumps({"object": "error", "message": message, "type": "BadRequestError",
                          "param": None, "code": 400}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def add_middleware_before(*args, **kwargs):
    """BEFORE hook on the HTTP set-up: the app has not started, so middleware may still be added."""
    from sglang.srt.entrypoints.http_server import app

    if not getattr(app.state, "shplb_chat_checks", False):
        app.state.shplb_chat_checks = True
        app.add_middleware(ChatBodyIsObject)
    return None


def register_api_checks() -> None:
    """Idempotent. Only the process that serves HTTP needs it: spawned workers skip the imports."""
    global _registered
    import multiprocessing

    if _registered or multiprocessing.parent_process() is not None:
        return
    _registered = True
    try:
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:  # an SGLang without hooks: stock behaviour, nothing else breaks
        return
    HookRegistry.register(VALIDATE, validate_after, HookType.AFTER)
    HookRegistry.register(HTTP_SETUP, add_middleware_before, HookType.BEFORE)
