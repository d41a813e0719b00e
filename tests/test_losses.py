"""DiceCELoss against MONAI's DiceCELoss / DiceLoss + BCEWithLogitsLoss (oracles), values and gradients."""

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
