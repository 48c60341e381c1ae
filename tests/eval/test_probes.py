"""The probes of `fastmim bench convergence`, each on a synthetic set whose answer is known."""

import math

import torch

from fastmim.eval.backbone import load_backbone
from fastmim.eval.convergence import FinetuneBudget
from fastmim.eval.probes import (
    PAD,
    GreyImages,
    ProbeSets,
    extract,
    finetune_top1,
    knn_top1,
    linear_top1,
    pad_crop_flip,
    to_model_input,
)

CPU = torch.device("cpu")


def clusters(per_class, classes=10, dim=32, noise=0.05, seed=0):
    """Points around ``classes`` orthogonal directions; labels = the direction."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(per_class)
    x = torch.eye(dim)[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_is_perfect_on_separated_clusters_and_scores_wrong_labels_as_wrong():
    train, test = clusters(30), clusters(5, seed=1)
    assert knn_top1(*train, *test) == 100.0
    flipped = test[1].clone()
    flipped[::2] = (flipped[::2] + 1) % 10  # every other test label wrong: exactly half right
    assert knn_top1(*train, test[0], flipped) == 50.0


def test_knn_vote_is_similarity_weighted_not_a_majority():
    # One neighbour of class 0 at similarity 0.9 outweighs two of class 1 at 0.5: exp(0.9/0.07) > 2 exp(0.5/0.07).
    bank = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.5, math.sqrt(0.75)], [0.5, -math.sqrt(0.75)]])
    labels = torch.tensor([0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_top1(bank, labels, query, truth, k=3) == 100.0
    assert knn_top1(bank * 7.0, labels, query * 0.1, truth, k=3) == 100.0  # cosine: scale-free


def test_linear_probe_separates_clusters_and_is_at_chance_on_random_labels():
    train, test = clusters(40, noise=0.1), clusters(10, noise=0.1, seed=1)
    args = (10, CPU, ["--linprobe.epochs=20", "--linprobe.batch_size=64"])
    assert linear_top1(train, test, *args) >= 98.0
    shuffled = train[1][torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(0))]
    assert linear_top1((train[0], shuffled), test, *args) <= 30.0  # chance is 10 %


def test_pad_crop_flip_is_a_shifted_or_mirrored_crop_of_the_padded_image():
    image = torch.arange(28 * 28, dtype=torch.float32).view(28, 28)
    padded = torch.nn.functional.pad(image[None, None], (PAD,) * 4, mode="reflect")[0, 0]
    seen_flip = set()
    for seed in range(20):
        out = pad_crop_flip(image, torch.Generator().manual_seed(seed))
        crops = [padded[dy : dy + 28, dx : dx + 28] for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
        flipped = any(torch.equal(out.flip(-1), c) for c in crops)
        assert flipped or any(torch.equal(out, c) for c in crops)
        seen_flip.add(flipped)
    assert seen_flip == {True, False}


def test_model_input_and_pixel_features():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[1] = 255
    x = to_model_input(images, 32)
    assert x.shape == (2, 3, 32, 32)
    white = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[1, :, 5, 5], white, atol=1e-5)
    feats, labels = extract(None, GreyImages(images, torch.tensor([3, 4]), 32), CPU)
    assert feats.shape == (2, 3 * 28 * 28) and labels.tolist() == [3, 4]


def halves(n, seed):
    """28 px grey images: class 0 bright in the top half, class 1 in the bottom half (flip-invariant), + noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 28, 28), generator=g)
    x[y == 0, :14] += 180
    x[y == 1, 14:] += 180
    return x.to(torch.uint8), y


def test_finetune_learns_a_task_a_random_encoder_cannot_guess():
    train, test = halves(64, 0), halves(32, 1)
    sets = ProbeSets(GreyImages(*test, 32), GreyImages(*test, 32), GreyImages(*train, 32, augment=True), 2, "")
    backbone = load_backbone("", "localmim_vit_tiny_patch16", 32, 0)
    budget = FinetuneBudget(steps=60, batch_size=16, lr=1e-3, warmup=6, layer_decay=1.0)
    assert finetune_top1(backbone, 32, sets, budget, CPU) >= 90.0
    assert (
        finetune_top1(
            backbone, 32, sets, FinetuneBudget(steps=1, batch_size=16, lr=0.0, warmup=0, layer_decay=1.0), CPU
        )
        <= 75.0
    )
