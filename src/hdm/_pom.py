"""POM, the Probability Optimization Module.

Generation side: the hybrid objective L_simple + lambda * L_vlb that learns Sigma_theta on normal
samples, and the quality control of synthetic samples (reject those whose masked change is too
small to be a defect or absurdly large, and adapt tau to keep samples in that band).
Discrimination side: focal + smooth-L1 between the probability map and the mask, an
image-level term that ties the top-k map score to the label, a penalty that keeps DDM's refinement
from lifting cells whose target is normal, and the calibration of scores into probabilities and
thresholds from held-out normal images only.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from ._config import POMConfig
from ._diffusion import GaussianDiffusion
from ._space import upsample


def hybrid_loss(diffusion: GaussianDiffusion, z0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, lambda_vlb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_simple, L_vlb). The VLB sees a stopped-gradient mean, so it trains only the variance."""
    simple = F.mse_loss(eps, noise)
    vlb = diffusion.vlb_terms(z0, zt, t, eps.detach(), v).mean()
    return simple, lambda_vlb * vlb


def masked_change(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared change per channel inside the (soft) mask, per sample; 0 where the mask is empty."""
    per_cell = ((z - z0) ** 2).mean(dim=1, keepdim=True)
    area = mask.flatten(1).sum(1)
    return (per_cell * mask).flatten(1).sum(1) / area.clamp_min(1e-6)


def filter_samples(change: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (keep, too_small, too_large) for synthetic samples by their masked change."""
    too_small = change < low
    too_large = change > high
    return ~(too_small | too_large), too_small, too_large


def adapt_tau(tau: float, too_small: int, too_large: int, count: int, config: POMConfig) -> float:
    """Raise tau when diffusion samples stay too close to normal, lower it when they explode."""
    if count == 0 or not config.adapt_tau:
        return tau
    step = config.tau_rate * (too_small - too_large) / count * (1.0 + tau)
    return float(min(config.tau_max, max(config.tau_min, tau + step)))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float,
               reduce: bool = True) -> torch.Tensor:
    """Binary focal loss on soft targets (mean over cells, or per cell without `reduce`)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    loss = weight * (1 - p_true) ** gamma * bce
    return loss.mean() if reduce else loss


def top_k_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest `fraction` of each sample's values (the max when fraction is 0)."""
    flat = values.flatten(1)
    # int() first: under ONNX tracing shapes are tensors, and the exported k must be a constant.
    k = max(1, int(fraction * int(flat.shape[1]) + 0.5))
    return flat.topk(k, dim=1).values.mean(1)


def cell_targets(coverage: torch.Tensor, full_cell_coverage: float) -> torch.Tensor:
    """Soft mask (covered fraction of each z cell) -> map target: 1 from `full_cell_coverage` up, linear below."""
    return (coverage / full_cell_coverage).clamp(max=1.0)


def map_losses(logits: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, config: POMConfig,
               top_k: float) -> dict[str, torch.Tensor]:
    """Discrimination-side losses on grid logits against the (soft) grid mask and image labels."""
    prob = torch.sigmoid(logits)
    target = cell_targets(mask, config.full_cell_coverage)
    image_logit = top_k_mean(logits, top_k)
    return {
        "focal": focal_loss(logits, target, config.focal_gamma, config.focal_alpha),
        "l1": config.lambda_l1 * F.smooth_l1_loss(prob, target),
        "image": config.lambda_image * F.binary_cross_entropy_with_logits(image_logit, label),
    }


def refinement_losses(up: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor, sample_weight: torch.Tensor,
                      config: POMConfig) -> dict[str, torch.Tensor]:
    """Losses for DDM's stride-4 refinement, given as `Refinement.residual` returns it (refined logits =
    up + residual): focal + smooth-L1 on the refined logits, each sample's mean weighted by `sample_weight`,
    and a squared penalty, on every sample alike, on the residual where it raises a cell whose target is normal."""
    logits = up + residual
    target = cell_targets(mask, config.full_cell_coverage)

    def weighted(loss: torch.Tensor) -> torch.Tensor:
        return (loss.flatten(1).mean(1) * sample_weight).mean()

    return {
        "refine_focal": weighted(focal_loss(logits, target, config.focal_gamma, config.focal_alpha, reduce=False)),
        "refine_l1": config.lambda_l1 * weighted(F.smooth_l1_loss(torch.sigmoid(logits), target, reduction="none")),
        "refine_raise": config.lambda_refine_raise * (residual.clamp(min=0) ** 2 * (1 - target)).mean(),
    }


