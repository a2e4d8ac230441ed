"""Evaluation on frozen backbone features: weighted k-NN (InstDisc/DINO style), the offline linear
probe, and the online linear classifier trained beside SSL (an add-on).

Every result is stored under an explicit protocol name such as ``knn:cosine:k=200:T=0.1``,
``linear:sgd:100ep`` or ``online_linear``, so numbers from different protocols are never compared
by accident.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core import distributed
from harness.core.addons import AddonOut
from harness.core.optim import SGD, Adam
from harness.core.progress import Progress
from harness.core.rng import isolated_rng


def knn_protocol(k: int, temperature: float) -> str:
    return f"knn:cosine:k={k}:T={temperature:g}"


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                     batch_size: int = 512, device: torch.device | None = None, normalize: bool = True) -> torch.Tensor:
    """L2-normalised (or, with `normalize=False`, raw) backbone features of uint8 `images`, in eval mode.

    Under DDP each rank computes a slice and the slices are gathered, so every rank ends with all
    features at 1/N of the cost.
    """
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = -(-len(images) // world)
    mine = images[rank * per_rank:(rank + 1) * per_rank]
    feats = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for start in range(0, len(mine), batch_size):
        x = prepare(mine[start:start + batch_size].to(device, non_blocking=True))
        with autocast:
            f = backbone(x)
        feats.append(F.normalize(f.float(), dim=1) if normalize else f.float())
    dim = backbone.feat_dim
    out = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    if world > 1:
        padded = torch.zeros(per_rank, dim, device=device)
        padded[: len(out)] = out
        out = distributed.gather(padded, grad=False)[: len(images)]
    backbone.train(was_training)
    return out


@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, settings: Sequence[tuple[int, float]], num_classes: int,
                 chunk: int = 1024) -> dict[str, tuple[float, float]]:
    """Weighted k-NN accuracy for several (k, T): {protocol: (top1 %, top5 %)}.

    Neighbours are the top-k train features by cosine similarity; each votes for its class with
    weight exp(sim / T). One top-k search at the largest k serves all settings.

    Top-5 ranks at most min(5, k) classes, and a class no neighbour voted for is never a hit: k
    neighbours can name at most k classes, so at k = 1 top-5 equals top-1. This is solo-learn's
    cap (its `WeightedKNNClassifier` also looks at min(5, k) classes), made strict: when fewer than
    min(5, k) classes got votes, solo-learn's sort fills the rest with arbitrary zero-vote classes,
    which can count; here they cannot.
    """
    train_labels = train_labels.to(train_feats.device)
    test_labels = test_labels.to(train_feats.device)
    kmax = min(max(k for k, _ in settings), len(train_feats))
    hits = {(k, t): torch.zeros(2, device=train_feats.device) for k, t in settings}
    for start in range(0, len(test_feats), chunk):
        sims, idx = (test_feats[start:start + chunk] @ train_feats.T).topk(kmax, dim=1)
        neighbour_labels = train_labels[idx]
        truth = test_labels[start:start + chunk].view(-1, 1)
        for k, t in settings:
            k_eff = min(k, kmax)
            votes = torch.zeros(len(sims), num_classes, device=sims.device)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], torch.exp(sims[:, :k_eff] / t))
            voted = torch.zeros(len(sims), num_classes, dtype=torch.bool, device=sims.device)
            voted.scatter_(1, neighbour_labels[:, :k_eff], True)
            # Classes without a vote rank last, even if a voted class's weight underflowed to 0.
            ranked = votes.masked_fill(~voted, float("-inf")).topk(min(5, k_eff, num_classes), dim=1).indices
            truth_voted = voted.gather(1, truth.long())
            hits[(k, t)][0] += (ranked[:, :1] == truth).any(dim=1).sum()
            hits[(k, t)][1] += ((ranked == truth).any(dim=1, keepdim=True) & truth_voted).sum()
    n = max(len(test_feats), 1)
    return {knn_protocol(k, t): (100 * h[0].item() / n, 100 * h[1].item() / n) for (k, t), h in hits.items()}


def knn_evaluate(backbone: nn.Module, bank_x: torch.Tensor, bank_y: torch.Tensor,
                 queries: dict[str, tuple[torch.Tensor, torch.Tensor]], prepare: Callable,
                 settings: Sequence[tuple[int, float]], num_classes: int,
                 batch_size: int = 512) -> dict[str, dict[str, tuple[float, float]]]:
    """k-NN for every setting and every query split: {split: {protocol: (top1, top5)}}.

    The bank's features are extracted once and serve all splits.
    """
    bank = extract_features(backbone, bank_x, prepare, batch_size)
    return {
        split: knn_classify(bank, bank_y, extract_features(backbone, x, prepare, batch_size), y, settings, num_classes)
        for split, (x, y) in queries.items()
    }


# ------------------------------------------------------------------------------- linear probes
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1 %, top-5 %) of `logits` against `labels` (top-5 is top-C when there are fewer classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels.view(-1, 1)
    n = max(len(labels), 1)
    return 100 * hits[:, 0].sum().item() / n, 100 * hits.any(dim=1).sum().item() / n


# The default offline protocol: methods.md §1.3, solo-learn's offline linear settings (SGD momentum
# 0.9, lr 1.0 × batch/256, no weight decay, batch 256, 100 epochs, lr × 0.1 at 60% and 80%) with the
# CIFAR train augmentation of SCE's linear eval (RandomCrop 32 pad 4 + flip). A setting that differs
# from these is written into the protocol name, so probes run differently are never mixed.
LINEAR_DEFAULTS = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 256,
                   "schedule": "step", "milestones": [0.6, 0.8], "gamma": 0.1, "augment": "crop_flip",
                   "copies": 10}
LINEAR_AUGMENTS = {"none": (0, 0.0), "flip": (0, 0.5), "crop_flip": (4, 0.5),  # (padding, flip probability)
                   "rrc_flip": (0, 0.5)}  # ImageNet's: RandomResizedCrop(0.08-1) + flip of the whole image


def linear_protocol(lc) -> str:
    """`linear:sgd:100ep`, plus `:key=value` for every setting that is not the default protocol's."""
    extras = []
    for key, default in LINEAR_DEFAULTS.items():
        value = lc.get(key, default)
        value = list(value) if key == "milestones" else value
        if key != "optimizer" and value != default and not (key == "copies" and lc.get("augment") == "none"):
            extras.append(f"{key}={','.join(f'{v:g}' for v in value) if key == 'milestones' else value}")
    return ":".join([f"linear:{lc.get('optimizer', 'sgd')}:{int(lc.epochs)}ep", *extras])


