"""teacher -> GTAN -> student from one YAML config (`liverkd distill run`), and the
ablation table (`liverkd distill ablation`): at each student size, no KD / KD / TAKD / GTAN.

Every stage writes RUN_DIR/<stage>.pt and is skipped when that file exists, so a run can
be stopped and started again; `resume` continues a stage that was interrupted mid-way.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from liverkd.core.atomic import write_json, write_text
from liverkd.core.datasets import load_case
from liverkd.core.inference import segment_volume
from liverkd.core.metrics import evaluate_masks, to_jsonable
from liverkd.distill.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from liverkd.distill.config import Config, ConfigError, Phantoms
from liverkd.distill.data import PatchDataset, Prepared, cache_path, prepare_case, split_cases
from liverkd.distill.loop import Dist, setup_distributed
from liverkd.distill.models import PRESETS, count_params, create_model
from liverkd.distill.objectives import GTANObjective, KnowledgeDistillation, Supervised
from liverkd.distill.predictor import torch_predictor
from liverkd.distill.train import TrainSettings, train

METHODS = ("nokd", "kd", "takd", "gtan")
METHOD_NAMES = {"nokd": "no KD", "kd": "KD", "takd": "TAKD", "gtan": "GTAN"}


@dataclass
class Data:
    train: list[Prepared]
    val: list[Prepared]
    test: list  # liverkd.core.datasets.Case, evaluated in the original voxel space


def load_data(cfg: Config, ctx: Dist) -> Data:
    from rich.progress import track

    from liverkd.core.datasets import discover

    out = Path(cfg.run_dir)
    workers = max(1, cfg.train.num_workers)  # the loader's processes also make the data it reads
    if cfg.data.phantoms is not None:  # beside the preprocessed cache when one is shared between runs
        path = synthesize(cfg.data.phantoms, Path(cfg.data.cache) if cfg.data.cache else out, ctx, workers)
    else:
        path = Path(cfg.data.path)
    cases = [c for c in discover(path) if c.label is not None]
    train_cases, val_cases, test_cases = split_cases(cases, cfg.data.val, cfg.data.test, cfg.seed)
    cache = Path(cfg.data.cache) if cfg.data.cache else out / "cache"
    if ctx.main:  # rank 0 fills the cache, the others then read it
        fill = functools.partial(_fill_cache, spec=cfg.spec, cache=cache)
        todo = [c for c in train_cases + val_cases if not cache_path(c, cfg.spec, cache).exists()]
        if workers == 1 or len(todo) < 2:
            for case in track(todo, description="preprocess"):
                fill(case)
        else:
            from liverkd.core.processes import spawn_pool

            with spawn_pool(min(workers, len(todo))) as pool:
                for _ in track(pool.map(fill, todo), total=len(todo), description="preprocess"):
                    pass
    ctx.barrier()
    return Data(
        [prepare_case(c, cfg.spec, cache) for c in train_cases],
        [prepare_case(c, cfg.spec, cache) for c in val_cases],
        test_cases,
    )


def _fill_cache(case, spec, cache) -> None:
    """prepare_case in a worker process, returning nothing: the arrays stay in the cache rather
    than being pickled back to the parent, which reads them from there."""
    prepare_case(case, spec, cache)


def synthesize(p: Phantoms, out: Path, ctx: Dist, workers: int = 1) -> Path:
    """RUN_DIR/phantoms-<hash of the settings>: written once (rank 0), reused while the settings hold."""
    from liverkd.core.synth.dataset import SYNTH_VERSION

    keyed = {**dataclasses.asdict(p), "synth_version": SYNTH_VERSION}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    path = out / f"phantoms-{key}"
    if ctx.main and not (path / "dataset.json").exists():
        from rich.progress import Progress

        from liverkd.core.synth import write_dataset

        if p.labelmaps is not None and not Path(p.labelmaps).is_dir():
            raise ConfigError(f"data.phantoms.labelmaps: {p.labelmaps} is not a folder (TotalSegmentator label maps)")
        with Progress(transient=True) as bar:
            task = bar.add_task(f"synthetic CT ({p.n})", total=p.n)
            write_dataset(
                path,
                p.n,
                seed=p.seed,
                shape=p.shape,
                spacing=p.spacing,
                labelmaps=p.labelmaps,
                procedural_fraction=p.procedural_fraction,
                scan_extent=p.scan_extent,
                variants=p.variants,
                progress=lambda done, _n: bar.update(task, completed=done),
                workers=workers,
            )
    ctx.barrier()
    return path


def settings(cfg: Config, steps: int, *, patience: int = 0) -> TrainSettings:
    t = cfg.train
    return TrainSettings(
        steps=steps,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        val_every=t.val_every,
        num_workers=t.num_workers,
        patience=patience,
        average=t.average,
        lr_schedule_steps=t.lr_schedule_steps,
    )


def run_stage(
    cfg: Config,
    data: Data,
    out: Path,
    make_objective,
    *,
    steps: int,
    seed: int,
    preset: str,
    stage: str,
    resume: bool,
    ctx: Dist,
    patience: int = 0,
):
    """Train one stage into `out` unless it is there already; return (model, seconds, its best
    validation Dice). `patience`: early stop (the teacher and TAKD's assistant), see TrainSettings."""
    if not out.exists():
        torch.manual_seed(seed)
        objective = make_objective()
        dataset = PatchDataset(data.train, cfg.patch, foreground=cfg.foreground, augment=cfg.augment, seed=seed)
        title = str(out.relative_to(cfg.run_dir).with_suffix(""))
        train(
            objective,
            dataset,
            data.val,
            cfg.spec,
            settings(cfg, steps, patience=patience),
            out,
            preset=preset,
            stage=stage,
            resume=resume,
            title=title,
        )
        ctx.barrier()
    payload = load_checkpoint(out)
    model, _ = model_from_checkpoint(payload)
    val = payload.get("best_val_dice")
    return model.to(ctx.device), float(payload["extra"].get("seconds", 0.0)), None if val is None else float(val)


def kd_objective(cfg: Config, preset: str, teacher):
    return lambda: KnowledgeDistillation(create_model(preset), teacher, cfg.kd)


def gtan_objective(cfg: Config, preset: str, teacher):
    g = cfg.gtan
    return lambda: GTANObjective(
        teacher,
        PRESETS[preset],
        PRESETS[cfg.models.assistant],
        n_widths=g.n_widths,
        grow_until=g.grow_until,
        beta=g.beta,
        assistant_every=g.assistant_every,
        kd=cfg.kd,
    )


def train_teacher(cfg: Config, data: Data, resume: bool, ctx: Dist):
    out = Path(cfg.run_dir) / "teacher.pt"
    name = cfg.models.teacher
    return run_stage(
        cfg,
        data,
        out,
        lambda: Supervised(create_model(name)),
        steps=cfg.train.steps.teacher,
        seed=cfg.seed,
        preset=name,
        stage="teacher",
        resume=resume,
        ctx=ctx,
        patience=cfg.train.patience,
    )


def evaluate(model, cases, spec, device) -> dict:
    """Held-out metrics in each case's own voxel space, through liverkd.core.inference.segment_volume:
    the function the Segmenter (`liverkd infer`) runs, here with a torch predictor."""
    predict = torch_predictor(model.to(device), device)
    rows = []
    for case in cases:
        image, label = load_case(case)
        mask = segment_volume(image, spec, predict)
        rows.append({"case": case.case_id, **evaluate_masks(mask, label.array > 0, image.spacing)})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "hd95", "assd", "rvd")}
    return to_jsonable({**summary, "cases": rows})


