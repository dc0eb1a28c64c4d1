"""KServe v2 / Triton routes: metadata, health, infer, schedule policy, model repository, statistics
(Triton's generate extension for text generation models is in ``generate.py``).

Tensor contract of embedding and classification models (``docs/server.md``):
- inputs: ``TEXT`` (BYTES, [-1]; [-1, 1] also accepted) or ``INPUT_IDS`` (INT64, [-1, -1]) with an optional
  ``ATTENTION_MASK`` (INT64, same shape; 1 = real token, 0 = padding to drop). Exactly one of TEXT and
  INPUT_IDS. Without a mask every INPUT_IDS element is a real token.
- outputs: ``EMBEDDING`` (FP32, [-1, dim]); classifiers also ``LOGITS`` (FP32, [-1, C]) and ``LABEL``
  (BYTES, [-1]); models with early exits also ``EXIT_LAYER`` (INT32, [-1]: the last layer each input
  computed). With no ``outputs`` in the request, embedding models return EMBEDDING and classifiers
  return LOGITS and LABEL (and EXIT_LAYER). One forward pass serves every output a request asks for.
- parameters: ``priority`` and ``timeout`` (schedule policy); ``early_exit`` (bool, default true; false
  runs every input to full depth).
Text generation models list Triton's generate tensors: input ``text_input`` and output ``text_output``
(BYTES); they serve ``generate``, not ``infer``.
"""

from __future__ import annotations

import json
from importlib import metadata
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from ptmserve.engine.api import InferenceOptions, ModelInfo, ModelKind, ModelState
from ptmserve.errors import InvalidInput, NotReady, PayloadTooLarge
from ptmserve.protocol import codecs
from ptmserve.protocol.schedule import schedule_value
from ptmserve.server.dataplane import MODEL_VERSION, DataPlane, Inputs

EXTENSIONS = ["binary_tensor_data", "schedule_policy", "model_repository", "statistics", "generate"]
PLATFORM = "ptmserve"
_INPUTS = ("TEXT", "INPUT_IDS", "ATTENTION_MASK")
_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "FP32": "TYPE_FP32"}
_CLASSIFY_OUTPUTS = ("LOGITS", "LABEL", "EXIT_LAYER")  # outputs computed by a classification


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj).encode(), status_code=status, media_type="application/json")