def linear_lr_factor(lc, epoch: int) -> float:
    """The probe's lr multiplier in `epoch` (0-based): step decay at fractions of the epochs, or cosine."""
    epochs = int(lc.epochs)
    if lc.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if lc.schedule == "step":
        return float(lc.gamma) ** sum(epoch >= round(float(m) * epochs) for m in lc.milestones)
    return 1.0


def linear_probe(backbone: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor,
                 queries: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 normalize: Callable[[torch.Tensor], torch.Tensor], lc, num_classes: int, seed: int = 0,
                 verbose: bool = True) -> dict[str, dict[str, tuple[float, float]]]:
    """Offline linear probe on frozen features: {split: {linear_protocol(lc): (top1 %, top5 %)}}.

    Fast because the backbone runs once: features of `lc.copies` augmented copies of the training
    set (one plain copy when `lc.augment` is none) and of each query split are extracted up front
    (sharded over ranks, gathered) and kept in memory; each epoch every image uses one of its copies
    at random. Every rank then trains the same probe from the same seed, so all ranks agree.
    `normalize` maps float images in [0, 1] to the backbone's input normalisation.
    """
    from harness.core.data.augment import pad_crop_flip

    device = next(backbone.parameters()).device
    padding, flip = LINEAR_AUGMENTS[lc.augment]
    copies = 1 if lc.augment == "none" else int(lc.copies)
    generator = torch.Generator(device=device).manual_seed(seed * 7907 + distributed.rank())
    if lc.augment == "none":
        train = [extract_features(backbone, train_x, lambda x: normalize(x.float().div(255)), normalize=False)]
    elif lc.augment == "rrc_flip":  # ImageNet's train transform; the queries are centre crops (resize 256, crop 224)
        from harness.core.data.augment import Pipeline, augment

        rrc = Pipeline(flip=flip, jitter_p=0.0, grayscale=0.0)
        if hasattr(train_x, "augmented"):  # an encoded split: crops of each whole image
            train = [extract_features(backbone, train_x.augmented(rrc, generator, (seed * 7907 + copy) * 1009
                                                                  + distributed.rank()), normalize,
                                      normalize=False) for copy in range(copies)]
        else:
            train = [extract_features(backbone, train_x, lambda x: normalize(augment(x, rrc, generator)),
                                      normalize=False) for _ in range(copies)]
    else:
        train = [extract_features(backbone, train_x, lambda x: normalize(pad_crop_flip(x, padding, flip, generator)),
                                  normalize=False) for _ in range(copies)]
    train_feats = torch.stack(train)  # copies × N × d
    test_feats = {s: (extract_features(backbone, x, lambda x: normalize(x.float().div(255)), normalize=False),
                      y.to(device)) for s, (x, y) in queries.items()}
    labels = train_y.to(device)

    g = torch.Generator(device=device).manual_seed(seed)
    with isolated_rng(seed):  # a seeded initialisation that leaves the global RNG as it was
        classifier = nn.Linear(train_feats.shape[2], num_classes).to(device)
    batch_size = int(lc.batch_size)
    peak = float(lc.lr) * batch_size / 256  # solo-learn's linear scaling rule
    if lc.optimizer == "sgd":
        optimizer = SGD(classifier.parameters(), lr=peak, momentum=float(lc.momentum),
                        weight_decay=float(lc.weight_decay))
    else:
        optimizer = Adam(classifier.parameters(), lr=peak, weight_decay=float(lc.weight_decay))
    n, epochs = len(labels), int(lc.epochs)
    progress = Progress("[linear]", epochs, scale=n, unit="samples", enabled=verbose and distributed.rank() == 0)
    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = peak * linear_lr_factor(lc, epoch)
        order = torch.randperm(n, generator=g, device=device)
        which = torch.randint(0, copies, (n,), generator=g, device=device)
        for begin in range(0, n, batch_size):
            idx = order[begin:begin + batch_size]
            loss = F.cross_entropy(classifier(train_feats[which[idx], idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress.due(final=epoch == epochs - 1):
            progress.report(epoch + 1, f"epoch {epoch + 1}/{epochs} | loss {loss.item():.4f}")
    protocol = linear_protocol(lc)
    with torch.no_grad():
        return {s: {protocol: topk_accuracy(classifier(f), y)} for s, (f, y) in test_feats.items()}


class OnlineLinear(nn.Module):
    """The online linear classifier of solo-learn, as an add-on (``eval.online_linear=true``).

    Trained during SSL on the detached backbone features the method returns in ``LossParts.feats``
    (all its views, as solo-learn does with its large crops), with its own lr and weight decay
    (`trainer.classifier_lr`, scaled and scheduled like `trainer.lr`, and
    `trainer.classifier_weight_decay`) through an optimizer group of its own. Its loss is added to
    the total but cannot reach the backbone. Evaluated on un-augmented images and stored as protocol
    ``online_linear``, apart from the offline probe.

    Under DDP the add-on is not wrapped by DistributedDataParallel, so each rank computes the
    classifier's loss on the features gathered from all ranks: every rank then takes the same step
    and the copies stay identical, as with one process on the whole batch. For that the copies
    start identical: the classifier is initialised from the run seed (not the per-rank seed), on an
    RNG of its own, so its initialisation neither depends on nor moves the training's RNG.
    """

    protocol = "online_linear"

    def __init__(self, cfg, feat_dim: int):
        super().__init__()
        self.feat_dim = feat_dim
        self.seed = int(cfg.seed)
        self.lr_scale = float(cfg.trainer.classifier_lr) / float(cfg.trainer.lr)
        self.weight_decay = float(cfg.trainer.get("classifier_weight_decay", 0.0))
        self.classifier: nn.Linear | None = None
        self.labels: torch.Tensor | None = None

    def setup(self, data, info) -> None:
        with isolated_rng(self.seed * 7_919 + 17):
            self.classifier = nn.Linear(self.feat_dim, data.num_classes).to(info.device)
        # Add-on batches carry positions in the full training split: labels are looked up by them.
        index = data.train_index if data.train_index is not None else torch.arange(len(data.train_y))
        # Unlabeled pretraining images (STL-10's: datasets.pretraining_view) have label -1 and are ignored.
        self.labels = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        self.labels[index] = data.train_y
        self.labels = self.labels.to(info.device)

    def optim_groups(self) -> list[tuple[nn.Module, dict]]:
        return [(self, {"lr_scale": self.lr_scale, "weight_decay": self.weight_decay})]

    def step(self, batch):
        feats = batch.parts.feats
        if feats is None:
            raise ValueError(f"eval.online_linear=true needs backbone features, but {type(batch.method).__name__} "
                             "returns LossParts.feats=None")
        copies = feats.shape[0] // batch.index.shape[0]
        x = distributed.gather(feats.detach(), grad=False)
        y = distributed.gather(self.labels[batch.index].repeat(copies), grad=False)
        logits = self.classifier(x)
        labelled = y >= 0
        loss = F.cross_entropy(logits.float(), y, ignore_index=-1) if labelled.any() else logits.sum() * 0
        accuracy = (logits.argmax(dim=1) == y)[labelled].float().mean().nan_to_num() * 100
        return AddonOut(loss=loss, logs={"online_linear_loss": loss.detach(), "online_linear_train_acc": accuracy})

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, queries: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 prepare: Callable) -> dict[str, dict[str, tuple[float, float]]]:
        out = {}
        for split, (x, y) in queries.items():
            feats = extract_features(backbone, x, prepare, normalize=False)
            out[split] = {self.protocol: topk_accuracy(self.classifier(feats), y.to(feats.device))}
        return out
