"""Parameter and FLOP counts of a model (mulmodseg.cost)."""

import torch
from torch import nn

from mulmodseg.cost import count_flops, count_parameters


def test_count_parameters():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Linear(5, 6))
    model[1].weight.requires_grad_(False)
    assert count_parameters(model) == (2 * 4 * 27 + 4) + (5 * 6 + 6)
    assert count_parameters(model, trainable_only=True) == (2 * 4 * 27 + 4) + 6


def test_count_flops_conv3d_formula():
    conv = nn.Conv3d(2, 4, 3, padding=1)
    # 2 FLOPs per multiply-accumulate: output voxels x output channels x (in channels x kernel volume).
    assert count_flops(conv, (1, 2, 8, 8, 8)) == 2 * (4 * 8**3) * (2 * 3**3)


def test_count_flops_forwards_kwargs_and_restores_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm3d(1)
            self.heads = nn.ModuleDict({"CT": nn.Linear(4, 3), "MR": nn.Linear(4, 5)})

        def forward(self, x, modality):
            return self.heads[modality](self.norm(x))

    net = Net().train()
    assert count_flops(net, (1, 1, 2, 3, 4), modality="MR") == 2 * (2 * 3) * 4 * 5
    assert net.training and int(net.norm.num_batches_tracked) == 0
    assert count_flops(net, (1, 1, 2, 3, 4), modality="CT") == 2 * (2 * 3) * 4 * 3
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    flops = count_flops(attention, (1, 5, 8), key=torch.zeros(1, 5, 8), value=torch.zeros(1, 5, 8))
    assert flops == 2 * 5 * 8 * 8 * 4 + 2 * 2 * 5 * 5 * 8  # q,k,v,out projections + QK^T and AV