def run(cfg: Config, *, resume: bool = False, echo=print) -> dict:
    """teacher -> GTAN (or KD) -> student, or the student alone (`method: nokd`); writes
    RUN_DIR/student.pt and RUN_DIR/heldout.json (held-out metrics through core.inference)."""
    ctx = setup_distributed()
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    if ctx.main:
        write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    data = load_data(cfg, ctx)
    teacher, teacher_s, _ = (None, 0.0, None) if cfg.method == "nokd" else train_teacher(cfg, data, resume, ctx)
    preset = cfg.models.student
    makers = {
        "nokd": lambda: Supervised(create_model(preset)),
        "kd": kd_objective(cfg, preset, teacher),
        "gtan": gtan_objective(cfg, preset, teacher),
    }
    student, student_s, _ = run_stage(cfg, data, out / f"{cfg.method}.pt", makers[cfg.method],
                                   steps=cfg.train.steps.student, seed=cfg.seed, preset=preset, stage=cfg.method,
                                   resume=resume, ctx=ctx)  # fmt: skip
    if not ctx.main:
        return {}
    save_checkpoint(out / "student.pt", student.cpu(), cfg.spec, preset=preset, stage="student",
                    extra={"from": f"{cfg.method}.pt", "method": cfg.method, "seconds": student_s})  # fmt: skip
    result = {
        "method": cfg.method,
        "student": {
            "preset": preset,
            "params": count_params(student),
            "seconds": student_s,
            **evaluate(student, data.test, cfg.spec, ctx.device),
        },  # fmt: skip
        "test_cases": [c.case_id for c in data.test],
    }
    if teacher is not None:
        result["teacher"] = {"preset": cfg.models.teacher, "params": count_params(teacher), "seconds": teacher_s,
                             **evaluate(teacher, data.test, cfg.spec, ctx.device)}  # fmt: skip
    write_json(out / "heldout.json", result)
    return result


