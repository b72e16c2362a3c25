"""KServe v2 / Triton HTTP codec: JSON tensors and Triton's binary tensor data extension.

Binary form (as `tritonclient.http` sends it): the body starts with `Inference-Header-Content-Length`
bytes of JSON; the rest is each tensor's raw data, in input order, `parameters.binary_data_size`
bytes each. BYTES elements are a 4-byte little-endian length followed by the bytes. In the JSON
form image bytes travel as base64 strings (JSON strings must be UTF-8). Outputs are binary when
the output asks (`parameters.binary_data`) or the request does (`binary_data_output`).
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import bad_request


@dataclass(frozen=True)
class Tensors:
    """The tensor names one modality's model takes and gives."""

    modality: str
    input: str  # BYTES [n]
    output: str  # BYTES [n * num_return_sequences]
    item: str  # what one input element is, for messages

    @property
    def outputs(self) -> dict[str, str]:
        return {self.output: "BYTES", "TOKENS": "INT64"}


IMAGE = Tensors("image", "IMAGE", "CAPTION", "encoded image")
TEXT = Tensors("text", "TEXT", "OUTPUT", "UTF-8 string")
BY_MODALITY = {t.modality: t for t in (IMAGE, TEXT)}
# The image names stay importable: the image server was the only one before text models.
INPUT = IMAGE.input
OUTPUTS = IMAGE.outputs
# Triton's reserved request parameters: never generation options.
RESERVED = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"}
BINARY_DATA_OUTPUT = "binary_data_output"


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    items: list[bytes] | list[str]  # images (bytes) or texts (str), per the model's modality
    options: dict[str, Any]
    outputs: dict[str, bool]  # name -> as binary data
    timeout: float | None  # seconds (Triton's `timeout` parameter is microseconds)


def model_metadata(name: str, tensors: Tensors = IMAGE) -> dict[str, Any]:
    return {
        "name": name,
        "versions": ["1"],
        "platform": "vedrt",
        "inputs": [{"name": tensors.input, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": tensors.output, "datatype": "BYTES", "shape": [-1]},
            {"name": "TOKENS", "datatype": "INT64", "shape": [-1, -1]},
        ],
    }


def model_config(
    name: str, max_rows: int, defaults: dict[str, Any], tensors: Tensors = IMAGE
) -> dict[str, Any]:
    """Triton-style config; max_batch_size 0: the inputs are the tensor, not a batch dimension."""
    return {
        "name": name,
        "platform": "vedrt",
        "backend": "vedrt",
        "max_batch_size": 0,
        "input": [{"name": tensors.input, "data_type": "TYPE_STRING", "dims": [-1]}],
        "output": [
            {"name": tensors.output, "data_type": "TYPE_STRING", "dims": [-1]},
            {"name": "TOKENS", "data_type": "TYPE_INT64", "dims": [-1, -1]},
        ],
        "parameters": {
            "max_rows": {"string_value": str(max_rows)},
            **{k: {"string_value": json.dumps(v)} for k, v in defaults.items()},
        },
    }


def parse_infer(body: bytes, header_length: str | None, tensors: Tensors = IMAGE) -> InferRequest:
    """Body (+ the Inference-Header-Content-Length header) -> a checked request, or a 400."""
    header, binary = _split(body, header_length)
    if not isinstance(header, dict):
        raise bad_request("the inference request must be a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request(f"the request needs 'inputs' with one tensor named {tensors.input}")
    names = [t.get("name") if isinstance(t, dict) else None for t in inputs]
    unknown = [n for n in names if n != tensors.input]
    if unknown or len(names) != 1:
        raise bad_request(
            f"unknown input tensor {unknown[0] if unknown else names!r}: this {tensors.modality} "
            f"model takes exactly one input, {tensors.input} (BYTES, shape [n])"
        )
    items, used = _input_tensor(inputs[0], binary, tensors)
    if used != len(binary):
        raise bad_request(f"{len(binary) - used} bytes of binary data belong to no input")
    params = _parameters(header, "the request")
    binary_all = _flag(params, BINARY_DATA_OUTPUT, False, "the request")
    options = {k: v for k, v in params.items() if k not in RESERVED and k != BINARY_DATA_OUTPUT}
    return InferRequest(
        id=header.get("id"),
        items=items,
        options=options,
        outputs=_requested_outputs(header.get("outputs"), binary_all, tensors),
        timeout=_timeout(params.get("timeout")),
    )


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    """`owner["parameters"]`: absent, or a JSON object (a list or a string is a 400)."""
    params = owner.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"'parameters' of {where} must be a JSON object, got {params!r:.60}")
    return params


def _flag(params: dict[str, Any], name: str, default: bool, where: str) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):  # "false" would be truthy
        raise bad_request(f"{name} of {where} must be true or false, got {value!r:.60}")
    return value


