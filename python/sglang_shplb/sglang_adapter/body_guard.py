"""ASGI middleware: a 400 naming the problem where stock SGLang 0.5.23 answers a client's bad body with a 500.

Stock's OpenAI request models have pydantic before-validators that assume the JSON types they read
(`.get` on the body, on `response_format`, ...). A wrong type there raises AttributeError/TypeError,
which pydantic does not turn into a validation error, so FastAPI answers 500 with a traceback. The
guard validates the body with the endpoint's own model first: a pydantic ValidationError is left to
stock (it already answers 400 naming the field); any other exception is the client's wrong type.
Native `/generate` bodies get the same treatment from its contract hook (generate_body_problem).
"""
from __future__ import annotations

import json

JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}
MODELS = {"/v1/chat/completions": ("ChatCompletionRequest", "'messages'"),
          "/v1/completions": ("CompletionRequest", "'prompt'")}


def body_problem(path: str, body: bytes) -> str | None:
    """Why this JSON body would crash the endpoint's request model, or None (SGLang validates it)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None  # SGLang answers malformed JSON with a clear 400 itself
    name, needs = MODELS[path]
    if not isinstance(value, dict):
        kind = JSON_TYPES.get(type(value), type(value).__name__)
        return f"the request body must be a JSON object with {needs}, got a JSON {kind}"
    import pydantic
    from sglang.srt.entrypoints.openai import protocol

    try:
        getattr(protocol, name).model_validate(value)
    except pydantic.ValidationError:
        return None
    except Exception as e:  # noqa: BLE001 - a before-validator met a type it did not expect
        return (f"the request body does not fit the {name} schema ({type(e).__name__}: {e}); "
                "check the JSON types of its fields against the OpenAI API")
    return None


def generate_body_problem(body: dict) -> str | None:
    """A native /generate body that stock's batch normalization cannot take (`"sampling_params": []`
    raises IndexError there: a 500, or a broken stream), or None. Runs that normalization on a copy."""
    import copy

    from sglang.srt.managers.io_struct import GenerateReqInput

    try:
        GenerateReqInput(**copy.deepcopy(body)).normalize_batch_and_arguments()
    except ValueError as e:
        return str(e)  # stock's own message, but now before a stream starts
    except Exception as e:  # noqa: BLE001 - a field shape normalization did not expect
        return (f"the /generate body cannot be batched ({type(e).__name__}: {e}); check that list fields "
                "(text, input_ids, sampling_params, ...) have one entry per prompt")
    return None


class BodyGuard:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in MODELS:
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:  # buffer the body (KBs) so it can be looked at and replayed
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        compressed = dict(scope["headers"]).get(b"content-encoding")
        problem = None if compressed else body_problem(scope["path"], body)
        if problem:
            return await send_400(send, problem)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


async def send_400(send, message: str) -> None:
    payload = json.dumps({"object": "error", "message": message, "type": "BadRequestError",
                          "param": None, "code": 400}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
