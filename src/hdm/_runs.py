"""One home for runs: fitting, resuming, calibrating and testing a run folder.

The command line, the bench scripts and library users all call these; none keeps its own copy of
the glue. A run folder holds `model.pt` (weights, configuration, calibration, where the data came
from), `train_log.json`, and after a test `metrics.json` and `report.html`; `training_state.pt`
exists only while a fit runs or after it was interrupted. `hdm fit-generator` adds `generator.pt`
(DAGM in pixels), with `generator_state.pt` while it trains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._config import HDMConfig
from ._data import HDMInputError

if TYPE_CHECKING:
    import torch

    from ._generator import PixelGenerator
    from ._inference import Evaluation
    from ._layouts import DataSource
    from ._model import HDM
    from ._train import TrainingLog

MODEL_FILE = "model.pt"
STATE_FILE = "training_state.pt"  # exists only while a fit is running or was interrupted
GENERATOR_FILE = "generator.pt"
GENERATOR_STATE_FILE = "generator_state.pt"

Log = Callable[[str], None]


def _silent(message: str) -> None:
    pass


@dataclass
class Run:
    """A fitted run: its folder, the calibrated model, how training went and the held-out images."""

    path: Path
    model: "HDM"
    training: "TrainingLog"
    holdout: list[Path]


def data_source(data: Path | None, category: str | None, normal_dir: Path | None = None,
                abnormal_dir: Path | None = None, mask_dir: Path | None = None,
                normal_test_dir: Path | None = None) -> "DataSource":
    """A data root [+ category] for MVTec-like, VisA and plain folders; or generic folders."""
    from ._layouts import DataSource

    folders = (normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    if data is not None and any(folders):
        raise HDMInputError("give either --data or --normal-dir (with --abnormal-dir, --mask-dir, --normal-test-dir), not both")
    if data is not None:
        return DataSource.detect(data, category)
    if normal_dir is None:
        raise HDMInputError("give --data ROOT [--category NAME] or --normal-dir FOLDER")
    return DataSource("folders", normal_dir=normal_dir, abnormal_dir=abnormal_dir, mask_dir=mask_dir,
                      normal_test_dir=normal_test_dir)


def fit_run(config: HDMConfig, source: "DataSource", run: Path, overwrite: bool = False, log: Log | None = None,
            progress: bool = True, device: str = "cpu", precision: str = "fp32") -> Run:
    """Split off the calibration hold-out, then train on `device` in `precision` (see `_device.place`),
    calibrate and save into the run folder (messages go to `log`, if given)."""
    from ._device import checked_device
    from ._distributed import join_from_env

    device = join_from_env(checked_device(device, precision))
    log = log or _silent
    if not overwrite:
        check_no_model(run)
        if (run / STATE_FILE).exists():
            raise HDMInputError(f"{run}: run folder holds an interrupted training (continue it with "
                                f"`hdm fit --resume {run}`, or use --overwrite to start again)")
    train, holdout, extra = split_data(config, source)
    # Starting over: a stale state of the replaced run must never be resumed into this one.
    (run / STATE_FILE).unlink(missing_ok=True)
    log(f"fit: {len(train)} normal images from {source.describe()}, {len(holdout)} held out for calibration")
    return train_and_save(config, train, holdout, run, extra, None, log, progress, device, precision)


def check_no_model(run: Path) -> None:
    """A new fit never replaces a finished one unless told to."""
    if (run / MODEL_FILE).exists():
        raise HDMInputError(f"{run}: run folder already holds a model (use --overwrite to replace it)")


def split_data(config: HDMConfig, source: "DataSource") -> tuple[list[Path], list[Path], dict]:
    """The training images, the calibration hold-out, and what the run records about them."""
    from ._layouts import holdout_split

    samples = source.train_samples()
    train, holdout = holdout_split([s.path for s in samples], config.calibration.holdout, config.train.seed)
    extra = {"source": source.to_dict(), "train_images": len(train), "holdout": [str(p) for p in holdout]}
    return train, holdout, extra


def check_same_data(state: dict, train: list[Path], holdout: list[Path], source: "DataSource") -> None:
    """A training state resumes only onto the images it started from."""
    if [str(p) for p in holdout] != state["extra"]["holdout"] or len(train) != state["extra"]["train_images"]:
        raise HDMInputError(f"{source.describe()}: the training images changed since this run started; "
                            f"start again with --overwrite")


def resume_run(run: Path, log: Log | None = None, progress: bool = True, device: str = "cpu",
               precision: str = "fp32") -> Run:
    """Continue a fit that was interrupted (even by SIGKILL) from its last training-state checkpoint, on
    any device."""
    from ._device import checked_device
    from ._distributed import join_from_env
    from ._layouts import DataSource
    from ._store import load_training_state, parse_config

    device = join_from_env(checked_device(device, precision))
    log = log or _silent
    if (run / MODEL_FILE).exists() and not (run / STATE_FILE).exists():
        raise HDMInputError(f"{run}: this run already finished; nothing to resume")
    if not (run / STATE_FILE).exists():
        raise HDMInputError(f"{run}: no {STATE_FILE} to resume from (the run stopped before its first checkpoint; "
                            f"start it again with --overwrite)")
    state = load_training_state(run / STATE_FILE)
    config, extra = parse_config(run / STATE_FILE, state["config"]), state["extra"]
    source = DataSource.from_dict(extra["source"])
    train, holdout, _ = split_data(config, source)
    check_same_data(state, train, holdout, source)
    log(f"fit: resuming {run} from step {state['step']} of {config.train.steps}")
    return train_and_save(config, train, holdout, run, extra, state, log, progress, device, precision)


def pixel_generator(config: HDMConfig, run: Path, holdout: list[Path], device: "torch.device") -> "PixelGenerator | None":
    """The run's generator when DAGM draws on it (`dagm.pixel_share` > 0): trained first, on these very
    training images, or one line saying so; it draws with this fit's sampling settings."""
    from ._device import place
    from ._generator import with_sampling
    from ._store import load_generator

    if config.dagm.pixel_share <= 0:
        return None
    if not (run / GENERATOR_FILE).exists():
        raise HDMInputError(f"{run}: dagm.pixel_share > 0 draws on the run's generator: train it first "
                            f"(`hdm fit-generator --run {run}` with the same data and seed)")
    generator, extra = load_generator(run / GENERATOR_FILE)
    if generator.image_size != config.space.image_size:
        raise HDMInputError(f"{run / GENERATOR_FILE}: makes {generator.image_size}-pixel images, this fit's are "
                            f"{config.space.image_size}; train it again with `hdm fit-generator --run {run} --overwrite`")
    if extra.get("holdout") != [str(p) for p in holdout]:
        raise HDMInputError(f"{run / GENERATOR_FILE}: trained on other images than this fit (another data set or "
                            f"seed); train it again with `hdm fit-generator --run {run} --overwrite`")
    return place(with_sampling(generator, config.generator), device)


