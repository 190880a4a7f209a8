"""Request and response schemas of the seed API (`/generate`), with their limits in `Field(...)`.

Defaults and shapes are exactly those of the specification; each request converts itself to engine
parameters. The operator's caps are constraints of the schema too (`schema.at_most`): a 422 in FastAPI's shape.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from qwen_api.api.schema import RequestModel, at_most
from qwen_api.engine.base import SamplingParams


class GenerateParameters(RequestModel):
    """The specification's generation parameters, echoed back in every answer."""

    prompt: str = Field(..., min_length=1, description="The user's message; sent through the chat template.")
    max_length: int = Field(
        512, ge=1, validate_default=True, description="Most new tokens to generate (the prompt is not counted)."
    )
    temperature: float = Field(
        0.7, ge=0.0, le=2.0, allow_inf_nan=False, description="Sampling temperature; 0 means greedy."
    )
    top_p: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Keep the k most likely tokens; 0 disables top-k.")
    num_return_sequences: int = Field(
        1, ge=1, validate_default=True, description="Number of independent samples to return."
    )

    @field_validator("max_length")
    @classmethod
    def _max_length_cap(cls, value: int) -> int | None:
        return at_most(value, "max_new_tokens")

    @field_validator("num_return_sequences")
    @classmethod
    def _choices_cap(cls, value: int) -> int | None:
        return at_most(value, "max_choices")

    def to_sampling_params(self) -> SamplingParams:
        """Engine parameters for one sequence."""
        return SamplingParams(
            max_new_tokens=self.max_length, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
        )


class GenerateRequest(GenerateParameters):
    """Body of POST /generate: the parameters, plus `stream` to receive text as server-sent events."""

    stream: bool = Field(False, description="Answer text/event-stream: a delta per event, then [DONE].")
    response_format: dict[str, Any] | None = Field(
        None,
        description="As OpenAI's: {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name', "
        "'schema'}} makes every generated text JSON that follows it, enforced while decoding.",
    )

    def parameters(self) -> GenerateParameters:
        return GenerateParameters.model_validate(self.model_dump(exclude={"stream", "response_format"}))


class GenerateResponse(BaseModel):
    """Answer of POST /generate: the texts, and every effective parameter, defaults included."""

    generated_texts: list[str]
    parameters: GenerateParameters


class RootResponse(BaseModel):
    name: str
    version: str
    status: str
    model: str


class HealthResponse(BaseModel):
    status: str
