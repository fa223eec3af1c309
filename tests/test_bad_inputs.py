"""Bad inputs: one clear stderr line naming the file and the problem, the other inputs still
processed, a non-zero exit, and no output (nor temp leftovers). Odd-but-valid inputs: a warning."""

import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import make_bundle, nifti, synthetic_ct

from liverkd.core.volume import VolumeError, VolumeWarning
from liverkd.deploy import Segmenter

NOBODY = 65534


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "student")


def good_ct(path):
    nib.save(nifti(synthetic_ct((32, 30, 24))), path)
    return path


def _small_nii(path):
    nib.save(nib.Nifti1Image(synthetic_ct((16, 16, 16)), np.eye(4)), path)
    return path


def not_nifti(tmp):
    (tmp / "scan.nii").write_text("patient notes, not an image\n" * 20)
    return tmp / "scan.nii", "not a NIfTI"


def gzip_of_text(tmp):
    (tmp / "scan.nii.gz").write_text("patient notes, not an image\n" * 20)
    return tmp / "scan.nii.gz", "not a gzip file"


def truncated_gzip(tmp):
    good_ct(tmp / "full.nii.gz")
    data = (tmp / "full.nii.gz").read_bytes()
    (tmp / "full.nii.gz").unlink()
    (tmp / "scan.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp / "scan.nii.gz", "truncated"


def two_d(tmp):
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), tmp / "scan.nii.gz")
    return tmp / "scan.nii.gz", "2-D image"


def single_slice(tmp):
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 1), np.int16), np.eye(4)), tmp / "scan.nii.gz")
    return tmp / "scan.nii.gz", "2-D image"


def zero_axis(tmp):
    nib.save(nib.Nifti1Image(np.zeros((16, 0, 16), np.int16), np.eye(4)), tmp / "scan.nii.gz")
    return tmp / "scan.nii.gz", "zero-sized axis"


def nan_voxels(tmp):
    a = synthetic_ct((16, 16, 16)).astype(np.float32)
    a[3, 4, 5] = np.nan
    a[6, 7, 8] = np.inf
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp / "scan.nii.gz")
    return tmp / "scan.nii.gz", "2 NaN or infinite voxels"


def absurd_dims(tmp):
    """A real 16^3 file whose header is patched to claim 30000^3 voxels (54 TB of int16)."""
    raw = bytearray(_small_nii(tmp / "small.nii").read_bytes())
    (tmp / "small.nii").unlink()
    raw[42:48] = struct.pack("<3h", 30000, 30000, 30000)  # dim[1..3] of the NIfTI-1 header
    (tmp / "scan.nii").write_bytes(raw)
    return tmp / "scan.nii", "header claims"


def lying_gzip_dims(tmp):
    """Under the voxel limit (0.9e9) but far more than the small gzip can hold: refused before allocating."""
    img = nib.Nifti1Image(synthetic_ct((16, 16, 16)), np.eye(4))
    img.header.set_data_shape((1500, 1500, 400))
    raw = img.header.binaryblock + b"\0" * 4 + np.asarray(img.dataobj).tobytes(order="F")
    import gzip

    (tmp / "scan.nii.gz").write_bytes(gzip.compress(raw))
    return tmp / "scan.nii.gz", "header claims"


def missing(tmp):
    return tmp / "scan.nii.gz", "no such file"


def empty_file(tmp):
    (tmp / "scan.nii.gz").write_bytes(b"")
    return tmp / "scan.nii.gz", "empty file"


BAD = [not_nifti, gzip_of_text, truncated_gzip, two_d, single_slice, zero_axis, nan_voxels, absurd_dims,
       lying_gzip_dims, missing, empty_file]  # fmt: skip


def run(cmd, *args, **kw):
    return subprocess.run([*cmd, "infer", *map(str, args)], capture_output=True, text=True, timeout=300, **kw)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("make_bad", BAD, ids=[f.__name__ for f in BAD])
def test_bad_input_is_one_line_and_the_rest_still_runs(liverkd_cmd, engine, tmp_path, make_bad):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad, problem = make_bad(bad_dir)
    good = good_ct(tmp_path / "good.nii.gz")
    proc = run(liverkd_cmd, bad, good, "--engine", engine, "--stats", "--preview")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(bad) in line and problem in line, line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in bad_dir.iterdir()) == ([bad.name] if bad.exists() else [])
    assert (tmp_path / "good_liver.nii.gz").is_file()  # the other input was processed


@pytest.mark.parametrize("make_bad", [nan_voxels, zero_axis, two_d], ids=["nan", "zero_axis", "two_d"])
def test_segment_api_raises_volume_error_for_in_memory_images(engine, tmp_path, make_bad):
    bad, problem = make_bad(tmp_path)
    img = nib.load(bad)
    with Segmenter.load(engine, backend="onnxruntime") as seg, pytest.raises(VolumeError, match=problem):
        seg.segment(img)


def test_output_folder_that_is_a_file(liverkd_cmd, engine, tmp_path):
    src = good_ct(tmp_path / "ct.nii.gz")
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file where the output folder should be")
    other = good_ct(tmp_path / "other.nii.gz")
    proc = run(liverkd_cmd, src, other, "-o", blocker / "sub", "--engine", engine)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert str(blocker / "sub") in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "ct.nii.gz", "other.nii.gz"]


def test_output_file_whose_folder_is_a_file(liverkd_cmd, engine, tmp_path):
    src = good_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "blocker").write_text("not a folder")
    proc = run(liverkd_cmd, src, "-o", tmp_path / "blocker" / "mask.nii.gz", "--engine", engine)
    assert proc.returncode == 1
    (line,) = error_lines(proc.stderr)
    assert str(src) in line and "does not exist or is not a folder" in line


