"""`liverkd distill run|ablation` end to end on a tiny phantom config."""

import json
import subprocess

import pytest
import yaml

from liverkd.distill.checkpoint import load_checkpoint, model_from_checkpoint
from liverkd.distill.config import ConfigError, load_config

TINY = {
    "seed": 0,
    "data": {"phantoms": {"n": 4, "shape": [32, 32, 32], "seed": 0}, "val": 1, "test": 1},
    "spec": {"spacing": [12.0, 12.0, 12.0], "input_shape": [32, 32, 32]},
    "patch": [16, 16, 16],
    "models": {"teacher": "teacher", "assistant": "ta", "student": "student-30k"},
    "gtan": {"n_widths": 2, "grow_until": 0.5, "beta": 0.0},
    "train": {"steps": {"teacher": 2, "student": 2}, "batch_size": 1, "val_every": 2},
    "ablation": {"students": ["student-30k"]},
}


def write_config(tmp_path, **changes):
    cfg = {**TINY, "run_dir": str(tmp_path / "run"), **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_end_to_end_then_skips_finished_stages(tmp_path, liverkd_cmd):
    config = write_config(tmp_path)
    proc = subprocess.run([*liverkd_cmd, "distill", "run", str(config)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert "held-out Dice" in proc.stdout
    heldout = json.loads((run / "heldout.json").read_text())
    assert 0 <= heldout["student"]["dice"] <= 1 and len(heldout["student"]["cases"]) == 1
    assert f"{heldout['student']['dice']:.3f}" in proc.stdout
    student, spec = model_from_checkpoint(run / "student.pt")
    assert load_checkpoint(run / "student.pt")["preset"] == "student-30k"
    assert sum(p.numel() for p in student.parameters()) == heldout["student"]["params"] == 27_133
    assert spec.input_shape == (32, 32, 32)
    for name in ("teacher", "gtan"):
        assert (run / f"{name}.csv").exists() and (run / f"{name}.png").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "teacher.pt", run / "gtan.pt")}
    again = subprocess.run([*liverkd_cmd, "distill", "run", str(config)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # nothing retrained
    assert json.loads((run / "heldout.json").read_text())["student"]["dice"] == heldout["student"]["dice"]


def _validation_folder(root):
    """A folder in ../shared/data's layout holding two phantoms under real case names: the
    ablation's real-case plumbing on files it can read in CI (no real CT is part of a clone)."""
    from liverkd.core import volume as V
    from liverkd.core.datasets import REAL_VALIDATION
    from liverkd.core.synth import synth_case

    for seed, name in enumerate(("ircad01", "tsexample")):
        image, label = synth_case(50 + seed, shape=(40, 40, 40), spacing=9.0)
        for volume, rel in zip((image, label), REAL_VALIDATION[name]):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            V.save(volume.to_nifti(), root / rel)
    return root


def test_ablation_writes_a_table(tmp_path, liverkd_cmd):
    real = _validation_folder(tmp_path / "shared")
    config = write_config(tmp_path, ablation={"students": ["student-30k"], "real": str(real)},
                          train={**TINY["train"], "steps": {"teacher": 4, "student": 2}})  # fmt: skip
    proc = subprocess.run(
        [*liverkd_cmd, "distill", "ablation", str(config), "--seeds", "2"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((tmp_path / "run" / "ablation.json").read_text())
    assert [r["method"] for r in table["rows"]] == ["nokd", "kd", "takd", "gtan"]
    assert all(r["params"] == 27_133 and 0 <= r["dice_mean"] <= 1 for r in table["rows"])
    assert table["real_cases"] == ["ircad01", "tsexample"]
    for r in table["rows"]:  # every seed's own values, on both kinds of case
        assert [run["seed"] for run in r["runs"]] == [0, 1]
        assert all(
            0 <= run["real_dice"] <= 1 and set(run["real_cases"]) == {"ircad01", "tsexample"} for run in r["runs"]
        )
    seed0 = tmp_path / "run" / "ablation" / "seed0"
    assert load_checkpoint(seed0 / "ta.pt")["step"] == 4  # TAKD's assistant: the teacher's budget
    ta_s = load_checkpoint(seed0 / "ta.pt")["extra"]["seconds"]
    takd_s = load_checkpoint(seed0 / "student-30k" / "takd.pt")["extra"]["seconds"]
    assert table["rows"][2]["runs"][0]["seconds"] == pytest.approx(ta_s + takd_s)  # TAKD pays for its assistant
    md = (tmp_path / "run" / "ablation.md").read_text()
    assert "| student-30k | GTAN |" in md and "| teacher |" in md and "Dice (real)" in md
    kd, nokd = table["rows"][1]["runs"], table["rows"][0]["runs"]
    delta = [a["dice"] - b["dice"] for a, b in zip(kd, nokd)]
    assert f"{sum(delta) / 2:+.3f}" in md.split("| student-30k | KD |")[1].splitlines()[0]  # paired by seed
    check = table["teacher_check"]
    assert check["student-30k"]["val_dice"] == pytest.approx(  # against the best seed's no-KD student
        table["teacher"]["val_dice"] - max(run["val_dice"] for run in table["rows"][0]["runs"])
    )
    if not check["teacher_better_on_validation"]:  # 4 steps: usually not; then the table says so
        assert "WARNING: the teacher is not better" in md


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"stepz": 3}}, "unknown key 'train.stepz'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"patch": [15, 16, 16]}, "multiples of 8"),
        ({"models": {"student": "student-1k"}}, "unknown model preset"),
        ({"data": {"val": 1, "test": 1}}, "exactly one of"),
        ({"gtan": {"widths": 2}}, "'gtan.widths' is now 'gtan.n_widths'"),
        ({"kd": {"alpha": 0.5, "warmup": 2.0}}, "'kd.warmup' must be in"),
        ({"train": {"seed": 1}}, "unknown key 'train.seed'"),
        ({"train": {"steps": {"teacher": 2, "assistant": 2}}}, "'train.steps.assistant' is gone: TAKD's assistant"),
        ({"train": {"patience": -1}}, "'train.patience' must be >= 0"),
        ({"train": {"lr_schedule_steps": -1}}, "'train.lr_schedule_steps' must be >= 0"),
        ({"gtan": {"assistant_every": 0}}, "assistant_every >= 1"),
        ({"kd": {"balance": True}}, "'kd.balance' names a choice now: true is now 'teacher'"),
        ({"kd": {"balance": "label"}}, "'kd.balance' must be labels, teacher or none"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, change, message, liverkd_cmd):
    config = write_config(tmp_path, **change)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(config)
    assert str(err.value).startswith(str(config)) and "\n" not in str(err.value)
    if "bogus" in change:
        proc = subprocess.run([*liverkd_cmd, "distill", "run", str(config)], capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown key 'bogus'" in proc.stderr
        assert not (tmp_path / "run").exists()


def test_shipped_configs_load():
    from pathlib import Path

    from liverkd import configs

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("quick.yaml", "paper-100k.yaml", "paper-30k.yaml"):
        cfg = load_config(root / name)
        assert cfg.source.endswith(name)
    for name in configs.names():  # the packaged ones, by name
        assert load_config(name).source.endswith(f"{name}.yaml")


def test_set_overrides_typed_values_and_names_unknown_keys(liverkd_cmd, tmp_path):
    cfg = load_config("quick", ["train.steps.teacher=10", "train.lr=1e-3", "data.phantoms.n=5", "patch=[16, 16, 16]"])
    assert (cfg.train.steps.teacher, cfg.train.lr, cfg.data.phantoms.n, cfg.patch) == (10, 0.001, 5, (16, 16, 16))
    assert cfg.source.endswith("quick.yaml with --set train.steps.teacher=10 train.lr=1e-3 data.phantoms.n=5 "
                               "patch=[16, 16, 16]")  # fmt: skip
    with pytest.raises(ConfigError, match=r"with --set train.lr=fast: 'train.lr' must be a number, got 'fast'$"):
        load_config("quick", ["train.lr=fast"])
    for bad, message in (("train.stepz=3", "unknown key 'train.stepz'"), ("gtan.widths=2", "'gtan.widths' is now")):
        proc = subprocess.run([*liverkd_cmd, "distill", "run", "quick", "--set", bad], capture_output=True, text=True,
                              cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


def test_packaged_config_by_name_with_overrides_runs_here(liverkd_cmd, tmp_path):
    """`liverkd distill run quick --set ...` from any folder: run_dir (runs/quick) is under the current one."""
    tiny = {"data.phantoms": "{n: 4, shape: [32, 32, 32], seed: 0}", "data.val": 1, "data.test": 1,
            "spec.spacing": "[12, 12, 12]", "spec.input_shape": "[32, 32, 32]", "patch": "[16, 16, 16]",
            "gtan.n_widths": 2, "train.steps": "{teacher: 2, student: 2}", "train.batch_size": 1,
            "train.val_every": 2}  # fmt: skip
    sets = [a for key, value in tiny.items() for a in ("--set", f"{key}={value}")]
    proc = subprocess.run([*liverkd_cmd, "distill", "run", "quick", *sets, "-q"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "quick" / "student.pt").is_file() and "held-out Dice" in proc.stdout
    assert not any(w in proc.stderr for w in ("synthetic CT", "preprocess", "teacher", "step"))  # --quiet
    heldout = json.loads((tmp_path / "runs" / "quick" / "heldout.json").read_text())
    assert heldout["student"]["preset"] == "student-30k"


def test_the_table_warns_when_the_teacher_is_not_better_on_the_real_cts():
    from liverkd.distill.pipeline import METHODS, markdown_table, summarize, teacher_check

    def run(seed, dice, real):
        return {"seed": seed, "seconds": 1.0, "params": 27_133, "val_dice": dice, "dice": dice, "hd95": 5.0,
                "real_dice": real, "real_hd95": 9.0}  # fmt: skip

    rows = [summarize("student-30k", m, [run(0, 0.80, 0.70), run(1, 0.82, 0.72)]) for m in METHODS]
    teacher = {"params": 1, "seconds": 1.0, "val_dice": 0.90, "dice": 0.90, "hd95": 4.0, "real_dice": 0.65,
               "real_hd95": 8.0}  # fmt: skip
    check = teacher_check(teacher, rows)
    assert check["teacher_better_on_validation"] and not check["teacher_better_on_real"]
    assert check["student-30k"]["real_dice"] == pytest.approx(0.65 - 0.72)  # the best seed's student
    table = {"seeds": 2, "test_cases": ["a"], "real_cases": ["r"], "teacher": teacher, "teacher_check": check,
             "rows": rows}  # fmt: skip
    md = markdown_table(table)
    assert "not better than every no-KD student on the real CTs** (teacher minus no KD: student-30k -0.070)" in md
    assert "on validation**" not in md
    teacher["real_dice"] = 0.715  # above the seeds' mean, below the best seed: still not better than every one
    assert not teacher_check(teacher, rows)["teacher_better_on_real"]
    teacher["real_dice"] = 0.75
    table["teacher_check"] = teacher_check(teacher, rows)
    assert "WARNING" not in markdown_table(table)


def test_worker_processes_make_the_same_cases_and_cache(tmp_path):
    """train.num_workers > 1 also synthesises and preprocesses in that many processes: the same
    phantoms, the same split and the same preprocessed arrays as one process."""
    import numpy as np

    from liverkd.distill.loop import setup_distributed
    from liverkd.distill.pipeline import load_data

    loaded = []
    for workers in (0, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        cfg = load_config(write_config(folder, data={**TINY["data"], "cache": str(folder / "cache")},
                                       train={**TINY["train"], "num_workers": workers}))  # fmt: skip
        loaded.append(load_data(cfg, setup_distributed()))
    one, pool = loaded
    assert [c.case_id for c in one.test] == [c.case_id for c in pool.test]
    assert [v.case_id for v in one.train + one.val] == [v.case_id for v in pool.train + pool.val]
    for a, b in zip(one.train + one.val, pool.train + pool.val):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