def train_and_save(config: HDMConfig, train: list[Path], holdout: list[Path], run: Path, extra: dict,
                   resume_from: dict | None, log: Log, progress: bool, device: "torch.device",
                   precision: str, keep_state: Callable[[dict], None] | None = None) -> Run:
    """Train, calibrate on the hold-out, then write the model atomically. Every rank of a data-parallel
    fit calls this; rank 0 writes. The resumable training state goes to `keep_state` (every rank calls
    it; by default rank 0 writes it into the run folder)."""
    from ._distributed import Ranks
    from ._inference import calibrate
    from ._store import save_checkpoint, save_training_state, write_json
    from ._train import fit

    ranks = Ranks.current()
    state_file = run / STATE_FILE

    def keep_in_run(state: dict) -> None:
        if ranks.main:
            save_training_state(state_file, state)

    keep = keep_state or keep_in_run
    model, history = fit(config, train, progress=progress, log=log, resume_from=resume_from, device=device,
                         precision=precision, pixels=pixel_generator(config, run, holdout, device),
                         checkpoint=lambda state: keep({**state, "config": config.to_dict(), "extra": extra}))
    calibrate(model, holdout, config.calibration.target_fpr, progress=progress)
    calibration = model.calibration.summary()
    if len(holdout) < 10:
        log(f"fit: calibration rests on {len(holdout)} held-out images, so its thresholds are wide; "
            f"raise --holdout for tighter ones")
    if not ranks.main:
        return Run(run, model, history, holdout)
    extra = {**extra, "training": history.summary(), "calibration": calibration}
    save_checkpoint(run / MODEL_FILE, config, model.trained_state(), extra)
    write_json(run / "train_log.json", {**extra, "losses": history.losses[::10]})
    state_file.unlink(missing_ok=True)
    log(f"fit: done in {history.seconds:.0f}s, model saved to {run / MODEL_FILE}; image threshold "
        f"{calibration['image_threshold']:.4f}, pixel threshold {calibration['pixel_threshold']:.4f} "
        f"at target false-alarm rate {config.calibration.target_fpr}")
    return Run(run, model, history, holdout)


