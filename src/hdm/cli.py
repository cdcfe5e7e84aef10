"""The `hdm` command line: fit, test, predict, and demo (the main job on the built-in data)."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from .config import HDMConfig
from .data import HDMInputError, mvtec_samples, normal_samples

MODEL_FILE = "model.pt"


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
    return "\n".join(lines)


def build_config(backbone: str, image_size: int, steps: int | None, batch_size: int | None, seed: int) -> HDMConfig:
    config = HDMConfig()
    config.space.backbone = backbone
    config.space.image_size = image_size
    if steps is not None:
        config.train.steps = steps
    if batch_size is not None:
        config.train.batch_size = batch_size
    config.train.seed = seed
    config.validate()
    return config


def run_fit(config: HDMConfig, data: Path, category: str | None, run: Path, overwrite: bool) -> None:
    from .store import save_checkpoint, write_json
    from .train import fit

    checkpoint = run / MODEL_FILE
    if checkpoint.exists() and not overwrite:
        raise HDMInputError(f"{run}: run folder already holds a model (use --overwrite to replace it)")
    samples = normal_samples(data, category)
    click.echo(f"fit: {len(samples)} normal images from {data}" + (f" ({category})" if category else ""), err=True)
    model, history = fit(config, [s.path for s in samples], log=lambda m: click.echo(m, err=True))
    source = {"data": str(data.resolve()), "category": category, "train_images": len(samples)}
    save_checkpoint(checkpoint, config, model.trained_state(), {"source": source, "training": history.summary()})
    write_json(run / "train_log.json", {"source": source, "summary": history.summary(), "losses": history.losses[::10]})
    click.echo(f"fit: done in {history.seconds:.0f}s, model saved to {checkpoint}", err=True)


def run_test(run: Path, data: Path | None, category: str | None) -> dict[str, float]:
    from .inference import evaluate
    from .store import load_model, write_json

    model, extra = load_model(run / MODEL_FILE)
    source = extra.get("source", {})
    data = data or (Path(source["data"]) if source.get("data") else None)
    category = category or source.get("category")
    if data is None or category is None:
        raise HDMInputError(f"{run}: give --data and --category: the run was not trained on an MVTec-layout category")
    started = time.perf_counter()
    metrics, predictions = evaluate(model, mvtec_samples(data, category, "test"))
    result = {**metrics, "test_images": len(predictions), "category": category, "data": str(data),
              "seconds": time.perf_counter() - started}
    write_json(run / "metrics.json", result)
    return metrics


@click.group()
@click.version_option(package_name="hdm")
def main() -> None:
    """Industrial anomaly detection with HDM, the Hybrid Diffusion Model."""


_backbone = click.option("--backbone", type=click.Choice(["lite0", "lite1", "lite2"]), default="lite0", show_default=True)
_size = click.option("--image-size", type=int, default=256, show_default=True, help="Model input size (multiple of 32).")
_seed = click.option("--seed", type=int, default=0, show_default=True, help="Makes the run reproducible.")


@main.command("fit")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="MVTec-layout root (with --category) or a plain folder of normal images.")
@click.option("--category", help="Category inside an MVTec-layout root.")
@click.option("--out", "run", type=click.Path(path_type=Path), required=True, help="Run folder to create.")
@click.option("--steps", type=int, help="Training steps (default from the configuration).")
@click.option("--batch-size", type=int)
@_backbone
@_size
@_seed
@click.option("--overwrite", is_flag=True, help="Replace a model already in the run folder.")
@_fail_cleanly
def fit_command(data, category, run, steps, batch_size, backbone, image_size, seed, overwrite):
    """Train on normal images only."""
    config = build_config(backbone, image_size, steps, batch_size, seed)
    run_fit(config, data, category, run, overwrite)


@main.command("test")
@click.option("--run", type=click.Path(path_type=Path), required=True)
@click.option("--data", type=click.Path(path_type=Path), help="Defaults to the data the run was trained on.")
@click.option("--category")
@_fail_cleanly
def test_command(run, data, category):
    """Evaluate on the test split and write RUN/metrics.json."""
    metrics = run_test(run, data, category)
    click.echo(metrics_table(metrics, "model"))


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
@_seed
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
    config = build_config("lite0", 256, steps, None, seed)
    run_fit(config, data, CATEGORY, run, overwrite=True)
    metrics = run_test(run, data, CATEGORY)
    model, _ = load_model(run / MODEL_FILE)
    rows, _ = predict_paths(model, [data / CATEGORY / "test"], run / "predictions")
    click.echo(f"predictions for {len(rows)} test images in {run / 'predictions'}", err=True)
    click.echo(metrics_table(metrics, CATEGORY))
    click.echo(f"total {time.perf_counter() - started:.0f}s", err=True)