def input_specs(info: ModelInfo) -> list[dict[str, Any]]:
    if info.kind is ModelKind.GENERATOR:
        return [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    return [
        {"name": "TEXT", "datatype": "BYTES", "shape": [-1]},
        {"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [-1, -1]},
    ]


def output_specs(info: ModelInfo) -> list[dict[str, Any]]:
    if info.kind is ModelKind.GENERATOR:
        return [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    specs = [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, info.dim]}]
    if info.labels:
        specs.append({"name": "LOGITS", "datatype": "FP32", "shape": [-1, len(info.labels)]})
        specs.append({"name": "LABEL", "datatype": "BYTES", "shape": [-1]})
    if info.exits:
        specs.append({"name": "EXIT_LAYER", "datatype": "INT32", "shape": [-1]})
    return specs


def default_outputs(info: ModelInfo) -> list[str]:
    if info.exits:
        return list(_CLASSIFY_OUTPUTS)
    return ["LOGITS", "LABEL"] if info.labels else ["EMBEDDING"]


class KServeRoutes:
    """Endpoints of the KServe v2 protocol over one ``DataPlane``."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # ------------------------------------------------------------------------------ server and health

    async def server_metadata(self) -> Response:
        return json_response({"name": "ptmserve", "version": ptmserve_version(), "extensions": EXTENSIONS})

    async def live(self) -> Response:
        return json_response({"live": True})

    async def ready(self) -> Response:
        reason = self.plane.unready_reason()
        if reason is not None:
            raise NotReady(f"the server is not ready: {reason}")
        return json_response({"ready": True})

    # ------------------------------------------------------------------------------------ per model

    async def model_metadata(self, model: str) -> Response:
        return self._metadata(model, None)

    async def model_metadata_version(self, model: str, version: str) -> Response:
        return self._metadata(model, version)

    def _metadata(self, model: str, version: str | None) -> Response:
        info = self.plane.model_info(model, version)
        return json_response(
            {
                "name": info.name,
                "versions": [MODEL_VERSION],
                "platform": PLATFORM,
                "inputs": input_specs(info),
                "outputs": output_specs(info),
            }
        )

    async def model_ready(self, model: str) -> Response:
        return self._ready(model, None)

    async def model_ready_version(self, model: str, version: str) -> Response:
        return self._ready(model, version)

    def _ready(self, model: str, version: str | None) -> Response:
        info = self.plane.ready_model_info(model, version)
        return json_response({"name": info.name, "ready": True})

    async def model_config(self, model: str) -> Response:
        return self._config(model, None)

    async def model_config_version(self, model: str, version: str) -> Response:
        return self._config(model, version)

    def _config(self, model: str, version: str | None) -> Response:
        info = self.plane.model_info(model, version)

        def entries(specs: list[dict[str, Any]], optional: bool) -> list[dict[str, Any]]:
            out = []
            for s in specs:
                e = {"name": s["name"], "data_type": _CONFIG_TYPES[s["datatype"]], "dims": s["shape"]}
                out.append({**e, "optional": True} if optional else e)
            return out

        params = {
            "kind": info.kind.value,
            "labels": json.dumps(list(info.labels)),
            "exits": json.dumps(list(info.exits)),
            "max_tokens": str(info.max_tokens),
            "vocab_size": str(info.vocab_size),
            "dtype": info.dtype,
            "stored_bytes": str(info.stored_bytes),
            "max_batch_inputs": str(self.plane.settings.max_batch_inputs),
            "max_input_length": str(self.plane.settings.max_input_length),
            "long_inputs": self.plane.settings.long_inputs,
        }
        return json_response(
            {
                "name": info.name,
                "platform": PLATFORM,
                "backend": PLATFORM,
                # The batch dimension is part of each shape: batching happens inside the engine, across
                # requests, so Triton's implicit batch dimension (max_batch_size > 0) does not apply.
                "max_batch_size": 0,
                "version_policy": {"latest": {"num_versions": 1}},
                "input": entries(input_specs(info), optional=info.kind is not ModelKind.GENERATOR),
                "output": entries(output_specs(info), optional=False),
                "parameters": {k: {"string_value": v} for k, v in params.items()},
            }
        )

    # ---------------------------------------------------------------------------------------- infer

    async def infer(self, request: Request, model: str) -> Response:
        return await self._infer(request, model, None)

    async def infer_version(self, request: Request, model: str, version: str) -> Response:
        return await self._infer(request, model, version)

    async def _infer(self, request: Request, model: str, version: str | None) -> Response:
        info = self.plane.encoder_info(model, version)
        body = codecs.decompress(
            await request.body(), request.headers.get("content-encoding"), self.plane.settings.max_body_bytes
        )
        req = codecs.decode_infer_request(
            body, request.headers.get(codecs.HEADER_LENGTH), check_shape=self._check_input_shape
        )
        inputs = model_inputs(req)
        options = schedule_options(self.plane, req.parameters)
        wanted = requested_outputs(info, req)
        results: dict[str, codecs.Tensor] = {}
        if any(name in wanted for name in _CLASSIFY_OUTPUTS):
            # One forward pass: the classification carries the pooled embeddings too.
            cls = await self.plane.classify(info, inputs, options, request.receive)
            results["LOGITS"] = codecs.Tensor("LOGITS", "FP32", np.asarray(cls.logits, np.float32))
            results["LABEL"] = codecs.bytes_tensor("LABEL", cls.labels)
            if cls.exit_layers is not None:
                results["EXIT_LAYER"] = codecs.Tensor(
                    "EXIT_LAYER", "INT32", np.asarray(cls.exit_layers, np.int32)
                )
            if "EMBEDDING" in wanted:
                if cls.embeddings is None:
                    raise RuntimeError("the engine's ClassifyResult has no embeddings")
                results["EMBEDDING"] = codecs.Tensor(
                    "EMBEDDING", "FP32", np.asarray(cls.embeddings, np.float32)
                )
            tokens = cls.prompt_tokens
        else:
            emb = await self.plane.embed(info, inputs, options, request.receive)
            results["EMBEDDING"] = codecs.Tensor("EMBEDDING", "FP32", np.asarray(emb.embeddings, np.float32))
            tokens = emb.prompt_tokens
        resp = codecs.InferResponse(
            model_name=info.name,
            model_version=MODEL_VERSION,
            id=req.id,
            outputs=[results[name] for name in wanted],
            parameters={"prompt_tokens": tokens},
        )
        binary = {name: req.binary_default if b is None else b for name, b in wanted.items()}
        payload, header_length = codecs.encode_infer_response(resp, binary)
        if header_length is None:
            return Response(payload, media_type="application/json")
        headers = {codecs.HEADER_LENGTH: str(header_length)}
        return Response(payload, media_type="application/octet-stream", headers=headers)

    def _check_input_shape(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """Refuse an input whose declared shape is beyond the limits, before its data is decoded."""
        if name not in _INPUTS:
            raise InvalidInput(
                f"unknown input(s) {[name[:64]]}; this model takes TEXT or INPUT_IDS (+ ATTENTION_MASK)"
            )
        if shape:
            self.plane.check_count(shape[0])
        limit = self.plane.settings.max_input_length
        if name != "TEXT" and len(shape) == 2 and shape[1] > limit:
            raise PayloadTooLarge(
                f"{name} rows hold {shape[1]} token ids (shape {list(shape)}); the limit is {limit} "
                "(--max-input-length)"
            )

    # ----------------------------------------------------------------------------------- statistics

    async def all_stats(self) -> Response:
        return json_response(self.plane.statistics([m.name for m in self.plane.engine.models()]))

    async def model_stats(self, model: str) -> Response:
        return json_response(self.plane.statistics([self.plane.model_info(model).name]))

    async def model_stats_version(self, model: str, version: str) -> Response:
        return json_response(self.plane.statistics([self.plane.model_info(model, version).name]))

    # ----------------------------------------------------------------------------------- repository

    async def repository_index(self, request: Request) -> Response:
        body = await _optional_json(request)
        ready_only = body.get("ready", False)
        if not isinstance(ready_only, bool):
            raise InvalidInput("'ready' must be true or false")
        index = [
            {"name": m.name, "version": MODEL_VERSION, "state": m.state.value, "reason": m.reason}
            for m in self.plane.engine.models()
            if not ready_only or m.state is ModelState.READY
        ]
        return json_response(index)

    async def load(self, request: Request, model: str) -> Response:
        params = (await _optional_json(request)).get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be a JSON object")
        if any(k == "config" or k.startswith("file:") for k in params):
            raise InvalidInput(
                "loading with a new config or files is not supported; import the model instead"
            )
        await self.plane.load(model)
        return json_response({})

    async def unload(self, request: Request, model: str) -> Response:
        await _optional_json(request)  # Triton's unload_dependents parameter has no meaning here
        await self.plane.unload(model)
        return json_response({})


# ---------------------------------------------------------------------------------------- helpers


def ptmserve_version() -> str:
    try:
        return metadata.version("ptmserve")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _optional_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    obj, _ = codecs.split_body(raw, None)
    return obj


def model_inputs(req: codecs.InferRequest) -> Inputs:
    """Texts or token id lists from the request's TEXT or INPUT_IDS (+ ATTENTION_MASK) tensors."""
    by_name = {t.name: t for t in req.inputs}
    unknown = sorted(set(by_name) - set(_INPUTS))
    if unknown:
        raise InvalidInput(
            f"unknown input(s) {unknown}; this model takes TEXT or INPUT_IDS (+ ATTENTION_MASK)"
        )
    if ("TEXT" in by_name) == ("INPUT_IDS" in by_name):
        raise InvalidInput("give exactly one of the inputs TEXT and INPUT_IDS")
    if "TEXT" in by_name:
        if "ATTENTION_MASK" in by_name:
            raise InvalidInput("ATTENTION_MASK goes with INPUT_IDS, not TEXT")
        return _texts(by_name["TEXT"])
    return _token_ids(by_name["INPUT_IDS"], by_name.get("ATTENTION_MASK"))


def _texts(t: codecs.Tensor) -> list[str]:
    _expect(t, "BYTES")
    if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)):
        raise InvalidInput(f"TEXT must have shape [N] or [N, 1], got {list(t.shape)}")
    texts = []
    for i, b in enumerate(t.data.ravel()):
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"TEXT element {i} is not valid UTF-8") from None
    return texts


