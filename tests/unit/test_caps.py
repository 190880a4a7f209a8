"""The operator's caps are the request schemas' own constraints: over a cap is a validation error in the route's
shape (422 on /generate, 400 naming the field elsewhere), never `unsupported_parameter`; each app keeps its own."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from qwen_api.admission import Admission
from qwen_api.api.app import create_app
from qwen_api.dev.fake_engine import FakeEngine
from qwen_api.dev.random_qwen2 import build_qwen2_tokenizer
from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator

TOKENIZER = build_qwen2_tokenizer()
HI = [{"role": "user", "content": "Hi"}]
OVER = [
    ("/generate", {"prompt": "Hi", "max_length": 9}, "max_length"),
    ("/generate", {"prompt": "Hi", "num_return_sequences": 3}, "num_return_sequences"),
    ("/v1/chat/completions", {"model": "m", "messages": HI, "max_tokens": 9}, "max_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": HI, "max_completion_tokens": 9}, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "m", "messages": HI, "n": 3}, "n"),
    ("/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 9}, "max_tokens"),
    ("/v1/responses", {"model": "m", "input": "Hi", "max_output_tokens": 9}, "max_output_tokens"),
    ("/v1/messages", {"model": "m", "messages": HI, "max_tokens": 9}, "max_tokens"),
]


def _app(**caps: Any) -> Any:
    fake = FakeEngine(TOKENIZER("ok", add_special_tokens=False)["input_ids"])
    settings = Settings(**caps)
    runtime = Runtime(lambda: TextGenerator(fake, TOKENIZER), "m")
    return create_app(settings, runtime, Admission(settings.admission_capacity())), runtime, fake


@pytest.mark.parametrize(("path", "body", "field"), OVER)
def test_over_a_cap_is_a_validation_error_in_the_routes_shape(path: str, body: dict[str, Any], field: str) -> None:
    async def main() -> None:
        strict, strict_runtime, strict_fake = _app(max_new_tokens_limit=8, max_num_return_sequences=2)
        loose, loose_runtime, _ = _app(max_new_tokens_limit=1024, max_num_return_sequences=4)
        for runtime in (strict_runtime, loose_runtime):
            runtime.start()
            await runtime.wait_ready()
        async with (
            httpx.AsyncClient(transport=httpx.ASGITransport(app=strict), base_url="http://s") as s,
            httpx.AsyncClient(transport=httpx.ASGITransport(app=loose), base_url="http://l") as lo,
        ):
            refused, served = await asyncio.gather(s.post(path, json=body), lo.post(path, json=body))
        for runtime in (strict_runtime, loose_runtime):
            await runtime.close()
        assert served.status_code == 200, served.text  # the same body within the other app's caps
        assert not strict_fake.calls
        if path == "/generate":
            assert refused.status_code == 422
            errors = {tuple(e["loc"]): e["msg"] for e in refused.json()["detail"]}
            assert errors["body", field].startswith("must be at most")  # (a default over a cap counts: 512 > 8)
        elif path == "/v1/messages":
            assert refused.status_code == 400
            assert refused.json()["error"]["type"] == "invalid_request_error"
            assert field in refused.json()["error"]["message"]
        else:
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["param"] == field and error["code"] != "unsupported_parameter", error
            assert "at most" in error["message"]

    asyncio.run(main())
