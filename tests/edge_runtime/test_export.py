"""ONNX export: the exported model computes what the torch network computes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edge_runtime.export import INPUT_NAME, ONNX_OPSET, export_onnx, legacy_export_keywords
from models.spaces import get_space

ARCH = "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|avg_pool_3x3~0|none~1|nor_conv_3x3~2|"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    space = get_space("nb201", num_classes=5, input_size=16)
    torch.manual_seed(0)
    network = space.build(space.parse(ARCH))
    network.train()  # the export must switch to eval mode by itself
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(network, path, 16)
    return network, path, result


def test_export_matches_torch_output(exported):
    import onnxruntime as ort

    network, path, _ = exported
    inputs = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    network.eval()
    with torch.no_grad():
        expected = network(inputs).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {INPUT_NAME: inputs.numpy()})
    assert actual.shape == (1, 5)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_export_restores_training_flag(exported):
    network, _, _ = exported
    network.train()
    export_onnx(network, exported[1], 16)
    assert network.training


def test_export_writes_opset_17_without_external_data(exported):
    _, path, result = exported
    model = onnx.load(str(path))
    assert [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    assert not any(
        tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    assert result.size_bytes == path.stat().st_size


def test_export_input_shape_is_fixed(exported):
    _, path, result = exported
    model = onnx.load(str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 16, 16]
    assert result.input_shape == (1, 3, 16, 16)


def test_legacy_keywords_match_signature():
    import inspect

    accepts_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    assert legacy_export_keywords() == ({"dynamo": False} if accepts_dynamo else {})