# ------------------------------------------------------------------------------ ablation


def ablation(cfg: Config, *, seeds: int = 3, resume: bool = False) -> dict:
    """Teacher once; then per seed a TA (for TAKD, the teacher's budget) and, per student size, the
    four methods, each evaluated on the held-out phantoms and on the real validation CTs
    (`ablation.real`), through core.inference as `liverkd infer` runs them."""
    ctx = setup_distributed()
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg, ctx)
    real = real_cases(cfg)
    teacher, teacher_s, teacher_val = train_teacher(cfg, data, resume, ctx)
    results: dict[str, dict[str, list[dict]]] = {p: {m: [] for m in METHODS} for p in cfg.ablation.students}
    for s in range(seeds):
        seed = cfg.seed + s
        folder = root / "ablation" / f"seed{s}"
        ta_name = cfg.models.assistant
        ta, ta_s, _ = run_stage(
            cfg,
            data,
            folder / "ta.pt",
            kd_objective(cfg, ta_name, teacher),
            steps=cfg.train.steps.teacher,  # Mirzadeh et al.: the assistant is trained as the teacher is
            seed=seed,
            preset=ta_name,
            stage="ta",
            resume=resume,
            ctx=ctx,
            patience=cfg.train.patience,
        )
        for preset in cfg.ablation.students:
            makers = {
                "nokd": lambda p=preset: Supervised(create_model(p)),
                "kd": kd_objective(cfg, preset, teacher),
                "takd": kd_objective(cfg, preset, ta),
                "gtan": gtan_objective(cfg, preset, teacher),
            }
            for method in METHODS:
                model, secs, val = run_stage(
                    cfg,
                    data,
                    folder / preset / f"{method}.pt",
                    makers[method],
                    steps=cfg.train.steps.student,
                    seed=seed,
                    preset=preset,
                    stage=method,
                    resume=resume,
                    ctx=ctx,
                )
                if ctx.main:
                    # TAKD's cost includes training its assistant
                    wall = secs + (ta_s if method == "takd" else 0.0)
                    results[preset][method].append(
                        {
                            "seed": seed,
                            "seconds": wall,
                            "params": count_params(model),
                            "val_dice": val,
                            **scores(model, data, real, cfg, ctx),
                        }  # fmt: skip
                    )
    if not ctx.main:
        return {}
    teacher_row = {"preset": cfg.models.teacher, "params": count_params(teacher), "seconds": teacher_s,
                   "val_dice": teacher_val, **scores(teacher, data, real, cfg, ctx)}  # fmt: skip
    rows = [summarize(p, m, results[p][m]) for p in cfg.ablation.students for m in METHODS]
    table = {
        "config": cfg.source,
        "seeds": seeds,
        "test_cases": [c.case_id for c in data.test],
        "real_cases": [c.case_id for c in real],
        "teacher": teacher_row,
        "teacher_check": teacher_check(teacher_row, rows),
        "rows": rows,
    }
    write_json(root / "ablation.json", to_jsonable(table))
    write_text(root / "ablation.md", markdown_table(table))
    return table


