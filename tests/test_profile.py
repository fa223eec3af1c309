"""liverkd profile: report structure, stage times adding up, comparisons, bad input.

Real engine bundles (random-init students exported to ONNX, 32^3 input) run through the
real Segmenter on phantom CTs written to disk. Nothing here asserts a time.
"""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest

from liverkd.core.spec import PreprocessSpec
from liverkd.deploy import profile as P
from liverkd.deploy.device_info import describe, device_facts

SPEC = PreprocessSpec(spacing=(6.0, 6.0, 6.0), input_shape=(32, 32, 32))
RUNS = 4


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from _segment_bundle import make_bundle

    root = tmp_path_factory.mktemp("engines")
    return make_bundle(root / "s30", SPEC, "student-30k"), make_bundle(root / "s100", SPEC, "student-100k")


@pytest.fixture(scope="module")
def report(engines):
    return P.profile(list(engines), ["onnxruntime"], synthetic=2, warmup=1, runs=RUNS)


def test_summarize_matches_numpy_percentiles():
    rng = np.random.default_rng(0)
    seconds = rng.gamma(2.0, 0.01, size=101)
    s = P.summarize(seconds)
    assert set(s) == set(P.STAT_KEYS)
    assert s["n"] == 101
    ms = seconds * 1e3
    for q in (50, 90, 95, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(ms, q))
    assert s["min"] == pytest.approx(ms.min()) and s["max"] == pytest.approx(ms.max())
    assert s["mean"] == pytest.approx(ms.mean())
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]


def test_summarize_empty_has_every_key():
    s = P.summarize([])
    assert s["n"] == 0 and all(s[k] is None for k in P.STAT_KEYS if k != "n")


def test_device_header_is_read():
    facts = device_facts()
    assert facts["cpu"]["threads"] >= 1 and facts["cpu"]["model"]
    assert isinstance(facts["gpus"], list)
    lines = describe(facts)
    assert lines[0].startswith("CPU: ") and any(line.startswith("GPU: ") for line in lines)


def test_every_stage_has_every_statistic(report, tmp_path):
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert data["device"]["cpu"]["model"] and "gpus" in data["device"]
    assert data["config"]["runs"] == RUNS and data["config"]["n_volumes"] == 2
    assert len(data["targets"]) == 2
    for target in data["targets"]:
        stats = target["stats_ms"]
        assert set(stats) == {*P.STAGES, P.UNACCOUNTED, P.TOTAL}, "the Segmenter's contract stages"
        for stage, s in stats.items():
            assert set(s) == set(P.STAT_KEYS), stage
            assert s["n"] == RUNS, stage
            assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"], stage
        assert target["cold_start"]["load_ms"] > 0
        assert set(P.STAGES) <= set(target["cold_start"]["first_volume_ms"])
        assert target["throughput_volumes_per_s"] > 0
        assert target["rss_max_mib"] > 0
        assert all(len(v) == RUNS for v in target["samples_ms"].values())


def test_stages_in_pipeline_order(report):
    for res in report.results:
        assert list(res.stats()) == [*P.STAGES, P.UNACCOUNTED, P.TOTAL]


def test_stage_times_add_up_to_end_to_end(report):
    """Per volume, the stages cover the end-to-end time to within 5% (the median volume: a process
    descheduled between two stages on a busy machine puts that pause in no stage)."""
    for res in report.results:
        stages = np.sum([res.samples[s] for s in res.stages], axis=0)
        total = np.asarray(res.samples[P.TOTAL])
        assert np.all(stages <= total * 1.0001), res.target.label
        missing = float(np.median(1 - stages / total))
        assert missing < 0.05, f"{res.target.label}: {missing:.1%} of a volume's time is in no stage"
        unaccounted = np.asarray(res.unaccounted())
        assert np.allclose(unaccounted, total - stages)


def test_speedups_against_first_target(report):
    speed = report.speedups()
    first, second = (r.target.label for r in report.results)
    assert all(v == pytest.approx(1.0) for v in speed[first].values() if v is not None)
    stats = [r.stats() for r in report.results]
    assert speed[second]["network"] == pytest.approx(stats[0]["network"]["p50"] / stats[1]["network"]["p50"])


def test_csv_has_a_row_per_target_and_stage(report, tmp_path):
    rows = list(csv.DictReader(report.write_csv(tmp_path / "r.csv").open()))
    assert len(rows) == 2 * (len(P.STAGES) + 2)
    assert {r["stage"] for r in rows} == {*P.STAGES, P.UNACCOUNTED, P.TOTAL}
    assert all(float(r["p99_ms"]) >= float(r["p50_ms"]) for r in rows)


def test_plot_is_a_png(report, tmp_path):
    import matplotlib.image

    path = report.write_plot(tmp_path / "r.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05, "the picture is not blank"


def test_cli_two_backends_print_speedups(engines, liverkd_cmd, tmp_path):
    out_json = tmp_path / "p.json"
    done = subprocess.run(
        [
            *liverkd_cmd,
            "profile",
            "--engine",
            str(engines[0]),
            "--backend",
            "onnxruntime",
            "--backend",
            "auto",
            "--synthetic",
            "1",
            "--warmup",
            "0",
            "--runs",
            "2",
            "--json",
            str(out_json),
            "--csv",
            str(tmp_path / "p.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "s30/onnxruntime" in done.stdout and "s30/auto" in done.stdout
    assert "speedup" in done.stdout and "network" in done.stdout and "CPU:" in done.stdout
    data = json.loads(out_json.read_text())
    assert [t["backend"] for t in data["targets"]] == ["onnxruntime", "auto"]
    assert data["baseline"] == "s30/onnxruntime"
    assert (tmp_path / "p.csv").is_file()


@pytest.mark.parametrize("problem", ["no_engine", "empty_volumes", "both_sources", "no_json_folder", "bad_backend"])
def test_cli_bad_input_is_one_line_and_writes_nothing(problem, engines, liverkd_cmd, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out_json = tmp_path / "out.json"
    args = {
        "no_engine": ["--engine", str(tmp_path / "missing"), "--synthetic", "1"],
        "empty_volumes": ["--engine", str(engines[0]), "--volumes", str(empty)],
        "both_sources": ["--engine", str(engines[0]), "--volumes", str(empty), "--synthetic", "1"],
        "no_json_folder": ["--engine", str(engines[0]), "--synthetic", "1"],
        "bad_backend": ["--engine", str(engines[0]), "--backend", "tensorflow", "--synthetic", "1"],
    }[problem]
    target = tmp_path / "nope" / "out.json" if problem == "no_json_folder" else out_json
    done = subprocess.run(
        [*liverkd_cmd, "profile", *args, "--runs", "1", "--warmup", "0", "--json", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    message = (done.stdout + done.stderr).strip()
    assert message.startswith("error:") and len(message.splitlines()) == 1, message
    assert not out_json.exists() and not target.exists()


def test_volumes_folder_and_dataset_layout(tmp_path):
    import nibabel as nib

    with pytest.raises(ValueError, match="not a folder"):
        P.find_volumes(tmp_path / "missing")
    for name in ("b.nii.gz", "a.nii"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a volume")
    assert [p.name for p in P.find_volumes(tmp_path)] == ["a.nii", "b.nii.gz"]


def test_synthetic_shape_keeps_the_engine_field_of_view():
    shape, spacing = P.synthetic_shape(SPEC)
    assert shape == (64, 64, 32)
    fov = np.multiply(shape, spacing)
    assert np.allclose(fov, np.multiply(SPEC.input_shape, SPEC.spacing))
