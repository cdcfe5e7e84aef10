"""hdm: industrial anomaly detection with HDM, the Hybrid Diffusion Model.

The public API is what `__all__` names; every other module is the implementation behind it and the
`hdm` command. Importing hdm is cheap: torch loads on first use of a name.

    import hdm
    run = hdm.fit("datasets/mvtec_ad", "bottle", out="runs/bottle")
    detector = hdm.load("runs/bottle")          # or an exported model.onnx
    verdicts = detector.predict(["part.png"])   # [ImagePrediction(score, probability, is_defect, map, mask)]
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

__all__ = ["fit", "resume", "test", "load", "Detector", "ImagePrediction", "BatchPrediction", "Metrics", "Run",
           "HDMConfig", "HDMInputError"]

_HOMES = {"Run": "runs", "HDMConfig": "config", "HDMInputError": "data"}

try:
    __version__ = version("hdm")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name in __all__:
        return getattr(import_module(f".{_HOMES.get(name, 'api')}", __name__), name)
    raise AttributeError(f"module 'hdm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