# ------------------------------------------------ permissions (need a user that permissions apply to)


def _run_cli_as_nobody(args, work: Path) -> subprocess.CompletedProcess:
    """`liverkd infer ARGS` in a forked child that has switched to uid `nobody`, so the kernel
    checks permissions for real. (A fresh `nobody` interpreter is no option here: the Python
    install lives under /root, which `nobody` cannot enter; the fork keeps it in memory.)"""
    from liverkd.cli import app

    # Warm-up as root, in this process, so that every module the command imports is loaded
    # before the switch (imports after it could not read the standard library under /root).
    warm = Path(tempfile.mkdtemp(prefix="liverkd-warm-"))
    try:
        app(args=["infer", str(good_ct(warm / "ct.nii.gz")), "--engine", str(work / "engine")], prog_name="liverkd")
    except SystemExit as e:
        assert e.code in (0, None), f"warm-up run failed with exit code {e.code}"
    finally:
        shutil.rmtree(warm, ignore_errors=True)

    out_path, err_path = work / "stdout.txt", work / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), fd)
            sys.stdout = open(1, "w", closefd=False)  # not pytest's capture objects
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                app(args=["infer", *map(str, args)], prog_name="liverkd")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), stdout, stderr)


@pytest.fixture
def unprivileged(engine, liverkd_cmd):
    """(workdir, run): a world-writable folder and a way to run `liverkd infer` as a user that
    permissions apply to. Root ignores chmod, so as root the command runs as `nobody`."""
    work = Path(tempfile.mkdtemp(prefix="liverkd-perm-"))
    work.chmod(0o777)
    shutil.copytree(engine, work / "engine")
    for p in [work / "engine", *(work / "engine").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    if os.geteuid() == 0:
        yield work, lambda *args: _run_cli_as_nobody(args, work)
    else:
        yield work, lambda *args: run(liverkd_cmd, *args)
    shutil.rmtree(work, ignore_errors=True)


def test_unreadable_input(unprivileged):
    work, run_infer = unprivileged
    locked = good_ct(work / "locked.nii.gz")
    locked.chmod(0o000)
    good = good_ct(work / "good.nii.gz")
    good.chmod(0o644)
    proc = run_infer(locked, good, "--engine", work / "engine")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(locked) in line and "not readable" in line
    assert not (work / "locked_liver.nii.gz").exists()
    assert (work / "good_liver.nii.gz").is_file()


def test_output_folder_not_writable(unprivileged):
    work, run_infer = unprivileged
    src = good_ct(work / "ct.nii.gz")
    src.chmod(0o644)
    readonly = work / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    proc = run_infer(src, "-o", readonly, "--engine", work / "engine")
    assert proc.returncode == 1, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert str(src) in line and "not writable" in line
    assert os.listdir(readonly) == []


# ------------------------------------------------ odd but valid: works, with a warning


def _odd_inputs(tmp):
    ct = synthetic_ct((36, 32, 24))
    lps = np.diag([-6.0, -6.0, 6.0, 1.0])
    c, s = np.cos(0.35), np.sin(0.35)
    oblique = np.array([[6 * c, -6 * s, 0, 0], [6 * s, 6 * c, 0, 0], [0, 0, 6, 0], [0, 0, 0, 1.0]])
    mr = (np.clip(ct, -200, 300) + 200).astype(np.int16)  # no air near -1000: not CT in HU
    cases = {
        "four_d.nii.gz": (nifti(np.stack([ct, ct], axis=-1)), "4-D image"),
        "lps.nii.gz": (nifti(ct, affine=lps), "orientation LPS"),
        "oblique.nii.gz": (nifti(ct, affine=oblique), "oblique"),
        "aniso.nii.gz": (nifti(ct[:, :, ::2].copy(), affine=np.diag([1.5, 1.5, 12.0, 1.0])), "anisotropic"),
        "int8.nii.gz": (nifti(np.clip(ct // 10, -128, 127).astype(np.int8)), "voxel type int8"),
        "float64.nii.gz": (nifti(ct.astype(np.float64)), "voxel type float64"),
        "mr.nii.gz": (nifti(mr), "do not look like CT"),
    }
    for name, (img, _) in cases.items():
        nib.save(img, tmp / name)
    return {tmp / name: expected for name, (_, expected) in cases.items()}


def test_odd_but_valid_inputs_work_with_a_warning(liverkd_cmd, engine, tmp_path):
    odd = _odd_inputs(tmp_path)
    proc = run(liverkd_cmd, *odd, "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    for path, expected in odd.items():
        assert any(str(path) in w and expected in w for w in warning_lines), (path, expected, warning_lines)
        out = tmp_path / (path.name.removesuffix(".nii.gz") + "_liver.nii.gz")
        mask, img = nib.load(out), nib.load(path)
        assert mask.shape == img.shape[:3] and np.array_equal(mask.affine, img.affine)


def test_odd_inputs_warn_through_the_python_api(engine, tmp_path):
    odd = _odd_inputs(tmp_path)
    with Segmenter.load(engine, backend="onnxruntime") as seg:
        for path, expected in odd.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = seg.segment_file(path)
            assert any(expected in w for w in result.warnings), (path, result.warnings)
            assert any(issubclass(c.category, VolumeWarning) and expected in str(c.message) for c in caught)


def test_permission_bits_of_outputs_follow_the_umask(engine, tmp_path):
    src = good_ct(tmp_path / "ct.nii.gz")
    with Segmenter.load(engine, backend="onnxruntime") as seg:
        result = seg.segment_file(src, stats=True)
    umask = os.umask(0o022)
    os.umask(umask)
    for p in (result.output, result.stats):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask
