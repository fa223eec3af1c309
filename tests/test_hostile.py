"""Hostile inputs through the real `liverkd infer` (a subprocess, real files, a real ONNX engine).

Each refused input: exit code 1, exactly one stderr line, naming the file (escaped) and the problem,
no traceback, nothing written beside it, and the other input of the run still segmented. Each
hostile but valid input (odd names, units, compression): segmented, with the input's geometry in mm.
stdout is ASCII-strict (PYTHONIOENCODING=ascii, as under LC_ALL=C): a name it cannot encode must
not stop a run. Issue 12, items 9, 12, 13 and 15."""

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _segment_bundle import make_bundle, nifti, synthetic_ct

from liverkd.core.volume import MAX_DATA_BYTES, MAX_GRID_VOXELS, printable

pytest.importorskip("pydicom", reason="the optional extra `dicom` (pydicom) is not installed")
from test_dicom import deflate_bomb, write_series  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("engines") / "student")


def run_infer(liverkd_cmd, *args):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    cmd = [*liverkd_cmd, "infer", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=300)


def ct_file(path, shape=(32, 30, 24), spacing=(6.0, 6.0, 6.0), dtype=np.int16):
    nib.save(nifti(synthetic_ct(shape, spacing=spacing, dtype=dtype), spacing=spacing), path)
    return path


def patched(path, *edits):
    """The NIfTI-1 file at `path` with raw header fields overwritten: (offset, struct format, value...)."""
    raw = bytearray(path.read_bytes())
    for offset, fmt, *values in edits:
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    path.write_bytes(bytes(raw))
    return path


# ------------------------------------------------ refused: (folder) -> (path, what the error line says)


def negative_vox_offset(folder):
    return patched(ct_file(folder / "scan.nii"), (108, "<f", -1000.0)), "invalid NIfTI header (vox offset -1000"


def datatype_999(folder):
    return patched(ct_file(folder / "scan.nii"), (70, "<h", 999)), "invalid NIfTI header (data code 999"


def float128(folder):
    return patched(ct_file(folder / "scan.nii"), (70, "<hh", 1536, 128)), "invalid NIfTI header (data code 1536"


def vox_offset_1e30(folder):
    return patched(ct_file(folder / "scan.nii"), (108, "<f", 1e30)), f"over the limit of {MAX_DATA_BYTES:,}"


def tiny_voxels(folder):
    """177 kB at 0.006 mm: HEAD needed 3.8 GB to resample it."""
    return ct_file(folder / "scan.nii", (48, 48, 40), (0.006,) * 3), "voxel size 0.006 x 0.006 x 0.006 mm is outside"


def huge_voxels(folder):
    """40 mm voxels: HEAD took 21 s and found a 909,312 mL liver."""
    return ct_file(folder / "scan.nii.gz", (64, 64, 48), (40.0,) * 3), "voxel size 40 x 40 x 40 mm is outside"


def huge_resampled_grid(folder):
    """A valid 20 mm volume whose 6 mm grid (the test engine's) is 151e6 voxels."""
    path = folder / "scan.nii.gz"
    nib.save(nifti(np.full((160, 160, 160), -1000, np.int16), spacing=(20.0,) * 3), path)
    return path, f"it is (533, 533, 533) = 151,419,437 voxels, over the limit of {MAX_GRID_VOXELS:,}"


def bz2_claiming_8gb(folder):
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float64)
    header.set_data_shape((1024, 1024, 1000))
    import bz2

    (folder / "scan.nii.bz2").write_bytes(bz2.compress(header.binaryblock + bytes(4096)))
    return folder / "scan.nii.bz2", f"header claims 8,388,608,000 bytes of voxels, over the limit of {MAX_DATA_BYTES:,}"


def float64_overflow(folder):
    """Finite in float64, infinite in float32: HEAD wrote an empty mask and said nothing."""
    ct = synthetic_ct((32, 30, 24)).astype(np.float64)
    ct[::2] = 1e308
    nib.save(nifti(ct), folder / "scan.nii.gz")
    return folder / "scan.nii.gz", "..1e+308: beyond +-1e+30, not CT intensities"


def one_voxel(folder):
    nib.save(nifti(np.zeros((1, 1, 1), np.int16)), folder / "scan.nii.gz")
    return folder / "scan.nii.gz", "a single voxel (shape (1, 1, 1))"


def _text_named(folder, name: str):
    (folder / name).write_text("patient notes, not an image\n" * 20)
    return folder / name, "not a NIfTI image"


def newline_in_name(folder):
    return _text_named(folder, "new\nline.nii")


def escape_sequence_in_name(folder):
    return _text_named(folder, "\x1b[2Jcleared\r.nii")


def undecodable_name(folder):
    return _text_named(folder, os.fsdecode(b"caf\xe9.nii"))


def fifo(folder):
    os.mkfifo(folder / "scan.nii")  # opening it would block for ever
    return folder / "scan.nii", "not a regular file"


def _series(folder, n=20, **kw):
    return write_series(folder / "series", synthetic_ct((40, 36, n)) + 1024, spacing=(6.0, 6.0), step=6.0, **kw)


def dicom_deflate_bomb(folder):
    """A 70 kB slice that inflates to 65 MiB (HEAD: the 4.4 GB one cost 13 GB and a minute)."""
    from liverkd.deploy.dicom import MAX_FILE_BYTES

    series = _series(folder)
    bomb = deflate_bomb(sorted(series.iterdir())[3], MAX_FILE_BYTES + 2**20)
    return series, f"{bomb}: deflated DICOM data inflates to over"


