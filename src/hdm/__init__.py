"""hdm: industrial anomaly detection with HDM, the Hybrid Diffusion Model.

The public API is what `__all__` names. Every module is private by name (`hdm._dagm`, `hdm._ddm`,
...): the implementation behind the API and the `hdm` command, free to change between versions.
Importing hdm is cheap: torch loads on first use of a name.

    import hdm
    run = hdm.fit("datasets/mvtec_ad", "bottle", out="runs/bottle")
    detector = hdm.load("runs/bottle")          # or an exported model.onnx
    verdicts = detector.predict(["part.png"])   # [ImagePrediction(score, probability, is_defect, map, mask)]
    hdm.fit_generator("runs/bottle")            # DAGM in pixels, on the run's data
    defects = hdm.generate("runs/bottle", 50, out="defects/bottle")  # [Defect(image, mask, ...)], and the set on disk
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

__all__ = ["fit", "resume", "test", "load", "fit_generator", "generate", "Detector", "ImagePrediction",
           "BatchPrediction", "Metrics", "Run", "Defect", "HDMConfig", "HDMInputError", "keep_freed_memory"]

_HOMES = {"Run": "_runs", "Defect": "_generator", "HDMConfig": "_config", "HDMInputError": "_data",
          "keep_freed_memory": "_runtime"}

try:
    __version__ = version("hdm")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(f".{_HOMES.get(name, '_api')}", __name__), name)
    raise AttributeError(f"module 'hdm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
