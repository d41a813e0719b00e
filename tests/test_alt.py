"""Alternating training (mulmodseg.alt): schedule, ALT order and cycling, the loaders' keys, the train step
(weighted loss, NaN stop on every DDP rank, overfitting a real crop, channels_last), and that alt.py copies alone."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mulmodseg import data as mdata
from mulmodseg.alt import ConcatCrops, EpochLoader, GradientGuard, alt_epoch, train_step, warmup_cosine
from mulmodseg.losses import DiceCELoss
from mulmodseg.model import MulModSeg
from mulmodseg.text.prompts import model_table, resolve_classes

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"


def test_schedule_warms_up_to_the_base_lr_and_never_reaches_zero():
    W, T = 10, 1000
    assert warmup_cosine(0, W, T) == pytest.approx(0.1)
    assert warmup_cosine(W - 1, W, T) == 1.0  # warm-up ends at the base lr
    assert warmup_cosine(W, W, T) == 1.0  # the cosine starts at the base lr
    assert warmup_cosine(500, W, T) == pytest.approx(0.5 * (1 + np.cos(np.pi * 490 / 990)))
    last = warmup_cosine(T - 1, W, T)
    assert 0 < last < 1e-4  # the reference trains its last epoch at lr 0
    values = [warmup_cosine(e, W, T) for e in range(W, T)]
    assert all(a >= b for a, b in zip(values, values[1:]))


class CountingSet(torch.utils.data.Dataset):
    """n items of a constant crop; records set_epoch calls."""

    def __init__(self, n, value):
        self.n, self.value, self.draws = n, value, []

    def __len__(self):
        return self.n

    def set_epoch(self, draw):
        self.draws.append(draw)

    def __getitem__(self, i):
        return {"image": torch.full((2, 1, 4, 4, 4), float(self.value)), "label": torch.zeros(2, 1, 4, 4, 4)}


class RecordingModel(nn.Module):
    """Records the modality of every forward; the optimizer step follows each forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 1, 1, 1))
        self.seen = []

    def forward(self, x, modality):
        self.seen.append(modality)
        return self.w[None] * x  # (B, 2, 4, 4, 4)


def test_alt_alternates_modalities_for_max_len_iterations_with_cycling():
    loaders = {name: EpochLoader(CountingSet(n, value), 1, seed=0, modality=m, collate=mdata.collate_crops)
               for m, (name, n, value) in enumerate((("CT", 5, 1), ("MR", 2, 2)))}
    model = RecordingModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    steps, values, w_before = 0, [], []

    def prepare(batch):
        values.append(batch["image"].flatten()[0].item())
        w_before.append(model.w.detach().clone())
        return batch

    def after_step(modality, dice, ce):
        nonlocal steps
        assert not torch.equal(w_before[-1], model.w.detach())  # one optimizer step per batch
        steps += 1

    alt_epoch(model, loaders, ["CT", "MR"], 3, loss_fn=DiceCELoss(), optimizer=opt, scaler=scaler,
              device=torch.device("cpu"), prepare=prepare, after_step=after_step)
    assert model.seen == ["CT", "MR"] * 5  # max(5, 2) iterations, CT first
    assert values == [1.0, 2.0] * 5
    assert steps == 10
    # MR (2 volumes, modality 1) cycled through passes 0, 1 and 2 of epoch 3; CT needed one pass. A draw is
    # (epoch, modality, pass, rank).
    assert loaders["MR"].dataset.draws == [(3, 1, 0, 0), (3, 1, 1, 0), (3, 1, 2, 0)]
    assert loaders["CT"].dataset.draws == [(3, 0, 0, 0)]