def fit_generator_run(run: Path, source: "DataSource | None" = None, base: HDMConfig | str | Path | None = None,
                      values: dict | None = None, assignments: Iterable[str] = (), overwrite: bool = False,
                      log: Log | None = None, progress: bool = True, device: str = "cpu",
                      where: str = "settings") -> "PixelGenerator":
    """Train the run's pixel generator (DAGM in pixels) on its normal training images (the calibration
    hold-out left out, as for the detector) and save it as generator.pt. Data and settings default to
    those of the model in the run: `base` (a configuration or a TOML file) replaces its settings, then
    `values` and `assignments` apply as in `_config.resolve` (errors name `where`). A fit interrupted
    earlier continues from generator_state.pt."""
    from ._config import resolve
    from ._device import checked_device
    from ._generator import fit_generator
    from ._layouts import DataSource
    from ._store import load_checkpoint, load_generator_state, parse_config, save_generator, save_generator_state, write_json

    device = checked_device(device, "fp32")
    log = log or _silent
    state_file = run / GENERATOR_STATE_FILE
    if (run / GENERATOR_FILE).exists() and not overwrite:
        raise HDMInputError(f"{run}: run folder already holds a generator (use --overwrite to replace it)")
    state = None
    if state_file.exists() and not overwrite:
        if source is not None or base is not None or values or assignments:
            raise HDMInputError(f"{run}: holds an interrupted generator fit: run the command again without data or "
                                f"settings to continue it, or with --overwrite to start again")
        state = load_generator_state(state_file)
        config, source = parse_config(state_file, state["config"]), DataSource.from_dict(state["extra"]["source"])
    else:
        state_file.unlink(missing_ok=True)
        model_config, _, model_extra = load_checkpoint(run / MODEL_FILE) if (run / MODEL_FILE).exists() else (None, {}, {})
        if source is None:
            if "source" not in model_extra:
                raise HDMInputError(f"{run}: holds no model to take the data from: give --data/--category or --normal-dir")
            source = DataSource.from_dict(model_extra["source"])
        config = resolve(base if base is not None else model_config, values, assignments, where)
    config.validate()
    train, holdout, extra = split_data(config, source)
    if state is not None:
        check_same_data(state, train, holdout, source)
    run.mkdir(parents=True, exist_ok=True)

    def keep(training: dict) -> None:
        save_generator_state(state_file, {**training, "config": config.to_dict(), "extra": extra})

    model, history = fit_generator(config, train, progress=progress, log=log, checkpoint=keep, resume_from=state,
                                   device=device)
    extra = {**extra, "training": history.summary()}
    save_generator(run / GENERATOR_FILE, config, model.state_dict(), extra)
    write_json(run / "generator_log.json", {**extra, "losses": history.losses[::10]})
    state_file.unlink(missing_ok=True)
    log(f"fit-generator: done in {history.seconds:.0f}s, generator saved to {run / GENERATOR_FILE}")
    return model


def test_run(run: Path, source: "DataSource | None" = None, progress: bool = True,
             report: bool = True, device: str = "cpu", precision: str = "fp32") -> "Evaluation":
    """Evaluate the run on labelled test data (by default its own) at its calibrated thresholds, on
    `device` in `precision`; writes metrics.json and, with `report`, report.html into the run."""
    from ._device import place
    from ._inference import evaluate
    from ._layouts import DataSource
    from ._report import write_report
    from ._store import load_model, write_json

    model, extra = load_model(run / MODEL_FILE)
    place(model, device, precision)
    if source is None:
        if "source" not in extra:
            raise HDMInputError(f"{run}: the run does not say what it was trained on: give --data/--category")
        source = DataSource.from_dict(extra["source"])
    started = time.perf_counter()
    calibration = model.calibration
    thresholds = (float(calibration.image_threshold), float(calibration.pixel_threshold))
    evaluation = evaluate(model, source.test_samples(), progress=progress, thresholds=thresholds)
    result = {**evaluation.metrics, "test_images": len(evaluation.predictions), "source": source.to_dict(),
              "calibration": calibration.summary(), "seconds": time.perf_counter() - started}
    write_json(run / "metrics.json", result)
    if report:
        write_report(run / "report.html", evaluation, thresholds, title=f"hdm test: {source.describe()}",
                     image_size=model.image_size, generated=report_samples(run, device))
    return evaluation


REPORT_SAMPLES = 6


def report_samples(run: Path, device: str) -> list | None:
    """A few defects from the run's generator, if it has one, made from its held-out normal images
    (seed 0, so the report is the same each time); None without a generator."""
    from ._data import load_images_resized
    from ._device import place
    from ._generator import make_defects
    from ._store import load_generator

    if not (run / GENERATOR_FILE).exists():
        return None
    model, extra = load_generator(run / GENERATOR_FILE)
    place(model, device)
    paths = [Path(p) for p in extra["holdout"][:REPORT_SAMPLES]]
    images = load_images_resized(paths, model.image_size)
    return make_defects(model, images, REPORT_SAMPLES, seed=0, progress=False)[0]