def dicom_unreadable_slice(folder):
    series = _series(folder)
    top = max(series.iterdir(), key=lambda p: p.stat().st_size)
    top.write_bytes(top.read_bytes()[:300])
    return series, f"{top}: unreadable DICOM file"


def dicom_missing_slices(folder):
    return _series(folder, 18, offsets=[6.0 * k for k in range(20) if k not in (7, 8)]), "missing slices"


def dicom_uneven_spacing(folder):
    return _series(folder, offsets=[6.0 * k + (1.5 if k > 9 else 0) for k in range(20)]), "uneven slice spacing"


def dicom_two_ct_series(folder):
    series = _series(folder, series_uid="1.2.3.1", prefix="A")
    write_series(series, np.zeros((40, 36, 20), np.int16), series_uid="1.2.3.2", prefix="B")
    return series, "2 CT series of 20 slices each"


def dicom_mr_only(folder):
    return _series(folder, modality="MR"), "no CT image series in this folder (found: MR (20 files))"


REFUSED = [
    negative_vox_offset, datatype_999, float128, vox_offset_1e30, tiny_voxels, huge_voxels, huge_resampled_grid,
    bz2_claiming_8gb, float64_overflow, one_voxel, newline_in_name, escape_sequence_in_name, undecodable_name,
    fifo, dicom_deflate_bomb, dicom_unreadable_slice, dicom_missing_slices, dicom_uneven_spacing,
    dicom_two_ct_series, dicom_mr_only,
]  # fmt: skip


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("make_bad", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_a_hostile_input_is_one_line_and_the_rest_still_runs(liverkd_cmd, engine, tmp_path, make_bad):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad, problem = make_bad(bad_dir)
    before = files_under(bad_dir)
    good = ct_file(tmp_path / "good.nii.gz")
    proc = run_infer(liverkd_cmd, bad, good, "--engine", engine, "--stats")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith(f"warning: {good}:")]
    assert len(lines) == 2 and lines[1] == "1 of 2 volumes segmented, 1 failed", lines
    assert lines[0].startswith(f"error: {printable(bad)}: ") and printable(problem) in lines[0], lines[0]
    assert files_under(bad_dir) == before  # no mask, no stats, no temp file beside the bad input
    assert (tmp_path / "good_liver.nii.gz").is_file() and (tmp_path / "good_liver.json").is_file()


# ------------------------------------------------ hostile but valid: (folder) -> path


def valid_newline_in_name(folder):
    return ct_file(folder / "new\nline.nii.gz")


def valid_undecodable_name(folder):
    return ct_file(folder / os.fsdecode(b"caf\xe9 \xff.nii.gz"))


def _units(folder, unit: str, zoom: float):
    img = nifti(synthetic_ct((32, 30, 24)), spacing=(zoom,) * 3)
    img.header.set_xyzt_units(xyz=unit)
    nib.save(img, folder / "scan.nii.gz")
    return folder / "scan.nii.gz"


def metres(folder):
    return _units(folder, "meter", 0.006)


def micrometres(folder):
    return _units(folder, "micron", 6000.0)


def extension_claiming_2gb(folder):
    """An extension whose size field says 2 GB: nibabel raised HeaderDataError; liverkd never reads extensions."""
    raw = ct_file(folder / "scan.nii").read_bytes()
    header = bytearray(raw[:348])
    header[108:112] = struct.pack("<f", 368.0)
    (folder / "scan.nii").write_bytes(bytes(header) + b"\x01\0\0\0" + struct.pack("<ii", 2**31 - 16, 6) + raw[344:])
    return folder / "scan.nii"


def valid_bz2(folder):
    return ct_file(folder / "scan.nii.bz2")


ACCEPTED = [valid_newline_in_name, valid_undecodable_name, metres, micrometres, extension_claiming_2gb, valid_bz2]


@pytest.mark.parametrize("make_odd", ACCEPTED, ids=[f.__name__ for f in ACCEPTED])
def test_a_hostile_but_valid_input_is_segmented(liverkd_cmd, engine, tmp_path, make_odd):
    from liverkd.core.volume import load

    path = make_odd(tmp_path)
    before = set(tmp_path.iterdir())
    proc = run_infer(liverkd_cmd, path, "--engine", engine)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    (out,) = set(tmp_path.iterdir()) - before
    assert proc.stdout.startswith(f"{printable(path)} -> {printable(out)}: liver "), proc.stdout
    vol, mask = load(path), nib.load(out)
    assert mask.shape == vol.shape and np.allclose(mask.affine, vol.affine)  # in mm, whatever the input's units
    assert mask.header.get_xyzt_units()[0] in ("mm", "unknown") and not mask.header.extensions


def test_json_lines_keep_undecodable_names_exact(liverkd_cmd, engine, tmp_path):
    path = valid_undecodable_name(tmp_path)
    proc = run_infer(liverkd_cmd, path, "--engine", engine, "--json")
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(s) for s in proc.stdout.splitlines()]
    assert line["input"] == str(path) and os.fsencode(line["output"]).endswith(b"caf\xe9 \xff_liver.nii.gz")
    assert gzip.open(line["output"]).read(4) == struct.pack("<i", 348)
