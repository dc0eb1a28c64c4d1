"""The sampling and scheduling fields that both generation protocols take, validated strictly.

OpenAI's names and ranges: ``max_tokens``, ``temperature`` (0 = greedy, up to 2), ``top_p`` (0 < p <= 1),
``seed``, ``stop`` (a string or a list of strings). ptmserve's extensions, also on the OpenAI routes:
``top_k`` (0 = no filter), ``ignore_eos``, and the schedule policy's ``priority`` and ``timeout`` (µs).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ptmserve.engine.api import GenerationParams
from ptmserve.protocol.schedule import MAX_SCHEDULE_VALUE
from ptmserve.server.dataplane import DataPlane, GenerationRequest

StopString = Annotated[str, Field(min_length=1, max_length=1000)]


class SamplingFields(BaseModel):
    """How to sample and when to stop; None means the default. No silent coercion of types."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: StopString | list[StopString] | None = None
    ignore_eos: bool = False  # extension: generate past the end-of-sequence token (benchmarks)
    priority: int = Field(default=0, ge=0, le=MAX_SCHEDULE_VALUE)  # extension: Triton's schedule policy
    timeout: int | None = Field(default=None, ge=0, le=MAX_SCHEDULE_VALUE)  # extension: deadline, µs

    def request(
        self,
        plane: DataPlane,
        max_tokens: int | None,
        *,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> GenerationRequest:
        """The request of ``prompt`` or ``messages`` in protocol-neutral form; ``max_tokens`` is the
        protocol's default, for a request without one."""
        options = plane.options(priority=self.priority, timeout_us=self.timeout)
        return GenerationRequest(self.generation_params(max_tokens), options, prompt, messages)

    def generation_params(self, max_tokens: int | None) -> GenerationParams:
        """The engine's parameters; ``max_tokens`` is the protocol's default when the request has none.

        Raises:
            InvalidInput: what ``GenerationParams`` refuses (more than 16 stop strings).
        """
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else max_tokens,
            temperature=self.temperature,  # None: the model's default
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )
