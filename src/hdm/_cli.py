"""The `hdm` command line: fit, test, predict, and demo (the main job on the built-in data)."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from ._config import HDMConfig
from ._data import HDMInputError
from ._runs import MODEL_FILE, data_source, fit_run, resume_run, test_run


def _log(message: str) -> None:
    click.echo(message, err=True)


_device_only = click.option("--device", default="auto", show_default=True,
                            help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")


def _device(func):
    """--device and --precision: where a command computes and in what precision."""
    func = click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                        help="bf16: the networks run under CUDA autocast (CUDA only).")(func)
    return _device_only(func)


_quiet = click.option("--quiet", "-q", is_flag=True,
                      help="No progress bars or progress lines; results and errors still print.")


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
    from ._metrics import METRIC_KEYS

    lines = [f"| {title} | " + " | ".join(METRIC_KEYS) + " |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
    lines.append("| HDM | " + " | ".join(f"{metrics[k]:.4f}" for k in METRIC_KEYS) + " |")
    if "image_recall_at_threshold" in metrics:
        lines.append(f"\nAt the calibrated thresholds: {metrics['image_recall_at_threshold']:.1%} of defective images "
                     f"flagged, {metrics['image_fpr_at_threshold']:.1%} false alarms on normal ones; "
                     f"{metrics['pixel_recall_at_threshold']:.1%} of defect pixels in the masks.")
    return "\n".join(lines)


# `hdm fit` options that set one configuration field each; their defaults are the dataclasses'.
SHORTCUTS = {"space": "space.kind", "backbone": "space.backbone", "image_size": "space.image_size", "steps": "train.steps",
             "batch_size": "train.batch_size", "seed": "train.seed", "holdout": "calibration.holdout",
             "target_fpr": "calibration.target_fpr", "checkpoint_every": "train.checkpoint_every"}


def build_config(config_file: Path | None = None, assignments: tuple[str, ...] = (), **shortcuts) -> HDMConfig:
    """The defaults, then the TOML file, then the shortcut options that were given, then each --set, validated."""
    from ._config import resolve

    values = {SHORTCUTS[name]: value for name, value in shortcuts.items() if value is not None}
    return resolve(config_file, values, assignments, where="command-line options")


@click.group()
@click.version_option(package_name="hdm")
def main() -> None:
    """Industrial anomaly detection with HDM, the Hybrid Diffusion Model."""
    from ._runtime import keep_freed_memory

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
@click.option("--resume", "resume_run_path", type=click.Path(path_type=Path),
              help="Continue the interrupted fit in this run folder (its data and settings are stored in it).")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="A TOML file of settings, one table per section (the format --print-config writes).")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.NAME=VALUE",
              help="Override one setting, e.g. --set ddm.top_k=0.02 (repeatable; after --config and the options below).")
@click.option("--print-config", is_flag=True, help="Print the resolved settings as TOML and stop.")
@click.option("--steps", type=int, help="Sets train.steps.")
@click.option("--batch-size", type=int, help="Sets train.batch_size.")
@click.option("--space", type=click.Choice(["feature", "pixel"]),
              help="Sets space.kind: frozen CNN features (the CPU default), or the image itself (the paper's setting; "
                   "UNets of space.unet_width, a GPU's or a small size's).")
@click.option("--backbone", type=click.Choice(["lite0", "lite1", "lite2"]), help="Sets space.backbone.")
@click.option("--image-size", type=int, help="Sets space.image_size (a multiple of 32).")
@click.option("--seed", type=int, help="Sets train.seed: a run is reproducible for a given seed.")
@click.option("--holdout", type=float,
              help="Sets calibration.holdout: the fraction of normal images held out of training to calibrate the thresholds.")
@click.option("--target-fpr", type=float,
              help="Sets calibration.target_fpr: the false-alarm rate on normal parts the thresholds aim for.")
@click.option("--checkpoint-every", type=int, help="Sets train.checkpoint_every: steps between resumable checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace a model already in the run folder.")
@click.option("--seeds", help="Many runs: a run per seed (0,1,...) in OUT/<category>/seed-K.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Many runs: one after another here, or as tasks on a Ray cluster (pip install 'hdm[ray]'); "
                   "giving it asks for many runs even of one category.")
@click.option("--address", help="--engine ray: the cluster (auto, or HOST:PORT); none starts Ray on this machine.")
@click.option("--cpus-per-fit", type=click.IntRange(min=1),
              help="Many runs: CPUs each fit takes and torch threads it runs on [ray: 1; local: all].")
@click.option("--gpus-per-fit", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--engine ray: GPUs each fit takes (a fraction shares one); fits run on CUDA when > 0.")
@click.option("--workers", type=click.IntRange(min=1),
              help="--engine ray: train this one run data-parallel on N Ray Train workers "
                   "(--cpus-per-fit and --gpus-per-fit then apply to each worker).")
@_device
@_quiet
@_fail_cleanly
def fit_command(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir, run, resume_run_path, config_file,
                assignments, print_config, overwrite, seeds, engine, address, cpus_per_fit, gpus_per_fit, workers,
                device, precision, quiet, **shortcuts):
    """Train on normal images only, then calibrate on the held-out ones.

    Many runs at once: --category all (or a,b,c), --seeds or --engine fit and test every
    (category, seed) into OUT/<category>[/seed-K] and write OUT/fits.md and OUT/fits.json; the same
    command again skips finished runs and resumes interrupted ones.

    One large run data-parallel: --engine ray --workers N on a Ray cluster, or this command under
    torchrun (torchrun --nproc-per-node N -m hdm fit ...)."""
    quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 speaks for all
    log = None if quiet else _log
    if workers is not None:
        if engine != "ray" or seeds is not None or data is None or category in ("all", None) or "," in category:
            raise HDMInputError("--workers trains one run on a Ray cluster: give --engine ray, --data ROOT, one "
                                "--category and no --seeds (under torchrun, run plain `hdm fit`)")
        if resume_run_path is not None or device != "auto" or run is None:
            raise HDMInputError("--workers takes --out RUN, no --resume (run the same command again) and no --device "
                                "(--gpus-per-fit places it on CUDA)")
        _fit_parallel(data, category, run, build_config(config_file, assignments, **shortcuts),
                      workers, cpus_per_fit or 1, gpus_per_fit, address, precision, overwrite, log)
        return
    engine_given = click.get_current_context().get_parameter_source("engine") != click.core.ParameterSource.DEFAULT
    if engine_given or seeds is not None or (category is not None and (category == "all" or "," in category)):
        _fit_many(data, category, normal_dir, run, resume_run_path, overwrite, print_config, seeds, engine, address,
                  cpus_per_fit, gpus_per_fit, device, precision, build_config(config_file, assignments, **shortcuts),
                  shortcuts["seed"] is not None, log)
        return
    if resume_run_path is not None:
        if run is not None or data is not None or normal_dir is not None or config_file or assignments:
            raise HDMInputError("--resume RUN takes its data and settings from the run: give no --out, data or settings")
        resume_run(resume_run_path, log=log, progress=not quiet, device=device, precision=precision)
        return
    config = build_config(config_file, assignments, **shortcuts)
    if print_config:
        from ._config import to_toml

        click.echo(to_toml(config), nl=False)
        return
    if run is None:
        raise HDMInputError("give --out RUN (a new run folder) or --resume RUN")
    source = data_source(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    fit_run(config, source, run, overwrite, log=log, progress=not quiet, device=device, precision=precision)


def _fit_parallel(data, category, run, config, workers, cpus, gpus, address, precision, overwrite, log) -> None:
    from . import _cluster
    from ._store import load_model

    source = data_source(data, category)
    _cluster.connect(address)
    run.mkdir(parents=True, exist_ok=True)
    _cluster.check_shared_storage(run.resolve(), data.resolve())
    if log:
        log(f"fit: {run} on {workers} Ray Train workers ({cpus} CPUs{f', {gpus} GPUs' if gpus else ''} each)")
    _cluster.train_parallel(config, source, run, workers, cpus, gpus, precision, overwrite)
    calibration = load_model(run / MODEL_FILE)[1]["calibration"]
    if log:
        log(f"fit: done, model saved to {run / MODEL_FILE}; image threshold {calibration['image_threshold']:.4f}, "
            f"pixel threshold {calibration['pixel_threshold']:.4f}")


def _fit_many(data, category, normal_dir, runs, resume_run_path, overwrite, print_config, seeds, engine, address,
              cpus, gpus, device, precision, config, config_seed_given, log) -> None:
    import shlex

    from ._fleet import fit_fleet

    if data is None or category is None or runs is None:
        raise HDMInputError("many runs need --data ROOT, --category all|a,b,c and --out RUNS")
    if normal_dir is not None or resume_run_path is not None or overwrite or print_config:
        raise HDMInputError("many runs take no --normal-dir, --resume, --overwrite or --print-config: "
                            "run the same command again to resume")
    if seeds is not None and config_seed_given:
        raise HDMInputError("give --seed for one run or --seeds for many, not both")
    if engine == "ray" and device != "auto":
        raise HDMInputError("--engine ray places fits on CPUs, or on CUDA with --gpus-per-fit: give no --device")
    if engine == "local" and (address is not None or gpus):
        raise HDMInputError("--address and --gpus-per-fit are for --engine ray")
    try:
        seed_list = None if seeds is None else [int(s) for s in seeds.split(",")]
    except ValueError:
        raise HDMInputError(f"--seeds {seeds}: expected integers joined by commas, e.g. 0,1,2") from None
    command = "hdm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    outcomes = fit_fleet(data, category, seed_list, runs, config, engine, address, cpus, gpus, device, precision,
                         command, log or (lambda message: None))
    failed = sum(o.state == "failed" for o in outcomes)
    click.echo(f"fit: {len(outcomes) - failed} of {len(outcomes)} runs done; table in {runs / 'fits.md'}", err=True)
    if failed:
        sys.exit(1)


@main.command("fit-generator")
@click.option("--run", type=click.Path(path_type=Path), required=True,
              help="Run folder to save generator.pt into (created if needed); its model's data and settings are the defaults.")
@_data
@_category
@click.option("--normal-dir", type=click.Path(path_type=Path), help="Generic layout: normal training images.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="A TOML file of settings (as for fit).")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.NAME=VALUE",
              help="Override one setting, e.g. --set generator.crop_size=96 (repeatable).")
@click.option("--steps", type=int, help="Sets generator.steps.")
@click.option("--crop-size", type=int, help="Sets generator.crop_size (a multiple of 8; the image size trains on whole images).")
@click.option("--seed", type=int, help="Sets train.seed.")
@click.option("--overwrite", is_flag=True, help="Replace a generator already in the run, or restart an interrupted fit.")
@_device_only
@_quiet
@_fail_cleanly
def fit_generator_command(run, data, category, normal_dir, config_file, assignments, steps, crop_size, seed, overwrite,
                          device, quiet):
    """Train DAGM's pixel diffusion model on the normal images, for `hdm generate`.

    The same command again continues a fit that was interrupted."""
    from ._runs import fit_generator_run

    source = data_source(data, category, normal_dir) if data is not None or normal_dir is not None else None
    values = {key: value for key, value in (("generator.steps", steps), ("generator.crop_size", crop_size),
                                            ("train.seed", seed)) if value is not None}
    fit_generator_run(run, source, config_file, values, assignments, overwrite, log=None if quiet else _log,
                      progress=not quiet, device=device, where="command-line options")


@main.command("generate")
@click.option("--run", type=click.Path(path_type=Path), required=True, help="Run folder holding a generator.pt.")
@click.option("--count", type=int, default=16, show_default=True, help="Defect images to make.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the set (MVTec AD layout).")
@click.option("--images", "images_dir", type=click.Path(path_type=Path),
              help="Normal images to start from (default: the generator's training images), used in turn.")
@click.option("--mask-dir", type=click.Path(path_type=Path),
              help="A mask per image of --images, matched by name (default: Perlin masks in a random window).")
@click.option("--tau", type=float, help="Initial variance inflation (default generator.tau); POM adapts it.")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed makes the same set.")
@click.option("--with-normals", is_flag=True, help="Also write the normals the defects started from to test/good.")
@click.option("--overwrite", is_flag=True, help="Replace a set already in --out.")
@_device_only
@_quiet
@_fail_cleanly
def generate_command(run, count, out, images_dir, mask_dir, tau, seed, with_normals, overwrite, device, quiet):
    """Make defect images with exact masks from normal ones: DAGM in pixels."""
    from ._generate import generate_run

    defects, rejected = generate_run(run, out, count, images_dir, mask_dir, tau, seed, with_normals, overwrite, device,
                                     progress=not quiet)
    if not quiet:
        short = f" ({count - len(defects)} left out: their change stayed outside POM's band)" if len(defects) < count else ""
        _log(f"generate: {len(defects)} defect images in {out}{short}; {rejected} draws rejected by POM; "
             f"contact sheet {out / 'contact_sheet.png'}")


@main.command("test")
@click.option("--run", type=click.Path(path_type=Path), required=True)
@_data
@_category
@_folders
@_device
@_quiet
@_fail_cleanly
def test_command(run, data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir, device, precision, quiet):
    """Evaluate on the test split (by default the run's own data) and write RUN/metrics.json."""
    given = data is not None or normal_dir is not None
    source = data_source(data, category, normal_dir, abnormal_dir, mask_dir, normal_test_dir) if given else None
    metrics = test_run(run, source, progress=not quiet, device=device, precision=precision).metrics
    click.echo(metrics_table(metrics, "model"))
    if not quiet:
        click.echo(f"test: metrics in {run / 'metrics.json'}, report in {run / 'report.html'}", err=True)


@main.command("predict")
@click.option("--run", type=click.Path(path_type=Path), help="Run folder of a trained model.")
@click.option("--model", "onnx_model", type=click.Path(path_type=Path), help="An exported .onnx model instead of --run.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default RUN/predictions, or beside the .onnx file).")
@click.option("--save-maps", is_flag=True, help="Also write each raw anomaly map as float32 .npy at the image's size.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: score in a pool of actors on a Ray cluster (pip install 'hdm[ray]').")
@click.option("--address", help="--engine ray: the cluster (auto, or HOST:PORT); none starts Ray on this machine.")
@click.option("--actors", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine ray: actors in the pool, each with its own copy of the model.")
@click.option("--cpus-per-actor", type=click.IntRange(min=1), default=1, show_default=True,
              help="--engine ray: CPUs each actor takes (and torch or onnxruntime threads it runs).")
@click.option("--gpus-per-actor", type=click.FloatRange(min=0), default=0, show_default=True,
              help="--engine ray: GPUs each actor takes; a run's model then runs on CUDA.")
@_device
@_quiet
@_fail_cleanly
def predict_command(run, onnx_model, paths, out, save_maps, batch_size, engine, address, actors, cpus_per_actor,
                    gpus_per_actor, device, precision, quiet):
    """Score images (files, folders or manifests made by `hdm index`): overlays, masks, scores.csv.
    An .onnx model runs on the CPU. With --engine ray, a job run again scores only the images not yet done."""
    from ._predict import load_detector, predict_paths, resolve_targets

    if (run is None) == (onnx_model is None):
        raise HDMInputError("give exactly one of --run RUN or --model MODEL.onnx")
    model_path = onnx_model or run
    out = out or (onnx_model.parent if onnx_model else run) / "predictions"
    if engine == "ray":
        from . import _cluster

        if device != "auto" or precision != "fp32":
            raise HDMInputError("--engine ray places actors on CPUs, or on CUDA with --gpus-per-actor: "
                                "give no --device or --precision")
        targets = resolve_targets(list(paths))
        load_detector(model_path)  # a bad model is one line here, not an error in every actor
        _cluster.connect(address)
        out.mkdir(parents=True, exist_ok=True)
        _cluster.check_shared_storage(out.resolve(), model_path.resolve(), *(p.resolve() for p in paths))
        rows, errors = _cluster.predict(model_path.resolve(), targets, out.resolve(), save_maps, batch_size, actors,
                                        cpus_per_actor, gpus_per_actor, _log if not quiet else lambda message: None)
    else:
        if address is not None or gpus_per_actor:
            raise HDMInputError("--address and --gpus-per-actor are for --engine ray")
        model = load_detector(model_path, device, precision)
        rows, errors = predict_paths(model, list(paths), out, save_maps, batch_size, progress=not quiet)
    flagged = sum(r["decision"] == "defect" for r in rows)
    if not quiet:
        click.echo(f"predict: {len(rows)} images, {flagged} flagged as defective; outputs in {out}", err=True)
    if errors:
        click.echo(f"predict: {len(errors)} files could not be read:", err=True)
        for error in errors:
            click.echo(f"  {error}", err=True)
        sys.exit(1)


@main.command("index")
@click.argument("roots", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The manifest to write: .csv, or .parquet (needs pyarrow, in hdm[ray]).")
@_fail_cleanly
def index_command(roots, out):
    """List every image below ROOTS into a manifest that `hdm predict` takes: one row per image, its
    path and its output name, as `hdm predict ROOTS...` would name it."""
    from ._predict import resolve_targets, write_manifest

    targets = resolve_targets(list(roots))
    write_manifest(targets, out)
    click.echo(f"index: {len(targets)} images in {out}", err=True)


@main.command("export")
@click.option("--run", type=click.Path(path_type=Path), required=True)
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .onnx file to write.")
@_fail_cleanly
def export_command(run, fmt, out):
    """Export the whole inference path (uint8 images in; map and score out) to one file."""
    from ._export import export_onnx
    from ._store import load_model

    model, _ = load_model(run / MODEL_FILE)
    export_onnx(model, out)
    click.echo(f"export: wrote {out} ({fmt}, input uint8 Bx{model.image_size}x{model.image_size}x3)", err=True)


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("hdm-demo"), show_default=True)
@click.option("--steps", type=int, default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Makes the demo reproducible.")
@_device
@_quiet
@_fail_cleanly
def demo_command(out, steps, seed, device, precision, quiet):
    """The main job: make the built-in dataset, then fit, test and predict on it."""
    from ._device import place
    from ._predict import predict_paths
    from ._store import load_model
    from ._synthetic import CATEGORY, make_default_dataset

    started = time.perf_counter()
    data = out / "data"
    if not (data / CATEGORY).is_dir():
        make_default_dataset(data, seed=seed)
    run = out / "run"
    config = build_config(steps=steps, seed=seed)
    fit_run(config, data_source(data, CATEGORY), run, overwrite=True, log=None if quiet else _log, progress=not quiet,
            device=device, precision=precision)
    metrics = test_run(run, progress=not quiet, device=device, precision=precision).metrics
    model = place(load_model(run / MODEL_FILE)[0], device, precision)  # as a user gets it back
    rows, _ = predict_paths(model, [data / CATEGORY / "test"], run / "predictions", progress=not quiet)
    if not quiet:
        click.echo(f"predictions for {len(rows)} test images in {run / 'predictions'}; report in {run / 'report.html'}",
               err=True)
    click.echo(metrics_table(metrics, CATEGORY))
    if not quiet:
        click.echo(f"total {time.perf_counter() - started:.0f}s", err=True)
