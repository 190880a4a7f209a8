"""Dependency aliases shared by the routers: the settings, the runtime, and a ready text generator."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from qwen_api.runtime import Runtime
from qwen_api.settings import Settings
from qwen_api.textgen import TextGenerator


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


def _generator(request: Request) -> TextGenerator:
    return _runtime(request).generator()


SettingsDep = Annotated[Settings, Depends(_settings)]
RuntimeDep = Annotated[Runtime, Depends(_runtime)]
GeneratorDep = Annotated[TextGenerator, Depends(_generator)]
