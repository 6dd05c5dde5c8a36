import math

import torch

from unet3d_dist.loss import DeepSupervisionLoss, DiceCELoss


def logits_for(labels: torch.Tensor, num_classes: int = 2, confidence: float = 20.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).movedim(-1, 1).float() * confidence


def test_perfect_prediction_gives_near_zero_loss():
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, 2:5, 2:5, 2:5] = 1
    assert DiceCELoss()(logits_for(labels), labels).item() < 1e-6


def test_hand_computed_values():
    # Two voxels, both foreground. Voxel 0: p(fg)=0.5; voxel 1: p(fg)=0.75.
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 1, 2)
    labels = torch.ones(1, 1, 1, 2, dtype=torch.long)
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    dice = 2 * 1.25 / (1.25 + 2)
    loss = DiceCELoss(smooth=0.0)(logits, labels)
    assert math.isclose(loss.item(), 0.5 * (1 - dice) + 0.5 * ce, rel_tol=1e-6)


def test_hand_computed_values_with_background():
    # Voxel 0 is background with p = (0.5, 0.5); voxel 1 is foreground with p = (0.25, 0.75).
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]]).T.reshape(1, 2, 1, 1, 2)
    labels = torch.tensor([0, 1]).reshape(1, 1, 1, 2)
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    dice_bg = 2 * 0.5 / (0.75 + 1)
    dice_fg = 2 * 0.75 / (1.25 + 1)
    loss = DiceCELoss(smooth=0.0, include_background=True)(logits, labels)
    assert math.isclose(loss.item(), 0.5 * (1 - (dice_bg + dice_fg) / 2) + 0.5 * ce, rel_tol=1e-6)


def test_crops_without_foreground_are_trained_by_cross_entropy_alone():
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    logits = torch.zeros(2, 2, 8, 8, 8, requires_grad=True)
    loss = DiceCELoss()(logits, labels)
    assert math.isclose(loss.item(), 0.5 * math.log(2), rel_tol=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # The gradient pushes the foreground logit down everywhere.
    assert (logits.grad[:, 1] > 0).all()


def test_per_sample_dice_skips_samples_without_foreground():
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    logits = logits_for(labels)
    logits[1, 1] = 30.0  # sample 1 predicts foreground everywhere although it has none
    per_sample = DiceCELoss(batch_dice=False, ce_weight=0.0, dice_weight=1.0)(logits, labels)
    assert per_sample.item() < 1e-6  # only sample 0 counts for Dice
    pooled = DiceCELoss(batch_dice=True, ce_weight=0.0, dice_weight=1.0)(logits, labels)
    assert pooled.item() > 0.3  # pooled over the batch, sample 1's false positives count


def test_deep_supervision_weights_and_label_subsampling():
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[:, :4] = 1
    base = DiceCELoss()
    outputs = [logits_for(labels), logits_for(labels[:, ::2, ::2, ::2]), torch.zeros(1, 2, 2, 2, 2)]
    loss = DeepSupervisionLoss(base)(outputs, labels)
    worst = base(outputs[2], labels[:, ::4, ::4, ::4])
    assert math.isclose(loss.item(), worst.item() * 0.25 / 1.75, rel_tol=1e-4)