def real_cases(cfg: Config) -> list:
    """The real validation CTs under `ablation.real` (none without it, or where they are absent)."""
    from liverkd.core.datasets import real_validation_cases

    return real_validation_cases(cfg.ablation.real) if cfg.ablation.real else []


def scores(model, data: Data, real: list, cfg: Config, ctx: Dist) -> dict:
    """Held-out synthetic and real Dice / HD95 of one model (means over cases, and per real case)."""
    synthetic = evaluate(model, data.test, cfg.spec, ctx.device)
    out = {"dice": synthetic["dice"], "hd95": synthetic["hd95"]}
    if real:
        r = evaluate(model, real, cfg.spec, ctx.device)
        out.update(real_dice=r["dice"], real_hd95=r["hd95"], real_cases={c["case"]: c["dice"] for c in r["cases"]})
    return out


METRICS = ("dice", "hd95", "real_dice", "real_hd95", "val_dice", "seconds")


def summarize(preset: str, method: str, runs: list[dict]) -> dict:
    """Mean and sd over seeds of every metric, and the per-seed values."""
    row = {"preset": preset, "method": method, "params": runs[0]["params"], "runs": runs}
    for key in METRICS:
        row[f"{key}_mean"], row[f"{key}_sd"] = stats([r.get(key) for r in runs])
    row["empty_predictions"] = sum(1 for r in runs if r["dice"] == 0.0 or r.get("real_dice", 1.0) == 0.0)
    return row


