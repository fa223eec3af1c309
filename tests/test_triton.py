"""export-triton without a server (issue 17): the repository's layout, its dynamic batch axis,
the config.pbtxt files parsed with Triton's own schema (tritonclient's model_config_pb2), and the
client's errors. The two models themselves run only in a real Triton server:
tests/test_triton_server.py under `make test-triton` (masks byte for byte those of `liverkd infer`,
one-line errors, batching), never against a stand-in here.
"""

from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

import liverkd.cli  # noqa: F401  (registers every command)
from liverkd import models
from liverkd.cli.app import app
from liverkd.core.errors import LiverkdError
from liverkd.deploy.triton import repository as R


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The packaged model's repository with the network in the Python backend (as under pytriton)."""
    out = tmp_path_factory.mktemp("triton") / "model_repository"
    result = R.export_repository(models.path(), out, network="python")
    assert set(result.models) == {R.SEG_MODEL, R.NET_MODEL}
    return out


# ---------------------------------------------------------------- the repository


def test_layout(repo):
    assert (repo / "liver_seg" / "config.pbtxt").is_file()
    assert (
        "from liverkd.deploy.triton.seg_model import TritonPythonModel" in (repo / "liver_seg/1/model.py").read_text()
    )
    assert (
        "from liverkd.deploy.triton.net_model import TritonPythonModel" in (repo / "liver_net/1/model.py").read_text()
    )
    settings = R.load_settings(repo / "liver_seg" / "1")
    assert settings["roi_size"] == [128, 128, 128] and settings["spec"]["spacing"] == [3.0, 3.0, 3.0]
    assert settings["network"] == {"model": "liver_net", "input": "input", "output": "logits"}


def test_overlap_is_infers():
    from liverkd.deploy.segment import Segmenter

    assert inspect.signature(Segmenter.__init__).parameters["overlap"].default == R.OVERLAP


def test_dynamic_batch_axis(repo):
    """The network's declared batch axis is dynamic; every node as in the bundle's file."""
    onnx = pytest.importorskip("onnx")
    edited = onnx.load(str(repo / "liver_net" / "1" / "model.onnx"))
    original = onnx.load(str(models.path() / "model.onnx"))
    for value in (edited.graph.input[0], edited.graph.output[0]):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert [d.dim_value for d in value.type.tensor_type.shape.dim[1:]] in ([1, 128, 128, 128], [2, 128, 128, 128])
    assert [n.SerializeToString() for n in edited.graph.node] == [n.SerializeToString() for n in original.graph.node]


@pytest.mark.parametrize("network", R.NETWORKS)
def test_configs_parse_with_tritons_schema(tmp_path, network):
    pytest.importorskip("tritonclient.grpc", exc_type=ImportError)
    R.export_repository(models.path(), tmp_path, network=network, check=False)
    seg = R.parse_config((tmp_path / "liver_seg" / "config.pbtxt").read_text())
    net = R.parse_config((tmp_path / "liver_net" / "config.pbtxt").read_text())
    assert (seg.name, seg.backend, seg.max_batch_size) == ("liver_seg", "python", 0)
    assert [(i.name, i.data_type, list(i.dims)) for i in seg.input] == [("NIFTI", 13, [1])]  # TYPE_STRING
    assert [o.name for o in seg.output] == ["MASK", "INFO"]
    assert [(g.count, g.kind) for g in seg.instance_group] == [(2, 2)]  # KIND_CPU
    assert not seg.HasField("dynamic_batching")
    assert (net.name, net.backend, net.max_batch_size) == ("liver_net", network, 4)
    assert list(net.input[0].dims) == [1, 128, 128, 128] and list(net.output[0].dims) == [2, 128, 128, 128]
    assert net.HasField("dynamic_batching") and net.dynamic_batching.max_queue_delay_microseconds == 0
    assert [g.kind for g in net.instance_group] == [0 if network == "onnxruntime" else 2]  # KIND_AUTO / KIND_CPU


def test_batch_one_repository(tmp_path):
    """--max-batch-size 0: the bundle's ONNX as it is, full shapes in the config, no batching."""
    result = R.export_repository(models.path(), tmp_path, max_batch_size=0)
    assert (tmp_path / "liver_net/1/model.onnx").read_bytes() == (models.path() / "model.onnx").read_bytes()
    text = (tmp_path / "liver_net" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in text and "dims: [ 1, 1, 128, 128, 128 ]" in text and "dynamic_batching" not in text
    if result.schema_checked:
        assert R.parse_config(text).max_batch_size == 0


def test_cli_export_refuses_to_replace(tmp_path):
    runner = CliRunner()
    args = ["export-triton", "--out", str(tmp_path / "repo"), "--max-batch-size", "0"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "liver_seg, liver_net" in first.output
    again = runner.invoke(app, args)
    assert isinstance(again.exception, LiverkdError) and "--overwrite" in str(again.exception)
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["liver_net", "liver_seg"]  # no leftovers


def test_client_without_a_server(tmp_path):
    """No server at the URL: one line naming the file and the URL, and no output left."""
    pytest.importorskip("tritonclient.http")
    from liverkd.deploy.triton.client import TritonClientError, TritonSegmenter
    from liverkd.deploy.triton.server import free_port

    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"\x1f\x8b" + b"0" * 100)
    url = f"127.0.0.1:{free_port()}"
    with TritonSegmenter(url, timeout=5) as client, pytest.raises(TritonClientError, match="ct.nii.gz") as caught:
        client.segment_file(ct)
    assert url in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]
