"""A real Triton Inference Server (issue 17): the tritonserver bundled in NVIDIA's nvidia-pytriton
wheel, on loopback, serving `liverkd export-triton --network python`'s repository for the packaged
model. Three phantoms and the real CT of ../shared/data/totalseg_example go through it with
`liverkd triton-infer`; every mask must be the file `liverkd infer` writes, byte for byte (so
also the same voxels, shape, affine and header). Then the server is stopped.

Runs under `make test-triton` (.venv-triton: the wheel needs numpy < 2). Elsewhere, and where
the server cannot start, skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import threading
import urllib.request

import nibabel as nib
import numpy as np
import pytest

from liverkd import models
from liverkd.core import volume as V
from liverkd.core.synth.dataset import synth_case

if importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None:
    pytest.skip(
        "nvidia-pytriton (the bundled tritonserver) and tritonclient are not installed in this Python: "
        "`make test-triton` makes .venv-triton with them",
        allow_module_level=True,
    )

from liverkd.deploy.triton.client import TritonSegmenter  # noqa: E402
from liverkd.deploy.triton.repository import export_repository  # noqa: E402
from liverkd.deploy.triton.server import LocalTriton, TritonServerError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::liverkd.core.volume.VolumeWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    export_repository(models.path(), repo, network="python")
    local = _started(repo)
    yield local
    local.stop()
    with pytest.raises(OSError):  # stopped: nothing listens there any more
        urllib.request.urlopen(f"http://{local.url}/v2/health/live", timeout=2)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three CTs: RAS 6 mm; LPS (x and y flipped); anisotropic and larger than one 128^3 window at
    3 mm (8 windows: the sliding window, several BLS calls per volume)."""
    folder = tmp_path_factory.mktemp("phantoms")
    cases = {
        "ras": synth_case(21)[0],
        "lps": synth_case(22)[0],
        "window": synth_case(23, shape=(72, 72, 140), spacing=(5.5, 5.5, 3.2))[0],
    }
    paths = []
    for name, image in cases.items():
        array, affine = image.array, image.affine
        if name == "lps":
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = np.asarray(array.shape[:2]) - 1
            array, affine = array[::-1, ::-1].copy(), affine @ flip
        path = folder / f"{name}.nii.gz"
        nib.save(V.to_nifti(array, affine, image.header), path)
        paths.append(path)
    return paths


def run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def infer_and_serve(inputs, tmp_path, liverkd_cmd, url):
    """(liverkd infer's masks, triton-infer's masks) of `inputs`, by the two commands."""
    ref, served = tmp_path / "infer", tmp_path / "triton"
    ref.mkdir()
    served.mkdir()
    done = run([*liverkd_cmd, "infer", *inputs, "-o", ref, "--quiet"])
    assert done.returncode == 0, done.stderr
    done = run([*liverkd_cmd, "triton-infer", *inputs, "--url", url, "-o", served])
    assert done.returncode == 0, done.stderr
    name = lambda p: p.name.replace(".nii.gz", "_liver.nii.gz")
    return [ref / name(p) for p in inputs], [served / name(p) for p in inputs]


def assert_same_mask(served, reference, source):
    a, b, src = nib.load(served), nib.load(reference), nib.load(source)
    assert a.shape == b.shape == src.shape
    assert np.array_equal(a.affine, src.affine) and np.array_equal(b.affine, src.affine)
    assert a.header.binaryblock == b.header.binaryblock
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), f"{served}: voxels differ"
    assert served.read_bytes() == reference.read_bytes()


def test_phantoms_equal_liverkd_infer(server, phantoms, tmp_path, liverkd_cmd):
    refs, outs = infer_and_serve(phantoms, tmp_path, liverkd_cmd, server.url)
    for ref, out, src in zip(refs, outs, phantoms):
        assert_same_mask(out, ref, src)
        assert np.asanyarray(nib.load(out).dataobj).any(), f"{out}: empty mask"


def test_real_ct_equals_liverkd_infer(server, shared_data, tmp_path, liverkd_cmd):
    ct = shared_data / "ct_3mm.nii.gz"
    (ref,), (out,) = infer_and_serve([ct], tmp_path, liverkd_cmd, server.url)
    assert_same_mask(out, ref, ct)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """A second server whose liver_net waits up to 0.5 s to fill a batch, and 4 liver_seg processes: the
    windows of concurrent volumes are then batched for sure (with the shipped 0 s wait and 2 processes,
    at most one window queues while another runs, so every execution is batch 1)."""
    repo = tmp_path_factory.mktemp("triton-batching") / "model_repository"
    export_repository(models.path(), repo, network="python", instances=4)
    config = repo / "liver_net" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("max_queue_delay_microseconds: 0", "max_queue_delay_microseconds: 500000")
    )
    local = _started(repo)
    yield local
    local.stop()


def _started(repo) -> LocalTriton:
    """A running tritonserver on `repo`, or the test skipped with the server's reason."""
    local = LocalTriton(repo)
    try:
        local.start()
    except TritonServerError as e:
        pytest.skip(f"the bundled tritonserver cannot start here: {e}")
    return local


def test_batched_windows_go_back_to_their_volumes(batching_server, phantoms):
    """Four clients at once: liver_net runs their windows in batches, and each client gets the mask it
    gets alone, byte for byte."""
    url = batching_server.url
    sent = [*phantoms, phantoms[0]]
    alone = {}
    with TritonSegmenter(url) as client:
        for p in phantoms:
            alone[p] = client.segment_bytes(p.read_bytes())[0]
    together, errors = [None] * len(sent), []
    start = threading.Barrier(len(sent))

    def send(i, path):
        try:
            with TritonSegmenter(url) as client:
                start.wait()
                together[i] = client.segment_bytes(path.read_bytes())[0]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i, p)) for i, p in enumerate(sent)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [m == alone[p] for m, p in zip(together, sent)] == [True] * len(sent)
    with urllib.request.urlopen(f"http://{url}/v2/models/liver_net/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]
    batched = {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}
    assert any(size > 1 for size in batched), f"no batch of more than one window: {batched}"


def test_bad_volume_is_one_line(server, tmp_path, liverkd_cmd):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(200))
    done = run([*liverkd_cmd, "triton-infer", bad, "--url", server.url])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and "liverkd-triton-" not in lines[0]
    assert not (tmp_path / "bad_liver.nii.gz").exists()
