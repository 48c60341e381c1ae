"""The probes of ``fastmim bench convergence`` (:mod:`fastmim.eval.convergence`) and the labelled sets they read.

Sets: :class:`GreyImages` holds small grey images in memory (Fashion-MNIST: uint8 ``[N, 28, 28]``) and returns
``([3, S, S] float, label)``: the whole image resized (bicubic, no crop: the objects fill the frame), clamped to
[0, 1] and ImageNet-normalised as in pre-training; with ``augment``, a random crop after 4 px reflect padding and a
horizontal flip first (at 28 px). An ImageNet-style folder uses :mod:`fastmim.eval.data`'s transforms instead.

Probes, each returning top-1 in percent:

- :func:`knn_top1`: cosine k-NN (k = 20) on frozen features (:func:`extract`: mean of the last block's patch
  tokens, as ``fastmim linprobe``), each neighbour voting ``exp(similarity / 0.07)`` for its class (the weighted
  vote of Wu et al. 2018, used by DINO).
- :func:`linear_top1`: ``fastmim linprobe``'s probe (BatchNorm without affine + Linear, SGD, warm-up + cosine) on
  the cached features, top-1 after its last epoch.
- :func:`finetune_top1`: the whole ViT with a fresh head, trained for a fixed number of AdamW steps (layer decay,
  warm-up + cosine, label smoothing), with the set's own light augmentation only: the ImageNet defaults (mixup,
  CutMix, RandAugment) do not suit a budget of a few hundred steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from fastmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastmim.eval.backbone import Backbone, build_vit
from fastmim.eval.common import topk_correct
from fastmim.eval.config import load_eval_config
from fastmim.eval.convergence import FinetuneBudget
from fastmim.eval.finetune import layer_decay_groups
from fastmim.eval.linprobe import train_probe
from fastmim.train.distributed import NullLog
from fastmim.train.optim import lr_at

KNN_K = 20
KNN_TEMPERATURE = 0.07
PAD = 4  # px of reflect padding before the fine-tuning crop of a GreyImages set


def to_model_input(images: Tensor, size: int) -> Tensor:
    """uint8 or float (0-255) ``[N, h, w]`` grey images -> normalised float ``[N, 3, size, size]``."""
    x = images.float().div(255.0).unsqueeze(1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def pad_crop_flip(image: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[h, w]`` -> ``[h, w]``: a random crop of the image after PAD px of reflect padding, flipped left-right
    with probability 0.5."""
    h, w = image.shape
    padded = F.pad(image.float()[None, None], (PAD, PAD, PAD, PAD), mode="reflect")[0, 0]
    dy, dx = (int(v) for v in torch.randint(0, 2 * PAD + 1, (2,), generator=generator))
    out = padded[dy : dy + h, dx : dx + w]
    return out.flip(-1) if float(torch.rand((), generator=generator)) < 0.5 else out


class GreyImages(Dataset):
    """``(to_model_input(image), label)`` of in-memory uint8 ``[N, h, w]`` images (module doc). Items are the
    small images; :meth:`collate` resizes a whole batch at once (per-image bicubic calls cost ~10x more)."""

    def __init__(self, images: Tensor, labels: Tensor, size: int, augment: bool = False) -> None:
        self.images, self.labels, self.size, self.augment = images, labels, size, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        return (pad_crop_flip(image) if self.augment else image.float()), int(self.labels[index])

    def collate(self, batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*batch)
        return to_model_input(torch.stack(images), self.size), torch.tensor(labels)


def loader(dataset: Dataset, batch_size: int, workers: int, **kw) -> DataLoader:
    """A DataLoader over ``dataset`` (a Subset's too) with its batch-level ``collate`` when it has one."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    collate = getattr(base, "collate", None)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, **kw)


@dataclass
class ProbeSets:
    """What the probes read: ``probe_train`` (k-NN bank and linear-probe training set), ``test`` (scored),
    ``finetune_train`` (augmented), the class count and a one-line description."""

    probe_train: Dataset
    test: Dataset
    finetune_train: Dataset
    num_classes: int
    description: str


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def extract(
    encoder: nn.Module | None, dataset: Dataset, device: torch.device, batch_size: int = 256, workers: int = 0
) -> tuple[Tensor, Tensor]:
    """(features ``[N, D]`` fp32 on CPU, labels ``[N]``): the mean patch token of a frozen timm ViT, or with
    ``encoder=None`` the raw model input average-pooled to at most 28 x 28 per channel (the pixels baseline)."""
    if encoder is not None:
        encoder.eval()
    feats, labels = [], []
    for images, y in loader(dataset, batch_size, workers):
        if encoder is None:
            side = min(28, images.shape[-1])
            feats.append(F.adaptive_avg_pool2d(images, side).flatten(1))
        else:
            with _autocast(device):
                tokens = encoder.forward_features(images.to(device, non_blocking=True))
            feats.append(tokens[:, 1:].float().mean(dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int = KNN_K, chunk: int = 1024
) -> float:
    """Top-1 (%) of the weighted cosine k-NN vote (module doc) of ``test_x`` among ``train_x``."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(test_x), chunk):
        query = F.normalize(test_x[start : start + chunk].float(), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes).scatter_add_(1, train_y[idx], (sim / KNN_TEMPERATURE).exp())
        correct += int((votes.argmax(dim=1) == test_y[start : start + chunk]).sum())
    return 100.0 * correct / len(test_x)


def linear_top1(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    device: torch.device,
    overrides: list[str] | None = None,
) -> float:
    """Top-1 (%) after the last epoch of ``fastmim linprobe``'s probe (the eval_tiny_cpu recipe's linprobe
    section, plus ``overrides`` such as ``--linprobe.epochs=20``) trained on ``train`` features."""
    cfg = load_eval_config("eval_tiny_cpu", list(overrides or []))
    _, rows = train_probe(cfg, train, test, num_classes, NullLog(Path(".")), device)
    return rows[-1]["acc1"]


def finetune_top1(
    backbone: Backbone, size: int, sets: ProbeSets, budget: FinetuneBudget, device: torch.device, workers: int = 0
) -> float:
    """Fine-tune ``backbone`` (every layer, fresh head) on ``sets.finetune_train`` for ``budget``; top-1 (%) on
    ``sets.test``."""
    torch.manual_seed(budget.seed)
    model = build_vit(backbone, sets.num_classes, budget.drop_path, size).to(device)
    groups = layer_decay_groups(model, budget.weight_decay, budget.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], betas=(0.9, 0.999))
    criterion = nn.CrossEntropyLoss(label_smoothing=budget.smoothing)
    generator = torch.Generator().manual_seed(budget.seed)
    batches = loader(sets.finetune_train, budget.batch_size, workers, shuffle=True, drop_last=True, generator=generator)
    model.train()
    step = 0
    while step < budget.steps:
        for images, labels in batches:
            lr = lr_at(step, budget.steps, budget.warmup, budget.lr, 1e-6)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            with _autocast(device):
                loss = criterion(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == budget.steps:
                break
    model.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for images, labels in loader(sets.test, 256, workers):
            with _autocast(device):
                logits = model(images.to(device)).float()
            correct += int(topk_correct(logits, labels.to(device), (1,))[0])
            total += len(labels)
    return 100.0 * correct / total