def stats(values) -> tuple[float | None, float | None]:
    """Mean and sd (ddof 1) over the finite values (an empty prediction has no HD95)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def paired(row: dict, baseline: dict, key: str) -> tuple[float | None, float | None]:
    """Mean and sd over seeds of (method - no KD) for `key`, seed by seed (the same data, the same
    initialisation seed, the same patches: only the method differs)."""
    base = {r["seed"]: r.get(key) for r in baseline["runs"]}
    return stats(
        [r[key] - base[r["seed"]] for r in row["runs"] if r.get(key) is not None and base.get(r["seed"]) is not None]
    )


TEACHER_CHECKS = (("validation", "val_dice", "teacher_better_on_validation"),
                  ("the real CTs", "real_dice", "teacher_better_on_real"))  # fmt: skip
"""(where, metric, teacher_check's flag): the margins the table warns about."""


def teacher_check(teacher: dict, rows: list[dict]) -> dict:
    """Is the teacher better than every no-KD student, on validation (what the stages select on),
    and on the held-out and real cases? A KD gain from a teacher that is not is no test of KD.
    The margin per size is the teacher minus the BEST seed's no-KD student: "every" means each seed."""
    out = {}
    for r in rows:
        if r["method"] != "nokd":
            continue
        out[r["preset"]] = {key: margin(teacher.get(key), [run.get(key) for run in r["runs"]])
                            for key in ("val_dice", "dice", "real_dice")}  # fmt: skip
    margins = [m for m in out.values() if isinstance(m, dict)]
    for _, key, flag in TEACHER_CHECKS:
        if key == "val_dice" or teacher.get(key) is not None:  # real CTs only where there are some
            out[flag] = all((m[key] or 0.0) > 0 for m in margins)
    return out


def margin(teacher, students) -> float | None:
    """teacher - max(students), over the students that have the value; None where none has."""
    values = [v for v in students if v is not None]
    return None if teacher is None or not values else teacher - max(values)


def markdown_table(table: dict) -> str:
    t = table["teacher"]
    real = bool(table.get("real_cases"))
    where = f"held out: {', '.join(table['test_cases'])}" + (
        f"; real: {', '.join(table['real_cases'])}" if real else ""
    )
    lines = [
        f"{table['seeds']} seed(s); {where}. Dice mean ± sd over seeds; Δ: the method minus no KD, "
        "paired by seed (mean ± sd of the per-seed differences); wall time per method (TAKD includes "
        "its assistant's training).",
        "",
    ]
    check = table.get("teacher_check", {})
    for where, key, flag in TEACHER_CHECKS:
        if not check.get(flag, True):
            lines += [
                f"**WARNING: the teacher is not better than every no-KD student on {where}** "
                "(teacher minus no KD: "
                + ", ".join(f"{p} {fmt_signed(m[key])}" for p, m in check.items() if isinstance(m, dict))
                + f"): a KD gain on {where} is not a gain from distillation.",
                "",
            ]
    head = "| student | method | params | Dice (synthetic) | Δ synthetic |"
    rule = "|---|---|---:|---|---|"
    if real:
        head += " Dice (real) | Δ real | HD95 real (mm) |"
        rule += "---|---|---|"
    lines += [head + " wall time (s) |", rule + "---:|"]
    teacher_cells = f"| teacher | - | {t['params']:,} | {t['dice']:.3f} | |"
    if real:
        teacher_cells += f" {t['real_dice']:.3f} | | {fmt(t['real_hd95'])} |"
    lines.append(teacher_cells + f" {t['seconds']:.0f} |")
    baselines = {r["preset"]: r for r in table["rows"] if r["method"] == "nokd"}
    for r in table["rows"]:
        empty = r.get("empty_predictions", 0)
        note = f" ({empty} of {len(r['runs'])} seeds: no liver found)" if empty else ""
        base = baselines[r["preset"]]
        cells = (
            f"| {r['preset']} | {METHOD_NAMES[r['method']]} | {r['params']:,} | "
            f"{r['dice_mean']:.3f}{sd(r['dice_sd'], 3)}{note} | {delta_cell(r, base, 'dice')} |"
        )
        if real:
            cells += (f" {r['real_dice_mean']:.3f}{sd(r['real_dice_sd'], 3)} | {delta_cell(r, base, 'real_dice')} |"
                      f" {fmt(r['real_hd95_mean'])} |")  # fmt: skip
        lines.append(cells + f" {r['seconds_mean']:.0f} |")
    lines += ["", "Per seed (Dice synthetic / real):", ""]
    for r in table["rows"]:
        values = ", ".join(
            f"{run['seed']}: {run['dice']:.3f}" + (f" / {run['real_dice']:.3f}" if real else "") for run in r["runs"]
        )
        lines.append(f"- {r['preset']} {METHOD_NAMES[r['method']]}: {values}")
    return "\n".join(lines) + "\n"


def delta_cell(row: dict, baseline: dict, key: str) -> str:
    """The paired difference to no KD, as a cell (empty on the no-KD row itself)."""
    return "" if row is baseline else signed_sd(*paired(row, baseline, key))


def signed_sd(mean, spread) -> str:
    return "n/a" if mean is None else f"{mean:+.3f}" + sd(spread, 3)


def fmt_signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def sd(x, digits: int) -> str:
    """' ± sd', or nothing for a single seed."""
    return "" if x is None else f" ± {x:.{digits}f}"


def fmt(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.1f}"