def _timeout(value: Any) -> float | None:
    """Triton's `timeout` parameter (microseconds) as seconds; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise bad_request(f"timeout must be a positive number of microseconds, got {value!r:.60}")
    return value / 1e6


def _split(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise bad_request("Inference-Header-Content-Length must be an integer") from None
        if not 0 < size <= len(body):
            raise bad_request(f"Inference-Header-Content-Length {size} does not fit the body")
        json_part, binary = body[:size], body[size:]
    return load_json(json_part, "the request header"), binary


def load_json(data: bytes, what: str) -> Any:
    """JSON from a client, or a 400 (nesting too deep for the parser is one too)."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"{what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise bad_request(f"{what} nests too deeply to parse") from None


def _input_tensor(
    tensor: dict[str, Any], binary: bytes, tensors: Tensors
) -> tuple[list[bytes] | list[str], int]:
    name = tensors.input
    if tensor.get("datatype") != "BYTES":
        raise bad_request(f"{name} must have datatype BYTES, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or len(shape) not in (1, 2)
        or (len(shape) == 2 and shape[1] != 1)
        or shape[0] < 1
    ):
        raise bad_request(f"{name} must have shape [n] (n >= 1 {tensors.item}s), got {shape!r}")
    count = shape[0]
    size = _parameters(tensor, f"input {name}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise bad_request(f"{name}: binary_data_size {size!r} does not fit the body")
        items: list[Any] = deserialize_bytes(binary[:size], name)
        if tensors is TEXT:
            items = [_from_utf8(item, i) for i, item in enumerate(items)]
        used = size
    else:
        data = _flatten(tensor.get("data"), name)
        convert = _from_string if tensors is TEXT else _from_base64
        items = [convert(item, i) for i, item in enumerate(data)]
        used = 0
    if len(items) != count:
        raise bad_request(f"{name} has shape {shape} but carries {len(items)} elements")
    return items, used


def _flatten(data: Any, name: str) -> list[Any]:
    if data is None:
        raise bad_request(f"{name} has neither 'data' nor parameters.binary_data_size")
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item, name) if isinstance(item, list) else [item])
    return out


def _from_base64(item: Any, index: int) -> bytes:
    if not isinstance(item, str):
        raise bad_request(f"{INPUT} element {index}: JSON images must be base64 strings")
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{INPUT} element {index}: not valid base64") from None


def _from_string(item: Any, index: int) -> str:
    if not isinstance(item, str):
        raise bad_request(f"{TEXT.input} element {index}: JSON texts must be strings")
    return item


def _from_utf8(item: bytes, index: int) -> str:
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{TEXT.input} element {index}: not valid UTF-8") from None


def _requested_outputs(outputs: Any, binary_all: bool, tensors: Tensors) -> dict[str, bool]:
    # none named, or an empty list (which used to answer no tensor at all): the captions
    if outputs is None or outputs == []:
        return {tensors.output: binary_all}
    if not isinstance(outputs, list):
        raise bad_request("'outputs' must be a list")
    requested: dict[str, bool] = {}
    for item in outputs:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in tensors.outputs:
            available = ", ".join(tensors.outputs)
            raise bad_request(f"unknown output {name!r} (available: {available})")
        params = _parameters(item, f"output {name}")
        if "classification" in params:
            raise bad_request("the classification extension is not supported")
        requested[name] = _flag(params, "binary_data", binary_all, f"output {name}")
    return requested


def deserialize_bytes(buffer: bytes, name: str = INPUT) -> list[bytes]:
    """Triton's BYTES encoding: each element a uint32 LE length, then its bytes."""
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise bad_request(f"{name}: binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise bad_request(f"{name}: binary element of {length} bytes runs past the data")
        items.append(bytes(buffer[offset : offset + length]))
        offset += length
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def encode_infer(
    request: InferRequest, model: str, captions: list[str], tokens: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; binary outputs follow the JSON in the requested order.

    `captions`: the texts of the BYTES output (CAPTION or OUTPUT, whichever was asked for)."""
    tensors, blobs = [], []
    for name, binary in request.outputs.items():
        if name != "TOKENS":
            shape, data = [len(captions)], captions
            raw = serialize_bytes([c.encode() for c in captions]) if binary else b""
        else:
            tokens64 = np.ascontiguousarray(tokens, dtype="<i8")
            shape, data = list(tokens64.shape), tokens64.ravel().tolist()
            raw = tokens64.tobytes() if binary else b""
        datatype = "INT64" if name == "TOKENS" else "BYTES"
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
