"""ONNX export of the whole inference path, and an onnxruntime detector with the `HDM` contract.

The graph takes B x S x S x 3 uint8 images (what any decoder gives) and does everything else
inside: scaling and ImageNet normalisation, the frozen encoder, DDM denoising with the stored
noise draw, the head, upsampling, smoothing, the top-k image score and the calibration (probability
and decision). The pixel threshold for binary masks, which are made at each image's own size
outside the graph, travels in the model's metadata.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._data import HDMInputError
from ._model import HDM
from ._store import write_bytes_atomic

OPSET = 17


class ExportGraph(nn.Module):
    def __init__(self, model: HDM):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.detect(images.permute(0, 3, 1, 2).float() / 255.0)


OUTPUTS = ["map", "score", "probability", "decision"]


def export_onnx(model: HDM, path: Path) -> None:
    import onnx

    size = model.image_size
    pixel_threshold = model.pixel_threshold  # refuses an uncalibrated model before any work
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about shapes it freezes (by design here).
        warnings.simplefilter("ignore")
        # The wrapper must be in eval mode itself: the exporter restores its mode recursively afterwards.
        torch.onnx.export(ExportGraph(model).eval(), (example,), buffer, input_names=["images"],
                          output_names=OUTPUTS, dynamic_axes={name: {0: "batch"} for name in ["images", *OUTPUTS]},
                          opset_version=OPSET, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {"hdm.pixel_threshold": repr(pixel_threshold),
                                        **{f"hdm.{k}": repr(v) for k, v in model.calibration.summary().items()}})
    write_bytes_atomic(path, graph.SerializeToString())


class OnnxDetector:
    """Runs an exported graph with onnxruntime; called like `HDM` (float images in [0, 1])."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise HDMInputError(f"{path}: not a loadable ONNX model ({exc.__class__.__name__})") from None
        shape = self.session.get_inputs()[0].shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise HDMInputError(f"{path}: not an hdm export (input shape {shape})")
        self.image_size = int(shape[1])
        metadata = self.session.get_modelmeta().custom_metadata_map
        if [o.name for o in self.session.get_outputs()] != OUTPUTS or "hdm.pixel_threshold" not in metadata:
            raise HDMInputError(f"{path}: not an hdm export with calibration (re-export it with this hdm)")
        self.pixel_threshold = float(metadata["hdm.pixel_threshold"])

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The inputs came from uint8 pixels, so this round trip is exact.
        pixels = (images.permute(0, 2, 3, 1) * 255.0).round().to(torch.uint8).numpy()
        return tuple(torch.from_numpy(o) for o in self.session.run(None, {"images": np.ascontiguousarray(pixels)}))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detect(images)[:2]