def coreset(cells: torch.Tensor, size: int, generator: torch.Generator, candidates: int = 65536,
            dims: int = 32) -> torch.Tensor:
    """Indices of `size` rows of `cells` (N x C) that cover them: greedy k-centre selection (as in
    PatchCore) on a random projection, among at most `candidates` rows drawn at random. Rare normal
    patterns keep a bank entry, which a uniform sample of the same size would mostly miss."""
    pool = torch.randperm(len(cells), generator=generator)[:candidates].to(cells.device)
    if len(pool) <= size:
        return pool
    projection = torch.randn(cells.shape[1], dims, generator=generator).to(cells.device) / math.sqrt(dims)
    points = cells[pool] @ projection
    chosen = torch.empty(size, dtype=torch.long, device=cells.device)
    chosen[0] = int(torch.randint(len(points), (1,), generator=generator))
    nearest = ((points - points[chosen[0]]) ** 2).sum(1)
    for i in range(1, size):
        chosen[i] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, ((points - points[chosen[i]]) ** 2).sum(1))
    return pool[chosen]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(k x C centroids, the index of each row's centroid) of N x C points, by scikit-learn's k-means,
    seeded from `generator`."""
    from sklearn.cluster import KMeans

    seed = int(torch.randint(2 ** 31 - 1, (1,), generator=generator))
    with warnings.catch_warnings():
        # A bank drawn with repeats (fewer normal cells than entries) can have fewer distinct points than lists.
        warnings.simplefilter("ignore")
        fitted = KMeans(k, n_init=1, max_iter=20, random_state=seed).fit(points.cpu().numpy())
    return (torch.from_numpy(fitted.cluster_centers_).to(points), torch.from_numpy(fitted.labels_).to(points.device).long())


def normal_scale(values: torch.Tensor) -> tuple[float, float]:
    """A voice on held-out normal images (B x 1 x h x w) -> (its median, the mean of its per-image
    maxima, kept above the median): the two points that `NormalDensity.fuse` measures it between."""
    loc = float(values.median())
    return loc, max(float(values.flatten(1).amax(1).mean()), loc + 1e-3)


def prior_voice(distance: torch.Tensor, size: int) -> torch.Tensor:
    """`NormalDensity.distance` (B x 1 x h x w) -> the prior's voice on a size x size grid: its log, upsampled."""
    return upsample(distance.clamp_min(1e-6).log(), size)


class NormalDensity(nn.Module):
    """POM's prior on the discrimination side: how unlike every normal cell a z cell is.

    The distance to the nearest cell of a bank of normal z cells. It flags what DDM's head was never
    shown (tumours in brain MRI, uneven magnetic tiles); the head flags what DAGM showed it, sharper.
    `fuse` lets the more unusual of the two voices speak, each measured on held-out normal images
    (`fit_null`).

    The bank holds cells of z's own grid; with `pool` > 1 the prior's voice (`forward`) is asked about
    `pool` x `pool` means of z's cells (a quarter of the search at 2), still against unpooled bank
    cells: a bank of pooled cells lost more.

    With `neighbours` > 0 the voice measures distances in units of a bank cell's radius (its mean
    distance to its `neighbours` nearest bank cells) to the power `power`, and takes the least over
    the bank: where normal z is loose (brain anatomy from patient to patient, the grain of a tile) a
    raw distance flags normal cells, where it is tight it misses faint defects. As a local outlier
    factor does, the radius puts both on one scale (README, Results: the radius against the previous
    full bench). The least over the bank, rather than the nearest cell's distance in its radius, is
    continuous in the cell: every search order (the exported graph's too) gives it up to float
    rounding. `distance` stays raw unless asked.

    With `lists` > 0 the bank is stored as an inverted file: split by k-means into lists, and a cell
    is compared with the cells of its `probe` nearest lists only (as in FAISS's IVF index). The nearest
    bank cell is then sometimes missed and a near one's distance taken instead: on 20,000-cell banks of
    the four categories, 128 lists probed 4 at a time found the nearest for 90-99% of test cells in a
    thirteenth to a sixteenth of the whole search's time, the prior alone within 0.004 of it in every
    metric (bench/results/bank-lists.md). The exported graph, and any traced one, searches the whole bank.

    Otherwise, given the space's `lift` (its last `lifted` channels of z are, per channel,
    lift @ c @ lift.T of a coarser map c), the unpooled search is exact at less cost: those channels'
    dot products with the bank are taken on c's grid and lifted, which holds for every z the space
    encodes.
    """

    def __init__(self, channels: int, size: int, pool: int = 1, chunks: int = 8,
                 lift: torch.Tensor | None = None, lifted: int = 0, lists: int = 0, probe: int = 1,
                 neighbours: int = 0, power: float = 1.0):
        super().__init__()
        self.pool = pool
        self.neighbours = min(neighbours, size - 1)
        self.power = power
        lists = min(lists, size)
        # Lists searched per query; 0 searches the whole bank (settable on a loaded model).
        self.probe = min(probe, lists)
        self.chunks = chunks  # a constant count, so an exported graph stays valid for any batch size
        # Pooled queries lie on a grid no finer than the coarse one: the lift would save nothing there.
        if pool > 1:
            lift = None
        self.lifted = lifted if lift is not None else 0
        self.register_buffer("bank", torch.zeros(size, channels))
        self.register_buffer("bank_sq", torch.zeros(size))
        if self.neighbours:
            # Each bank cell's mean distance to its `neighbours` nearest other distinct bank cells.
            self.register_buffer("radius", torch.ones(size))
        if lists:
            # The bank is kept sorted by list; list k holds rows list_ends[k - 1]:list_ends[k].
            self.register_buffer("centroids", torch.zeros(lists, channels))
            self.register_buffer("list_ends", torch.zeros(lists, dtype=torch.long))
        # Each voice's median on held-out normal cells and the mean of its per-image maxima there.
        for name in ("prior_loc", "head_loc"):
            self.register_buffer(name, torch.tensor(0.0))
        for name in ("prior_top", "head_top"):
            self.register_buffer(name, torch.tensor(1.0))
        if lift is not None:
            # Made from the space's configuration, so not stored: the lift, and the way back from z to the coarse map.
            self.register_buffer("lift", lift.contiguous(), persistent=False)
            self.register_buffer("unlift", torch.linalg.pinv(lift.double()).float(), persistent=False)

    @torch.no_grad()
    def fit(self, z: torch.Tensor, generator: torch.Generator) -> None:
        """Draw the bank from the cells of normal z (B x C x g x g): a coreset, with repeats only
        when there are fewer cells than bank entries."""
        cells = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        size = self.bank.shape[0]
        pick = (coreset(cells, size, generator) if len(cells) >= size
                else torch.randint(len(cells), (size,), generator=generator))
        bank = cells[pick]
        if hasattr(self, "centroids"):
            centroids, assigned = kmeans(bank, len(self.centroids), generator)
            order = assigned.argsort()
            bank = bank[order]
            self.centroids.copy_(centroids)
            self.list_ends.copy_(torch.bincount(assigned, minlength=len(centroids)).cumsum(0))
        self.bank.copy_(bank)
        self.bank_sq.copy_((self.bank ** 2).sum(1))
        if self.neighbours:
            self.radius.copy_(self._bank_radius())

    def _bank_radius(self, rows: int = 256) -> torch.Tensor:
        """Each bank cell's mean distance to its `neighbours` nearest other distinct bank cells: a bank
        drawn with repeats (fewer normal cells than entries) would otherwise give a repeated cell a
        radius of 0. `rows` bank cells at a time: 2,048 (a 160 MB distance block at the default bank)
        set a fit's peak memory, and fewer take no longer."""
        distinct, which = torch.unique(self.bank, dim=0, return_inverse=True)
        k = min(self.neighbours, len(distinct) - 1)
        if k == 0:
            return torch.ones_like(self.bank_sq)
        squared_norms = (distinct ** 2).sum(1)
        parts = []
        for part, part_sq in zip(distinct.split(rows), squared_norms.split(rows)):
            squared = torch.addmm(squared_norms, part, distinct.T, alpha=-2).add_(part_sq[:, None]).clamp_min_(0)
            # the nearest of its k + 1 is the cell itself
            parts.append(squared.topk(k + 1, largest=False).values[:, 1:].sqrt().mean(1))
        return torch.cat(parts).clamp_min(1e-6)[which]

    @torch.no_grad()
    def fit_null(self, head_logits: torch.Tensor, prior: torch.Tensor) -> None:
        """Both voices on held-out normal images (B x 1 x h x w each, on the map's grid): images the
        head was not trained on and the bank was not drawn from, as a new part will be."""
        for name, values in (("head", head_logits), ("prior", prior)):
            loc, top = normal_scale(values)
            getattr(self, f"{name}_loc").fill_(loc)
            getattr(self, f"{name}_top").fill_(top)

    def distance(self, z: torch.Tensor, scaled: bool = False) -> torch.Tensor:
        """B x C x g x g -> B x 1 x g/pool x g/pool Euclidean distance of pool x pool means of z cells
        to the nearest bank cell; `scaled` (with `neighbours`): the least, over bank cells, of the
        distance in units of that cell's radius to the power `power`."""
        weight = self.radius ** (-2 * self.power) if scaled and self.neighbours else None
        pooled = F.avg_pool2d(z, self.pool) if self.pool > 1 else z
        b, c, h, w = pooled.shape
        queries = pooled.permute(0, 2, 3, 1).reshape(b, h * w, c)
        queries_sq = (queries ** 2).sum(2)
        # A bank not fitted yet has no lists: it is searched whole, as a traced graph searches any bank.
        if self.probe and not torch.jit.is_tracing() and self.list_ends[-1] > 0:
            best = self._probed_nearest_sq(queries.reshape(-1, c), queries_sq.flatten(), weight).view(b, h * w)
        else:
            best = self._whole_nearest_sq(z, queries, queries_sq, weight)
        if weight is None:
            # |q|^2 is added after the minimum: it does not change which bank cell is nearest.
            best = best + queries_sq
        return best.clamp_min(0).sqrt().view(b, 1, h, w)

    def _whole_nearest_sq(self, z: torch.Tensor, queries: torch.Tensor, queries_sq: torch.Tensor,
                          weight: torch.Tensor | None) -> torch.Tensor:
        """`_nearest_sq` over the whole bank for z's B x Q x C queries, through the lift where z has one."""
        b, _, c = queries.shape
        direct, coarse = queries[..., :c - self.lifted], None
        if self.lifted:
            coarse = self.unlift @ z[:, c - self.lifted:] @ self.unlift.T
            coarse = coarse.permute(0, 2, 3, 1).reshape(b, -1, self.lifted)
        # One image at a time, so each block of distances stays in cache; one batched pass when traced
        # for export, where a loop over the batch would freeze the batch size into the graph.
        if torch.jit.is_tracing():
            return self._nearest_sq(direct, coarse, queries_sq, weight)
        return torch.cat([self._nearest_sq(d, None if coarse is None else coarse[i:i + 1], queries_sq[i:i + 1], weight)
                          for i, d in enumerate(direct.split(1))])

    def _nearest_sq(self, direct: torch.Tensor, coarse: torch.Tensor | None, queries_sq: torch.Tensor,
                    weight: torch.Tensor | None) -> torch.Tensor:
        """min over the bank of |bank|^2 - 2 q.bank for n x Q queries, or with a weight per bank cell
        of weight (|q|^2 + |bank|^2 - 2 q.bank), given by their first channels (`direct`) and, with a
        lift, the coarse cells that make their other channels; in bank chunks with a running minimum."""
        n, count, split = direct.shape
        best = None
        scales = [None] * self.chunks if weight is None else weight.chunk(self.chunks)
        for bank, bank_sq, scale in zip(self.bank.chunk(self.chunks), self.bank_sq.chunk(self.chunks), scales):
            d = torch.addmm(bank_sq, direct.reshape(-1, split), bank[:, :split].T, alpha=-2)
            if coarse is not None:
                d = self._add_lifted(d, coarse, bank[:, split:])
            d = d.view(n, count, -1)
            if scale is not None:
                d = (d + queries_sq.view(n, count, 1)) * scale
            d = d.amin(2)
            best = d if best is None else torch.minimum(best, d)
        return best

    def _probed_nearest_sq(self, queries: torch.Tensor, queries_sq: torch.Tensor,
                           weight: torch.Tensor | None) -> torch.Tensor:
        """`_nearest_sq` over the bank cells in each query's `probe` nearest lists, for Q x C queries:
        the (query, list) pairs are sorted by list, so each list is one matrix product with the
        queries that probe it."""
        centroids = self.centroids
        near = torch.addmm((centroids ** 2).sum(1), queries, centroids.T, alpha=-2)
        lists = near.topk(self.probe, largest=False, sorted=False).indices.flatten()
        order = lists.argsort()
        asking = order // self.probe  # the query of each (query, list) pair, in list order
        found = torch.full((len(order),), torch.inf, device=queries.device)
        counts = torch.bincount(lists, minlength=len(centroids)).tolist()
        ends = self.list_ends.tolist()
        start, pair = 0, 0
        for end, count in zip(ends, counts):
            rows = slice(pair, pair + count)
            # k-means leaves a list empty when the bank has fewer distinct cells than lists (repeats).
            if count and end > start:
                d = torch.addmm(self.bank_sq[start:end], queries[asking[rows]], self.bank[start:end].T, alpha=-2)
                if weight is not None:
                    d = d.add_(queries_sq[asking[rows], None]).mul_(weight[start:end])
                found[rows] = d.amin(1)
            pair += count
            start = end
        # Back to (query, probed list) order, then the best of each query's lists.
        return torch.empty_like(found).index_copy_(0, order, found).view(-1, self.probe).amin(1)

    def _add_lifted(self, d: torch.Tensor, coarse: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """d - 2 (the lifted channels' dot products): taken on the coarse grid, then lifted along each axis."""
        lift = self.lift
        grid, side, k = lift.shape[0], lift.shape[1], bank.shape[0]
        products = torch.matmul(coarse, bank.T).view(-1, side, side * k)
        rows = torch.matmul(lift, products).view(-1, side, k)  # (image, query row) x coarse column x bank
        return torch.baddbmm(d.view(-1, grid, k), lift.expand(rows.shape[0], -1, -1), rows, alpha=-2)

    def forward(self, z: torch.Tensor, size: int) -> torch.Tensor:
        """The prior's voice on a size x size grid: the log of pooled z cells' `distance` to the bank,
        scaled by the bank cells' radii where it has `neighbours`."""
        return prior_voice(self.distance(z, scaled=True), size)

    def fuse(self, head_logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The head's logits, or the prior's voice where it is the more unusual one, in head units.

        Each voice is measured from its normal median in units of (mean per-image maximum - median)
        on held-out normal images: at 1, a cell is as unusual as the most unusual cell of a typical
        normal image. A voice that is loud on normal parts (the head on brain anatomy it never saw
        defects in) is thereby turned down, and one that is quiet turned up. Measured against the
        alternatives on held-out maps of three categories (scratch measurements in the notes on issue 16;
        `bench/voices.py` measures the mean rule beside this one): a noisy-OR of the prior's
        tail probability spilled the prior's false alarms over the head's sharp map (metal plate, magnetic
        tile); units of each voice's standard deviation let the head's hot spots on normal brain
        anatomy drown the tumours.
        """
        unusual = (prior - self.prior_loc) / (self.prior_top - self.prior_loc)
        return torch.maximum(head_logits, self.head_loc + (self.head_top - self.head_loc) * unusual)


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def fit_normal_tail(values: np.ndarray, target_fpr: float) -> tuple[float, float, float]:
    """(loc, scale, threshold) for scores of normal parts, from n >= 2 held-out values.

    Scores live in (0, 1); their logits are modelled as Gaussian. The threshold is the upper
    (1 - target_fpr) prediction bound for a *new* normal part, which uses Student's t with n - 1
    degrees of freedom: with few held-out images it is wider, not falsely tight. `scale` is chosen
    so that Phi((logit(threshold) - loc) / scale) = 1 - target_fpr exactly, which lets the graph
    compute probabilities with erf alone.
    """
    x = logit(torch.as_tensor(values, dtype=torch.float64)).numpy()
    n = len(x)
    if n < 2:
        raise ValueError("calibration needs at least 2 held-out normal images")
    loc = float(x.mean())
    spread = max(float(x.std(ddof=1)), 1e-3)
    bound = float(stats.t.ppf(1 - target_fpr, n - 1)) * math.sqrt(1 + 1 / n) * spread
    scale = bound / float(stats.norm.ppf(1 - target_fpr))
    threshold = 1.0 / (1.0 + math.exp(-(loc + bound)))
    return loc, scale, threshold


class Calibration(nn.Module):
    """Raw scores -> anomaly probability, decision and binary mask; fitted on normal parts only.

    The probability is P(a normal part scores below this one) under the fitted normal-score
    distribution, so `probability >= 1 - target_fpr` is the same decision as `score >= threshold`.
    The pixel threshold is fitted on each held-out image's map maximum: a normal part gets a
    non-empty mask with probability target_fpr.
    """

    def __init__(self):
        super().__init__()
        for name, value in (("image_loc", 0.0), ("image_scale", 1.0), ("image_threshold", 1.0),
                            ("pixel_loc", 0.0), ("pixel_scale", 1.0), ("pixel_threshold", 1.0),
                            ("target_fpr", 0.0)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    @property
    def fitted(self) -> bool:
        return bool(self.target_fpr > 0)

    def fit(self, image_scores: np.ndarray, map_maxima: np.ndarray, target_fpr: float) -> None:
        for prefix, values in (("image", image_scores), ("pixel", map_maxima)):
            for name, value in zip(("loc", "scale", "threshold"), fit_normal_tail(values, target_fpr)):
                getattr(self, f"{prefix}_{name}").fill_(value)
        self.target_fpr.fill_(target_fpr)

    def probability(self, scores: torch.Tensor) -> torch.Tensor:
        u = (logit(scores) - self.image_loc) / self.image_scale
        return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))

    def decision(self, scores: torch.Tensor) -> torch.Tensor:
        return scores >= self.image_threshold

    def summary(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.named_buffers()}