class IndexSet(torch.utils.data.Dataset):
    """Item i is the number i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def set_epoch(self, draw):
        pass

    def __getitem__(self, i):
        return {"image": torch.tensor([[float(i)]]), "label": torch.tensor([[0]])}


def test_epoch_loader_gives_each_rank_distinct_items_of_equal_count():
    seen = [[int(b["image"].item()) for b in EpochLoader(IndexSet(5), 1, seed=0, rank=r, world=2).batches(0)]
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 3  # 5 items padded by wrapping to 3 per rank
    assert set(seen[0]) | set(seen[1]) == set(range(5))
    assert set(seen[0][:2]).isdisjoint(seen[1][:2])
    assert seen == [[int(b["image"].item()) for b in EpochLoader(IndexSet(5), 1, seed=0, rank=r, world=2).batches(0)]
                    for r in range(2)]  # the same seed and epoch give the same order


NAN_SCRIPT = """
import os, torch, torch.distributed as dist
from mulmodseg.losses import DiceCELoss
from mulmodseg.model import MulModSeg
from mulmodseg.text.prompts import model_table
from mulmodseg.alt import train_step
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(MulModSeg("unet", 3, *model_table("onehot", classes=("bg", "a", "b")),
                                                            base_channels=2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
image = torch.randn(2, 1, 16, 16, 16)
if dist.get_rank() == 1:
    image[0, 0, 0, 0, 0] = float("nan")
batch = {"image": image, "label": torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)}
try:
    train_step(model, batch, "CT", loss_fn=DiceCELoss(), optimizer=opt,
               scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"))
except FloatingPointError as exc:
    print("stopped:", exc, flush=True)
    # os._exit: the interpreter's own exit tears down gloo's threads in an order that can abort (SIGABRT),
    # which would hide the exit code this test checks
    os._exit(3)
"""


def test_a_non_finite_loss_on_one_rank_stops_every_rank(free_port):
    """Rank 1's loss is NaN: both ranks stop with a message instead of rank 0 waiting in backward."""
    port, procs = free_port, []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", NAN_SCRIPT], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [3, 3], logs
    assert "the loss of another rank is not finite" in logs[0]
    assert "loss is nan on rank 1" in logs[1]


def test_overfits_one_real_crop():
    """On one crop of the real CT the loss falls by at least half within 15 steps."""
    image, label, _ = mdata.preprocess(SAMPLE / "ct/imagesTr/ts_ct_001.nii.gz", SAMPLE / "ct/labelsTr/ts_ct_001.nii.gz",
                                       "CT", **mdata.default_settings("CT"))
    centre = np.argwhere(label == 6).mean(0).astype(int)  # the liver
    sl = tuple(slice(c - 16, c + 16) for c in centre)
    x = torch.as_tensor(image[sl].copy())[None, None]
    y = torch.as_tensor(label[sl].astype(np.int64))[None, None]
    torch.manual_seed(0)
    model = MulModSeg("unet", 14, *model_table("onehot", classes=resolve_classes("amos")), base_channels=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [sum(train_step(model, {"image": x, "label": y}, "CT", loss_fn=DiceCELoss(), optimizer=opt, scaler=scaler,
                             device=torch.device("cpu"))) for _ in range(15)]
    assert min(losses[-3:]) <= 0.5 * losses[0], losses


def test_train_step_minimises_the_weighted_loss():
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 3, (2, 1, 8, 8, 8))
    weights = {}
    for lambdas in ((1.0, 1.0), (1.0, 0.0), (0.0, 5.0)):
        for how in ("train_step", "by hand"):
            torch.manual_seed(1)
            model = MulModSeg("unet", 3, *model_table("onehot", classes=("bg", "a", "b")), base_channels=2)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            loss_fn = DiceCELoss(*lambdas)
            if how == "train_step":
                train_step(model, {"image": x, "label": y}, "CT", loss_fn=loss_fn, optimizer=opt,
                           scaler=torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"))
            else:
                loss_fn(model(x, "CT"), y).backward()
                opt.step()
            weights[lambdas, how] = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.testing.assert_close(weights[lambdas, "train_step"], weights[lambdas, "by hand"])
    assert not torch.allclose(weights[(1.0, 1.0), "by hand"], weights[(1.0, 0.0), "by hand"])


def test_channels_last_step_matches_the_default_layout():
    torch.manual_seed(0)
    batch = {"image": torch.rand(2, 1, 16, 16, 16), "label": torch.randint(0, 3, (2, 1, 16, 16, 16))}
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = MulModSeg("unet", 3, *model_table("onehot", classes=("bg", "a", "b")), base_channels=4)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # the step is the gradient, scaled
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = train_step(model, batch, "CT", loss_fn=DiceCELoss(), optimizer=opt, scaler=scaler,
                          device=torch.device("cpu"), channels_last=channels_last)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[0][1], results[1][1]))


def test_a_mixed_loaders_members_draw_their_crops_as_their_modalitys_loader():
    members = [CountingSet(2, 1), CountingSet(3, 2)]
    mixed = EpochLoader(ConcatCrops(members), 2, seed=0, modality=2, collate=mdata.collate_crops)
    assert [len(batch["image"]) for batch in mixed.batches(4, 1)] == [4, 4, 2]  # 2 crops an item
    assert members[0].draws == [(4, 0, 1, 0)] and members[1].draws == [(4, 1, 1, 0)]


def test_alt_imports_no_sibling_but_losses():
    """alt.py copies into another codebase with losses.py."""
    code = "import sys, mulmodseg.alt; print(' '.join(sorted(m for m in sys.modules if m.startswith('mulmodseg'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {m.split(".")[1] for m in loaded if "." in m} == {"alt", "losses"}


# -- the gradient guard ------------------------------------------------------------------------------------------


def test_gradient_guard_admits_healthy_norms_and_counts_the_others():
    guard = GradientGuard()
    assert [guard.admits(n) for n in (0.0, 12.5, 1e15)] == [True, True, True]
    assert [guard.admits(n) for n in (float("inf"), float("nan"), 1.1e15)] == [False, False, False]
    assert (guard.skipped, guard.consecutive) == (3, 3)
    assert guard.admits(3.0) and (guard.skipped, guard.consecutive) == (3, 0)


@pytest.mark.parametrize("corrupt", [1e30, float("inf")])
def test_a_step_with_a_corrupt_gradient_is_skipped_and_changes_nothing(corrupt):
    torch.manual_seed(0)
    model = MulModSeg("unet", 3, *model_table("onehot", classes=("bg", "a", "b")), base_channels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {"image": torch.randn(2, 1, 16, 16, 16), "label": torch.randint(0, 3, (2, 1, 16, 16, 16))}
    guard = GradientGuard()
    kwargs = dict(loss_fn=DiceCELoss(), optimizer=opt, scaler=scaler, device=torch.device("cpu"), guard=guard)
    hook = next(model.parameters()).register_hook(lambda g: g * corrupt)  # as one bf16 CPU backward gave
    before = [p.detach().clone() for p in model.parameters()]
    dice, ce = train_step(model, batch, "CT", **kwargs)
    assert np.isfinite(dice) and np.isfinite(ce)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert (guard.skipped, guard.consecutive) == (1, 1)
    hook.remove()
    train_step(model, batch, "CT", **kwargs)  # a healthy step is applied again
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > 0
    assert (guard.skipped, guard.consecutive) == (1, 0)
