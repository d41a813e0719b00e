"""DiceCELoss against MONAI's DiceCELoss / DiceLoss + BCEWithLogitsLoss (oracles), values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as MonaiDiceCELoss
from monai.losses import DiceLoss as MonaiDiceLoss

from mulmodseg.losses import DiceCELoss

CASES = [  # (B, K, spatial)
    (1, 2, (7, 5)),
    (3, 5, (6, 9)),
    (2, 14, (8, 6, 5)),
    (1, 4, (9, 4, 7)),
    (3, 3, (4, 5, 6)),
]


def _case(batch, classes, spatial, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *spatial, generator=gen, dtype=torch.float64) * 3
    # Leave the last class out of the target so empty classes are covered.
    target = torch.randint(0, max(classes - 1, 1), (batch, 1, *spatial), generator=gen)
    return logits, target


def _grad(loss_fn, logits, target):
    x = logits.clone().requires_grad_(True)
    value = loss_fn(x, target)
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("batch,classes,spatial", CASES)
@pytest.mark.parametrize("target_kind", ["long_b1", "float_b1", "long_b", "float_b"])
def test_softmax_matches_monai(batch, classes, spatial, target_kind):
    logits, target = _case(batch, classes, spatial, seed=classes * 10 + batch)
    oracle = MonaiDiceCELoss(to_onehot_y=True, softmax=True)
    ref_value, ref_grad = _grad(oracle, logits, target.double())
    ours_target = target.double() if target_kind.startswith("float") else target
    if target_kind.endswith("_b"):
        ours_target = ours_target[:, 0]
    value, grad = _grad(DiceCELoss(), logits, ours_target)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_terms_and_weights_match_two_monai_losses():
    # The reference sums a Dice-only and a CE-only MONAI loss; terms() must give each one.
    logits, target = _case(2, 6, (5, 6, 7), seed=3)
    ref_dice = MonaiDiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1, lambda_ce=0)(logits, target.double())
    ref_ce = MonaiDiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0, lambda_ce=1)(logits, target.double())
    dice, ce = DiceCELoss().terms(logits, target)
    torch.testing.assert_close(dice, ref_dice, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ref_ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, F.cross_entropy(logits, target[:, 0]), rtol=1e-12, atol=1e-12)
    weighted = DiceCELoss(lambda_dice=0.3, lambda_ce=2.0)(logits, target)
    torch.testing.assert_close(weighted, 0.3 * ref_dice + 2.0 * ref_ce, rtol=1e-12, atol=1e-12)


def test_float32_close_to_monai():
    logits, target = _case(2, 14, (16, 16, 16), seed=7)
    logits = logits.float()
    ref_value, ref_grad = _grad(MonaiDiceCELoss(to_onehot_y=True, softmax=True), logits, target.float())
    value, grad = _grad(DiceCELoss(), logits, target)
    torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


def test_large_float32_crop_as_accurate_as_monai():
    # Sums over 2 x 64^3 voxels: our float64 accumulation must be at least as close to the float64 truth.
    logits, target = _case(2, 14, (64, 64, 64), seed=11)
    truth = MonaiDiceCELoss(to_onehot_y=True, softmax=True)(logits, target.double())
    ref = MonaiDiceCELoss(to_onehot_y=True, softmax=True)(logits.float(), target.float())
    ours = DiceCELoss()(logits.float(), target)
    assert abs(ours.double() - truth) <= max(abs(ref.double() - truth), 1e-7)


def test_half_precision_logits_are_upcast():
    logits, target = _case(2, 5, (8, 8, 8), seed=12)
    dice, ce = DiceCELoss().terms(logits.bfloat16(), target)
    ref_dice, ref_ce = DiceCELoss().terms(logits.bfloat16().float(), target)
    assert dice.dtype == ce.dtype == torch.float32
    assert dice.item() == ref_dice.item() and ce.item() == ref_ce.item()


def test_perfect_prediction_gives_near_zero_dice():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])  # (1, 2, 3), every class present
    logits = F.one_hot(target, 3).permute(0, 3, 1, 2).double() * 60
    dice, ce = DiceCELoss().terms(logits, target)
    assert dice.item() < 1e-10 and ce.item() < 1e-20


@pytest.mark.parametrize("batch,classes,spatial", CASES[1:4])
def test_sigmoid_matches_monai_dice_plus_bce(batch, classes, spatial):
    logits, target = _case(batch, classes, spatial, seed=classes + batch)

    def oracle(x, y):
        one_hot = F.one_hot(y[:, 0], classes).movedim(-1, 1).to(x.dtype)
        dice = MonaiDiceLoss(to_onehot_y=True, sigmoid=True)(x, y.to(x.dtype))
        return dice + F.binary_cross_entropy_with_logits(x, one_hot)

    ref_value, ref_grad = _grad(oracle, logits, target)
    value, grad = _grad(DiceCELoss(activation="sigmoid"), logits, target)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_rejects_mismatched_target():
    with pytest.raises(ValueError):
        DiceCELoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        DiceCELoss(activation="relu")


# -- partially labelled data (marginal loss, masked sigmoid) ---------------------------------------------------


def _partial_case(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 4, 3, 2, generator=gen, dtype=torch.float64) * 2
    labelled = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [1, 0, 0, 1, 0]], dtype=torch.bool)
    target = torch.randint(0, 5, (3, 1, 4, 3, 2), generator=gen)
    target[~labelled.gather(1, target.reshape(3, -1)).reshape(target.shape)] = 0  # unlabelled classes read as 0
    return logits, target, labelled


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_fully_labelled_mask_gives_the_same_loss_bit_for_bit(activation):
    logits, target = _case(2, 6, (5, 4, 3), seed=11)
    loss = DiceCELoss(activation=activation)
    without = loss.terms(logits.float(), target)
    with_mask = loss.terms(logits.float(), target, torch.ones(2, 6, dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(without, with_mask))


def test_marginal_loss_by_hand():
    # One sample, 3 classes, class 2 not labelled; voxel 0 is labelled 0 (background or class 2), voxel 1 class 1.
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.5], [1.0, -1.0]]], dtype=torch.float64)
    target = torch.tensor([[0, 1]])
    dice, ce = DiceCELoss().terms(logits, target, torch.tensor([[True, True, False]]))
    p = torch.softmax(logits[0], 0)
    merged_bg, p1 = p[0] + p[2], p[1]
    assert ce.item() == pytest.approx(-(math.log(merged_bg[0]) + math.log(p1[1])) / 2, rel=1e-12)
    s = 1e-5
    dice_bg = 1 - (2 * merged_bg[0] + s) / (1 + merged_bg.sum() + s)
    dice_1 = 1 - (2 * p1[1] + s) / (1 + p1.sum() + s)
    assert dice.item() == pytest.approx(float(dice_bg + dice_1) / 2, rel=1e-12)  # class 2 is not scored


def test_marginal_loss_equals_the_full_loss_on_merged_logits():
    # Merging probabilities = a full-label loss on logits whose background is logsumexp(bg, unlabelled), with the
    # unlabelled channels gone: checked per sample, against a plain loop over the batch.
    logits, target, labelled = _partial_case(5)
    dice, ce = DiceCELoss().terms(logits, target, labelled)
    dices, ces, voxels = [], [], target[0].numel()
    for b in range(3):
        keep = labelled[b].nonzero()[:, 0]
        background = torch.logsumexp(logits[b, ~labelled[b] | (torch.arange(5) == 0)], 0)
        merged = torch.cat([background[None], logits[b, keep[1:]]])[None]
        remap = torch.zeros(5, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        d, c = DiceCELoss().terms(merged, remap[target[b : b + 1]])
        dices.append(d * len(keep))
        ces.append(c * voxels)
    torch.testing.assert_close(dice, sum(dices) / labelled.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, sum(ces) / (3 * voxels), rtol=1e-12, atol=1e-12)


def test_masked_sigmoid_loss_by_loop():
    logits, target, labelled = _partial_case(6)
    dice, ce = DiceCELoss(activation="sigmoid").terms(logits, target, labelled)
    onehot = F.one_hot(target[:, 0], 5).movedim(-1, 1).double().reshape(3, 5, -1)
    x = logits.reshape(3, 5, -1)
    scored = labelled.clone()
    scored[:, 0] = labelled[:, 1:].all(1)
    bce = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").mean(2)  # (B, K)
    probs = torch.sigmoid(x)
    per_item = 1 - (2 * (probs * onehot).sum(2) + 1e-5) / (onehot.sum(2) + probs.sum(2) + 1e-5)
    torch.testing.assert_close(ce, bce[scored].mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dice, per_item[scored].mean(), rtol=1e-12, atol=1e-12)


def test_marginal_loss_gradient_treats_an_unlabelled_class_as_background():
    # Equal logits, label 0 everywhere, class 2 not labelled: CE = -log(p0 + p2), so class 2 is pulled up with the
    # background (d/dx = -(1/2 - 1/3) per voxel, / 4 voxels) and class 1 down (+1/3 / 4); the full loss would
    # push class 2 down like class 1.
    logits = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(1, 4, dtype=torch.long)
    DiceCELoss(lambda_dice=0).forward(logits, target, torch.tensor([[True, True, False]])).backward()
    torch.testing.assert_close(logits.grad[0], torch.tensor([[-1 / 24] * 4, [1 / 12] * 4, [-1 / 24] * 4],
                                                            dtype=torch.float64))
    full = torch.zeros(1, 3, 4, dtype=torch.float64, requires_grad=True)
    DiceCELoss(lambda_dice=0).forward(full, target).backward()
    torch.testing.assert_close(full.grad[0, 2], torch.full((4,), 1 / 12, dtype=torch.float64))


def test_labelled_shape_is_checked():
    logits, target = _case(2, 4, (3, 3), seed=1)
    with pytest.raises(ValueError, match="labelled shape"):
        DiceCELoss().terms(logits, target, torch.ones(2, 3, dtype=torch.bool))
