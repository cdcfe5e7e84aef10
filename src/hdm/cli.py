"""The `hdm` command line: fit, test, predict, and demo (the main job on the built-in data)."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .config import HDMConfig
from .data import HDMInputError

if TYPE_CHECKING:
    from .layouts import DataSource

MODEL_FILE = "model.pt"
STATE_FILE = "training_state.pt"  # exists only while a fit is running or was interrupted


def _fail_cleanly(func):
    """Bad input and bad settings end in one line on stderr, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (HDMInputError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def metrics_table(metrics: dict[str, float], title: str) -> str:
    from .metrics import METRIC_KEYS

    lines = [f"| {title} | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    lines.append("| HDM | " + " | ".join(f"{metrics[k]:.4f}" for k in METRIC_KEYS) + " |")
    if "image_recall_at_threshold" in metrics:
        lines.append(f"\nAt the calibrated thresholds: {metrics['image_recall_at_threshold']:.1%} of defective images "
                     f"flagged, {metrics['image_fpr_at_threshold']:.1%} false alarms on normal ones; "
                     f"{metrics['pixel_recall_at_threshold']:.1%} of defect pixels in the masks.")
    return "\n".join(lines)


# `hdm fit` options that set one configuration field each; their defaults are the dataclasses'.
SHORTCUTS = {"backbone": "space.backbone", "image_size": "space.image_size", "steps": "train.steps",
             "batch_size": "train.batch_size", "seed": "train.seed", "holdout": "calibration.holdout",
             "target_fpr": "calibration.target_fpr", "checkpoint_every": "train.checkpoint_every"}


def build_config(config_file: Path | None = None, assignments: tuple[str, ...] = (), **shortcuts) -> HDMConfig:
    """The defaults, then the TOML file, then the shortcut options that were given, then each --set, validated."""
    from .config import apply_assignments, read_config_file, set_value

    config = read_config_file(config_file) if config_file is not None else HDMConfig()
    for name, value in shortcuts.items():
        if value is not None:
            set_value(config, SHORTCUTS[name], value, f"--{name.replace('_', '-')}")
    apply_assignments(config, list(assignments))
    config.validate()
    return config


def data_source(data: Path | None, category: str | None, normal_dir: Path | None = None,
                abnormal_dir: Path | None = None, mask_dir: Path | None = None,
                normal_test_dir: Path | None = None) -> "DataSource":
    """--data [--category] for MVTec-like, VisA and plain folders; --normal-dir etc. for generic folders."""
    from .layouts import DataSource

    folders = (normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    if data is not None and any(folders):
        raise HDMInputError("give either --data or --normal-dir (with --abnormal-dir, --mask-dir, --normal-test-dir), not both")
    if data is not None:
        return DataSource.detect(data, category)
    if normal_dir is None:
        raise HDMInputError("give --data ROOT [--category NAME] or --normal-dir FOLDER")
    return DataSource("folders", normal_dir=normal_dir, abnormal_dir=abnormal_dir, mask_dir=mask_dir,
                      normal_test_dir=normal_test_dir)


def run_fit(config: HDMConfig, source: "DataSource", run: Path, overwrite: bool) -> None:
    """Split off the calibration hold-out, then train, calibrate and save (see `train_and_save`)."""
    from .layouts import holdout_split

    if not overwrite:
        if (run / MODEL_FILE).exists():
            raise HDMInputError(f"{run}: run folder already holds a model (use --overwrite to replace it)")
        if (run / STATE_FILE).exists():
            raise HDMInputError(f"{run}: run folder holds an interrupted training (continue it with "
                                f"`hdm fit --resume {run}`, or use --overwrite to start again)")
    samples = source.train_samples()
    # Starting over: a stale state of the replaced run must never be resumed into this one.
    (run / STATE_FILE).unlink(missing_ok=True)
    train, holdout = holdout_split([s.path for s in samples], config.calibration.holdout, config.train.seed)
    click.echo(f"fit: {len(train)} normal images from {source.describe()}, {len(holdout)} held out for calibration",
               err=True)
    extra = {"source": source.to_dict(), "train_images": len(train), "holdout": [str(p) for p in holdout]}
    train_and_save(config, train, holdout, run, extra, resume_from=None)


def resume_fit(run: Path) -> None:
    """Continue a fit that was interrupted (even by SIGKILL) from its last training-state checkpoint."""
    from .layouts import DataSource, holdout_split
    from .store import load_training_state, parse_config

    if (run / MODEL_FILE).exists() and not (run / STATE_FILE).exists():
        raise HDMInputError(f"{run}: this run already finished; nothing to resume")
    if not (run / STATE_FILE).exists():
        raise HDMInputError(f"{run}: no {STATE_FILE} to resume from (the run stopped before its first checkpoint; "
                            f"start it again with --overwrite)")
    state = load_training_state(run / STATE_FILE)
    config, extra = parse_config(run / STATE_FILE, state["config"]), state["extra"]
    source = DataSource.from_dict(extra["source"])
    train, holdout = holdout_split([s.path for s in source.train_samples()], config.calibration.holdout,
                                   config.train.seed)
    if [str(p) for p in holdout] != extra["holdout"] or len(train) != extra["train_images"]:
        raise HDMInputError(f"{source.describe()}: the training images changed since this run started; "
                            f"start again with --overwrite")
    click.echo(f"fit: resuming {run} from step {state['step']} of {config.train.steps}", err=True)
    train_and_save(config, train, holdout, run, extra, resume_from=state)


def train_and_save(config: HDMConfig, train: list[Path], holdout: list[Path], run: Path, extra: dict,
                   resume_from: dict | None) -> None:
    """Train (checkpointing a resumable state), calibrate on the hold-out, then write the model atomically."""
    from .inference import calibrate
    from .store import save_checkpoint, write_json
    from .train import fit

    log = lambda m: click.echo(m, err=True)  # noqa: E731
    state_file = run / STATE_FILE
    model, history = fit(config, train, log=log, state_file=state_file, resume_from=resume_from, extra=extra)
    calibrate(model, holdout, config.calibration.target_fpr)
    calibration = model.calibration.summary()
    if len(holdout) < 10:
        log(f"fit: calibration rests on {len(holdout)} held-out images, so its thresholds are wide; "
            f"raise --holdout for tighter ones")
    extra = {**extra, "training": history.summary(), "calibration": calibration}
    save_checkpoint(run / MODEL_FILE, config, model.trained_state(), extra)
    write_json(run / "train_log.json", {**extra, "losses": history.losses[::10]})
    state_file.unlink(missing_ok=True)
    log(f"fit: done in {history.seconds:.0f}s, model saved to {run / MODEL_FILE}; image threshold "
        f"{calibration['image_threshold']:.4f}, pixel threshold {calibration['pixel_threshold']:.4f} "
        f"at target false-alarm rate {config.calibration.target_fpr}")


def run_test(run: Path, source: "DataSource | None") -> dict[str, float]:
    """Evaluate the run on labelled test data; writes metrics.json and report.html into the run."""
    from .inference import evaluate
    from .layouts import DataSource
    from .report import write_report
    from .store import load_model, write_json

    model, extra = load_model(run / MODEL_FILE)
    if source is None:
        if "source" not in extra:
            raise HDMInputError(f"{run}: the run does not say what it was trained on: give --data/--category")
        source = DataSource.from_dict(extra["source"])
    started = time.perf_counter()
    calibration = model.calibration
    thresholds = (float(calibration.image_threshold), float(calibration.pixel_threshold))
    evaluation = evaluate(model, source.test_samples(), thresholds=thresholds)
    result = {**evaluation.metrics, "test_images": len(evaluation.predictions), "source": source.to_dict(),
              "calibration": calibration.summary(), "seconds": time.perf_counter() - started}
    write_json(run / "metrics.json", result)
    write_report(run / "report.html", evaluation, thresholds, title=f"hdm test: {source.describe()}",
                 image_size=model.image_size)
    return evaluation.metrics


@click.group()
@click.version_option(package_name="hdm")
def main() -> None:
    """Industrial anomaly detection with HDM, the Hybrid Diffusion Model."""
    from .runtime import keep_freed_memory

    keep_freed_memory()


_data = click.option("--data", type=click.Path(path_type=Path),
                     help="MVTec AD / MPDD / BTAD / VisA root (with --category), or a plain folder of normal images.")
_category = click.option("--category", help="Category (object) inside --data.")


def _folders(func):
    for option in reversed([
        click.option("--normal-dir", type=click.Path(path_type=Path), help="Generic layout: normal training images."),
        click.option("--abnormal-dir", type=click.Path(path_type=Path), help="Generic layout: defective test images."),
        click.option("--mask-dir", type=click.Path(path_type=Path), help="Generic layout: masks, matched by stem (with or without _mask)."),
        click.option("--normal-test-dir", type=click.Path(path_type=Path), help="Generic layout: normal test images."),
    ]):
        func = option(func)
    return func


@main.command("fit")
@_data
@_category
@_folders
@click.option("--out", "run", type=click.Path(path_type=Path), help="Run folder to create.")
@click.option("--resume", "resume_run", type=click.Path(path_type=Path),
              help="Continue the interrupted fit in this run folder (its data and settings are stored in it).")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="A TOML file of settings, one table per section (the format --print-config writes).")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.NAME=VALUE",
              help="Override one setting, e.g. --set ddm.top_k=0.02 (repeatable; after --config and the options below).")
@click.option("--print-config", is_flag=True, help="Print the resolved settings as TOML and stop.")
@click.option("--steps", type=int, help="Sets train.steps.")
@click.option("--batch-size", type=int, help="Sets train.batch_size.")
@click.option("--backbone", type=click.Choice(["lite0", "lite1", "lite2"]), help="Sets space.backbone.")
@click.option("--image-size", type=int, help="Sets space.image_size (a multiple of 32).")
@click.option("--seed", type=int, help="Sets train.seed: a run is reproducible for a given seed.")
@click.option("--holdout", type=float,
              help="Sets calibration.holdout: the fraction of normal images held out of training to calibrate the thresholds.")
@click.option("--target-fpr", type=float,
              help="Sets calibration.target_fpr: the false-alarm rate on normal parts the thresholds aim for.")
@click.option("--checkpoint-every", type=int, help="Sets train.checkpoint_every: steps between resumable checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in the run folder.")
@_fail_cleanly
def fit_command(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir, run, resume_run, config_file,
                assignments, print_config, overwrite, **shortcuts):
    """Train on normal images only, then calibrate on the held-out ones."""
    if resume_run is not None:
        if run is not None or data is not None or normal_dir is not None or config_file or assignments:
            raise HDMInputError("--resume RUN takes its data and settings from the run: give no --out, data or settings")
        resume_fit(resume_run)
        return
    config = build_config(config_file, assignments, **shortcuts)
    if print_config:
        from .config import to_toml

        click.echo(to_toml(config), nl=False)
        return
    if run is None:
        raise HDMInputError("give --out RUN (a new run folder) or --resume RUN")
    source = data_source(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    run_fit(config, source, run, overwrite)


@main.command("test")
@click.option("--run", type=click.Path(path_type=Path), required=True)
@_data
@_category
@_folders
@_fail_cleanly
def test_command(run, data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir):
    """Evaluate on the test split (by default the run's own data) and write RUN/metrics.json."""
    given = data is not None or normal_dir is not None
    source = data_source(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir) if given else None
    metrics = run_test(run, source)
    click.echo(metrics_table(metrics, "model"))
    click.echo(f"test: metrics in {run / 'metrics.json'}, report in {run / 'report.html'}", err=True)


@main.command("predict")
@click.option("--run", type=click.Path(path_type=Path), help="Run folder of a trained model.")
@click.option("--model", "onnx_model", type=click.Path(path_type=Path), help="An exported .onnx model instead of --run.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default RUN/predictions, or beside the .onnx file).")
@click.option("--save-maps", is_flag=True, help="Also write each raw anomaly map as float32 .npy at the image's size.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@_fail_cleanly
def predict_command(run, onnx_model, paths, out, save_maps, batch_size):
    """Score images (files or folders): overlays, masks, scores.csv."""
    from .predict import predict_paths

    if (run is None) == (onnx_model is None):
        raise HDMInputError("give exactly one of --run RUN or --model MODEL.onnx")
    if batch_size < 1:
        raise HDMInputError(f"--batch-size must be at least 1, not {batch_size}")
    if onnx_model is not None:
        from .export import OnnxDetector

        if not onnx_model.is_file():
            raise HDMInputError(f"{onnx_model}: model file not found")
        model = OnnxDetector(onnx_model)
        out = out or onnx_model.parent / "predictions"
    else:
        from .store import load_model

        model, _ = load_model(run / MODEL_FILE)
        out = out or run / "predictions"
    rows, errors = predict_paths(model, list(paths), out, save_maps, batch_size)
    flagged = sum(r["decision"] == "defect" for r in rows)
    click.echo(f"predict: {len(rows)} images, {flagged} flagged as defective; outputs in {out}", err=True)
    if errors:
        click.echo(f"predict: {len(errors)} files could not be read:", err=True)
        for error in errors:
            click.echo(f"  {error}", err=True)
        sys.exit(1)


@main.command("export")
@click.option("--run", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .onnx file to write.")
@_fail_cleanly
def export_command(run, fmt, out):
    """Export the whole inference path (uint8 images in; map and score out) to one file."""
    from .export import export_onnx
    from .store import load_model

    model, _ = load_model(run / MODEL_FILE)
    export_onnx(model, out)
    click.echo(f"export: wrote {out} ({fmt}, input uint8 Bx{model.image_size}x{model.image_size}x3)", err=True)


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hdm-demo"), show_default=True)
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Makes the demo reproducible.")
@_fail_cleanly
def demo_command(out, steps, seed):
    """The main job: make the built-in dataset, then fit, test and predict on it."""
    from .predict import predict_paths
    from .store import load_model
    from .synthetic import CATEGORY, make_default_dataset

    started = time.perf_counter()
    data = out / "data"
    if not (data / CATEGORY).is_dir():
        make_default_dataset(data, seed=seed)
    run = out / "run"
    config = build_config(steps=steps, seed=seed)
    run_fit(config, data_source(data, CATEGORY), run, overwrite=True)
    metrics = run_test(run, None)
    model, _ = load_model(run / MODEL_FILE)
    rows, _ = predict_paths(model, [data / CATEGORY / "test"], run / "predictions")
    click.echo(f"predictions for {len(rows)} test images in {run / 'predictions'}; report in {run / 'report.html'}",
               err=True)
    click.echo(metrics_table(metrics, CATEGORY))
    click.echo(f"total {time.perf_counter() - started:.0f}s", err=True)
