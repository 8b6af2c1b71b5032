"""Export a built network to ONNX for deployment and for latency measurement.

The model uses opset 17 and the legacy TorchScript exporter, because TensorRT 8.5 (JetPack 5)
accepts no newer opset. It has one fixed input of shape 1 x 3 x H x W and all weights are
stored inside the file, with no external data file.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

import torch
from torch import nn

from edge_runtime.atomic import write_bytes_atomic
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# ONNX files larger than protobuf's 2 GiB limit need an external data file.
_PROTOBUF_LIMIT_BYTES = 2 * 1024 ** 3


@dataclass(frozen=True)
class OnnxExport:
    """The result of an export: the file, its input shape and the tensor names a runtime feeds and reads."""

    path: Path
    input_shape: Tuple[int, int, int, int]
    opset: int
    input_name: str
    output_name: str
    size_bytes: int

    def describe(self) -> Dict[str, Any]:
        return {
            "file": self.path.name,
            "opset": self.opset,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_shape": list(self.input_shape),
            "size_bytes": self.size_bytes,
        }


def legacy_export_keywords() -> Dict[str, Any]:
    """Keywords that select the TorchScript exporter on this torch version.

    torch 2.9 made the torch.export-based exporter the default (as its deprecation warning
    states), and torch 2.0 has no `dynamo` keyword, so it is passed only where accepted.
    """
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        return {"dynamo": False}
    return {}


def export_onnx_bytes(network: nn.Module, input_size: Union[int, Tuple[int, int]], *, opset: int = ONNX_OPSET) -> bytes:
    """Serialise `network` in eval mode for a 1 x 3 x H x W input; return the ONNX model bytes.

    The network's training flags are restored afterwards.
    """
    height, width = _height_width(input_size)
    example = torch.zeros(1, 3, height, width)
    buffer = io.BytesIO()
    with _eval_mode(network), torch.no_grad(), _quiet_legacy_exporter():
        torch.onnx.export(
            network,
            (example,),
            buffer,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            **legacy_export_keywords(),
        )
    data = buffer.getvalue()
    if len(data) >= _PROTOBUF_LIMIT_BYTES:
        raise EdgeNasError(
            f"the exported model has {len(data):,} bytes, above the 2 GiB that one ONNX file can hold; "
            "choose a smaller architecture (--max-params)"
        )
    return data


def export_onnx(
    network: nn.Module,
    path: Union[str, Path],
    input_size: Union[int, Tuple[int, int]],
    *,
    opset: int = ONNX_OPSET,
    check: bool = True,
) -> OnnxExport:
    """Export `network` to `path` atomically: a reader sees the old file or the complete new one.

    With `check`, the model is loaded back and validated by `onnx.checker` before it is written.
    """
    path = Path(path)
    data = export_onnx_bytes(network, input_size, opset=opset)
    if check:
        import onnx

        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    write_bytes_atomic(path, data)
    height, width = _height_width(input_size)
    logger.debug("exported %s (%d bytes, opset %d)", path, len(data), opset)
    return OnnxExport(
        path=path,
        input_shape=(1, 3, height, width),
        opset=opset,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        size_bytes=len(data),
    )


def _height_width(input_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = input_size
    return int(height), int(width)


@contextlib.contextmanager
def _eval_mode(network: nn.Module) -> Iterator[None]:
    flags = {name: module.training for name, module in network.named_modules()}
    network.eval()
    try:
        yield
    finally:
        for name, module in network.named_modules():
            module.train(flags.get(name, module.training))


@contextlib.contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    # torch >= 2.9 warns on every use of the TorchScript exporter, which is chosen on purpose here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