def _token_ids(ids: codecs.Tensor, mask: codecs.Tensor | None) -> list[list[int]]:
    _expect(ids, "INT64")
    if len(ids.shape) != 2:
        raise InvalidInput(f"INPUT_IDS must have shape [N, L], got {list(ids.shape)}")
    if mask is None:
        return ids.data.tolist()
    _expect(mask, "INT64")
    if mask.shape != ids.shape:
        raise InvalidInput(
            f"ATTENTION_MASK shape {list(mask.shape)} differs from INPUT_IDS {list(ids.shape)}"
        )
    if not np.isin(mask.data, (0, 1)).all():
        raise InvalidInput("ATTENTION_MASK values must be 0 (padding) or 1 (token)")
    return [row[m == 1].tolist() for row, m in zip(ids.data, mask.data, strict=True)]


def _expect(t: codecs.Tensor, datatype: str) -> None:
    if t.datatype != datatype:
        raise InvalidInput(f"input {t.name} must have datatype {datatype}, got {t.datatype}")


def requested_outputs(info: ModelInfo, req: codecs.InferRequest) -> dict[str, bool | None]:
    """Output name -> binary flag (None: the request default), in the order they will be returned."""
    available = [s["name"] for s in output_specs(info)]
    if req.outputs is None:
        return {name: None for name in default_outputs(info)}
    for o in req.outputs:
        if o.name not in available:
            raise InvalidInput(f"model {info.name!r} has no output {o.name!r}; it has {available}")
    return {o.name: o.binary for o in req.outputs}


def schedule_options(plane: DataPlane, params: dict[str, Any]) -> InferenceOptions:
    """``priority`` and ``timeout`` (µs) of the schedule policy extension, and ``early_exit`` (a bool,
    default true), as engine options."""
    priority = schedule_value("priority", params.get("priority", 0))
    timeout = schedule_value("timeout", params.get("timeout", 0))
    return plane.options(priority=priority, timeout_us=timeout, early_exit=params.get("early_exit", True))
