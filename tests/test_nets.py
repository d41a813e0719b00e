"""Tests for mulmodseg.nets: shapes, exact parameter counts, reference/MONAI state-dict compatibility,
MONAI SwinUNETR as a numerical oracle (test-only import), gradients, eval determinism, input checks."""
import inspect

import monai
import pytest
import torch
import torch.nn as nn
from monai.networks.nets import swin_unetr as monai_swin

from mulmodseg.nets import SwinUNETR, UNet3D, build_backbone, load_swin_weights
from mulmodseg.nets.swin_unetr import MERGE_ORDERS
from mulmodseg.nets.unet3d import DomainBatchNorm3d, domain_groups


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- UNet3D

def reference_unet_state_dict(generator: torch.Generator) -> dict:
    """Random state dict with the key names and shapes of the reference's (ChengyinLee/MulModSeg_2024) UNet3D."""
    convs = {  # stage -> (in, out) of its two LUConvs
        "down_tr64": [(1, 32), (32, 64)], "down_tr128": [(64, 64), (64, 128)],
        "down_tr256": [(128, 128), (128, 256)], "down_tr512": [(256, 256), (256, 512)],
        "up_tr256": [(768, 256), (256, 256)], "up_tr128": [(384, 128), (128, 128)],
        "up_tr64": [(192, 64), (64, 64)],
    }
    up = {"up_tr256": 512, "up_tr128": 256, "up_tr64": 128}
    sd = {}
    for stage, pairs in convs.items():
        if stage in up:
            c = up[stage]
            sd[f"{stage}.up_conv.weight"] = torch.randn(c, c, 2, 2, 2, generator=generator) / (8 * c) ** 0.5
            sd[f"{stage}.up_conv.bias"] = torch.randn(c, generator=generator)
        for i, (cin, cout) in enumerate(pairs):
            p = f"{stage}.ops.{i}"
            sd[f"{p}.conv1.weight"] = torch.randn(cout, cin, 3, 3, 3, generator=generator) / (27 * cin) ** 0.5
            sd[f"{p}.conv1.bias"] = torch.randn(cout, generator=generator)
            sd[f"{p}.bn1.weight"] = torch.rand(cout, generator=generator) + 0.5
            sd[f"{p}.bn1.bias"] = torch.randn(cout, generator=generator)
            sd[f"{p}.bn1.running_mean"] = torch.randn(cout, generator=generator)
            sd[f"{p}.bn1.running_var"] = torch.rand(cout, generator=generator) + 0.5
            sd[f"{p}.bn1.num_batches_tracked"] = torch.tensor(7)
    return sd


def test_unet_parameter_counts_and_keys():
    backbone = UNet3D()
    assert n_params(backbone) == 19_073_600
    assert sum(b.numel() for b in backbone.buffers()) == 4_686
    assert len(backbone.state_dict()) == 104
    with_head = UNet3D(out_channels=14)
    assert n_params(with_head) == 19_074_510
    assert tuple(with_head.state_dict()["out_tr.final_conv.weight"].shape) == (14, 64, 1, 1, 1)
    assert (backbone.enc_channels, backbone.dec_channels) == (512, 64)


def test_unet_reference_state_dict_loads_strictly():
    sd = reference_unet_state_dict(torch.Generator().manual_seed(0))
    assert len(sd) == 104
    model = UNet3D()
    model.load_state_dict(sd, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


@pytest.mark.parametrize("size,batch,in_ch", [((16, 16, 16), 1, 1), ((8, 24, 32), 2, 2)])
def test_unet_shapes(size, batch, in_ch):
    model = UNet3D(in_channels=in_ch, out_channels=3).eval()
    x = torch.randn(batch, in_ch, *size)
    with torch.no_grad():
        enc, dec = model.forward_features(x)
        logits = model(x)
    assert enc.shape == (batch, 512, *(s // 8 for s in size))
    assert dec.shape == (batch, 64, *size)
    assert logits.shape == (batch, 3, *size)
    # logits are the raw 1x1x1 conv of dec_last: no sigmoid
    assert torch.allclose(logits, model.out_tr.final_conv(dec), atol=1e-6)


def test_unet_eval_uses_running_stats_and_is_batch_independent():
    torch.manual_seed(0)
    model = UNet3D(out_channels=2)
    model.load_state_dict(dict(reference_unet_state_dict(torch.Generator().manual_seed(1)),
                               **{k: v for k, v in model.state_dict().items() if k.startswith("out_tr")}))
    model.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)[:1]
        # first LUConv by hand with the stored running statistics
        lu = model.down_tr64.ops[0]
        bn = lu.bn1
        conv = lu.conv1(x[:1])
        manual = torch.relu((conv - bn.running_mean[:, None, None, None]) /
                            torch.sqrt(bn.running_var[:, None, None, None] + bn.eps)
                            * bn.weight[:, None, None, None] + bn.bias[:, None, None, None])
        assert torch.allclose(lu(x[:1]), manual, atol=1e-4, rtol=1e-5)
    assert torch.allclose(alone, together, atol=1e-5, rtol=1e-5)


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet3D(out_channels=2).train()
    model(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unet_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        UNet3D().forward_features(torch.zeros(1, 1, 12, 16, 16))
    with pytest.raises(RuntimeError, match="out_channels=None"):
        UNet3D()(torch.zeros(1, 1, 8, 8, 8))


def test_one_domain_batchnorm_is_torch_batchnorm():
    torch.manual_seed(0)
    ours, plain = DomainBatchNorm3d(6), nn.BatchNorm3d(6)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.normal_()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 4, 5, 6) * 2 + 1
    assert torch.allclose(ours(x), plain(x), atol=1e-6)
    assert torch.allclose(ours.running_mean, plain.running_mean) and torch.allclose(ours.running_var, plain.running_var)
    ours.eval(), plain.eval()
    assert torch.allclose(ours(x), plain(x), atol=1e-6)


def test_domain_batchnorm_normalises_each_domain_with_its_own_statistics():
    """A mixed batch [0, 1, 0, 1] in training equals two BatchNorms, one fed each domain's samples; in
    eval each sample gets its domain's running statistics, whatever else is in the batch."""
    torch.manual_seed(0)
    mixed = DomainBatchNorm3d(4, num_domains=2)
    with torch.no_grad():
        mixed.weight.uniform_(0.5, 1.5), mixed.bias.normal_()
    alone = [nn.BatchNorm3d(4), nn.BatchNorm3d(4)]
    for bn in alone:
        bn.load_state_dict({k: v for k, v in mixed.state_dict().items() if not k.startswith("running")}, strict=False)
    x = torch.randn(4, 4, 3, 4, 5)
    x[1::2] = x[1::2] * 5 + 10  # domain 1 lives on another scale, as MR beside CT
    domain = torch.tensor([0, 1, 0, 1])
    out = mixed(x, domain_groups(domain, 4))
    for d, bn in enumerate(alone):
        assert torch.allclose(out[d::2], bn(x[d::2]), atol=1e-5)
        assert torch.allclose(mixed.running_mean[d], bn.running_mean, atol=1e-6)
        assert torch.allclose(mixed.running_var[d], bn.running_var, atol=1e-5)
    assert mixed.running_mean[1].mean() > 0.5 and mixed.running_mean[0].abs().mean() < 0.2
    mixed.eval()
    for bn in alone:
        bn.eval()
    with torch.no_grad():
        out = mixed(x, domain_groups(domain, 4))
        single = mixed(x[1:2], domain_groups(torch.tensor([1]), 1))
    for d, bn in enumerate(alone):
        assert torch.allclose(out[d::2], bn(x[d::2]), atol=1e-5)
    assert torch.allclose(single, out[1:2], atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        mixed(x[:1], domain_groups(torch.tensor([2]), 1))


def test_domain_groups():
    assert domain_groups(None, 3) == [(0, None)]
    assert domain_groups(torch.tensor([1, 1]), 2) == [(1, None)]
    groups = domain_groups(torch.tensor([1, 0, 1]), 3)
    assert [d for d, _ in groups] == [0, 1] and groups[1][1].tolist() == [0, 2]
    with pytest.raises(ValueError, match="one id per sample"):
        domain_groups(torch.tensor([0, 1]), 3)


def test_unet_per_domain_statistics_keep_parameters_and_load_reference_weights():
    sd = reference_unet_state_dict(torch.Generator().manual_seed(0))
    model = UNet3D(norm_domains=2)
    assert sum(p.numel() for p in model.parameters()) == 19_073_600  # statistics are buffers, not parameters
    model.load_state_dict(sd, strict=True)
    bn = model.down_tr64.ops[0].bn1
    assert bn.running_mean.shape == (2, 32)
    assert torch.equal(bn.running_mean[0], sd["down_tr64.ops.0.bn1.running_mean"])
    assert torch.equal(bn.running_mean[1], sd["down_tr64.ops.0.bn1.running_mean"])
    # With both rows equal to the reference's single set, each domain predicts as the shared model.
    shared = UNet3D()
    shared.load_state_dict(sd)
    model.eval(), shared.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = shared.forward_features(x)[1]
        assert torch.allclose(model.forward_features(x, torch.tensor([0, 1]))[1], expected, atol=1e-5)
    with pytest.raises(ValueError, match="domain id"):
        model.forward_features(x)


# -------------------------------------------------------------------------------------------- SwinUNETR

class LegacyPatchMerging(monai_swin.PatchMergingV2):
    """MONAI < 1.5 ``PatchMerging`` order (mulmodseg/nets/swin_unetr.py's docstring), for MONAI >= 1.5 installs."""

    def forward(self, x):
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in
                       ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))], -1)
        return self.reduction(self.norm(x))


def monai_default_merge_order() -> str:
    major, minor = (int(v) for v in monai.__version__.split(".")[:2])
    return "all8" if (major, minor) >= (1, 5) else "legacy"


def monai_swinunetr(feature_size: int, out_channels: int = 14, legacy: bool = False) -> nn.Module:
    kwargs = dict(in_channels=1, out_channels=out_channels, feature_size=feature_size)
    if "img_size" in inspect.signature(monai_swin.SwinUNETR.__init__).parameters:  # MONAI < 1.5
        kwargs["img_size"] = (64, 64, 64)
    if legacy:
        kwargs["downsample"] = LegacyPatchMerging
    return monai_swin.SwinUNETR(**kwargs)


def test_swin_parameter_counts_and_keys():
    model = SwinUNETR(1, 14, feature_size=48)
    assert n_params(model) == 62_187_296
    assert n_params(SwinUNETR(1, None, feature_size=48)) == 62_186_610
    assert (model.enc_channels, model.dec_channels) == (768, 48)
    ref = monai_swinunetr(48)
    ours_sd, ref_sd = model.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(ours_sd[k].shape == ref_sd[k].shape for k in ours_sd)
    assert torch.equal(ours_sd["swinViT.layers1.0.blocks.1.attn.relative_position_index"],
                       ref_sd["swinViT.layers1.0.blocks.1.attn.relative_position_index"])


def test_legacy_merge_order_repeats_two_subvoxels():
    legacy, all8 = MERGE_ORDERS["legacy"], MERGE_ORDERS["all8"]
    assert len(set(legacy)) == 6 and {(1, 1, 0), (0, 1, 1)}.isdisjoint(legacy)
    assert sorted(all8) == sorted({(i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1)})


@pytest.mark.parametrize("feature_size", [12, 48])
@pytest.mark.parametrize("direction", ["monai_to_ours", "ours_to_monai"])
def test_swin_matches_monai(feature_size, direction):
    torch.manual_seed(feature_size)
    order = monai_default_merge_order()
    ref = monai_swinunetr(feature_size).eval()
    ours = SwinUNETR(1, 14, feature_size=feature_size, merge_order=order).eval()
    if direction == "monai_to_ours":
        ours.load_state_dict(ref.state_dict(), strict=True)
    else:
        ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert got.shape == (1, 14, 64, 64, 64)
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("size,batch", [((64, 64, 64), 1), ((32, 64, 96), 2)])
def test_swin_legacy_merging_matches_old_monai_order(size, batch):
    torch.manual_seed(1)
    ref = monai_swinunetr(12, legacy=True).eval()
    ours = SwinUNETR(1, 14, feature_size=12, merge_order="legacy").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 1, *size)
    with torch.no_grad():
        expected = ref(x)
        assert (ours(x) - expected).abs().max().item() < 1e-4
        if batch == 1:  # the order matters
            ours.swinViT.layers1[0].downsample.offsets = MERGE_ORDERS["all8"]
            assert (ours(x) - expected).abs().max().item() > 1e-3


def test_swin_single_voxel_bottleneck_is_zero_normalised():
    model = SwinUNETR(1, 2, feature_size=12).eval()
    with torch.no_grad():
        hidden = model.swinViT(torch.randn(1, 1, 32, 32, 32))
        assert hidden[4].shape == (1, 192, 1, 1, 1)
        # instance norm of one voxel is 0, so encoder10 reduces to LeakyReLU of its input
        expected = torch.nn.functional.leaky_relu(hidden[4], 0.01)
        assert torch.equal(model.encoder10(hidden[4]), expected)


@pytest.mark.parametrize("size,batch", [((32, 32, 32), 1), ((32, 64, 32), 2)])
def test_swin_shapes(size, batch):
    model = SwinUNETR(in_channels=2, out_channels=3, feature_size=12).eval()
    x = torch.randn(batch, 2, *size)
    with torch.no_grad():
        enc, dec = model.forward_features(x)
        logits = model(x)
    assert enc.shape == (batch, 192, *(s // 32 for s in size))
    assert dec.shape == (batch, 12, *size)
    assert logits.shape == (batch, 3, *size)


def test_swin_errors():
    model = SwinUNETR(1, None, feature_size=12)
    with pytest.raises(ValueError, match="W=48"):
        model.forward_features(torch.zeros(1, 1, 32, 32, 48))
    with pytest.raises(RuntimeError, match="out_channels=None"):
        model(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="merge_order"):
        SwinUNETR(feature_size=12, merge_order="v2")
    with pytest.raises(ValueError, match="heads"):
        SwinUNETR(feature_size=10)


def test_swin_gradients_reach_every_parameter_and_checkpointing_is_exact():
    torch.manual_seed(0)
    plain = SwinUNETR(1, 2, feature_size=12).train()
    ckpt = SwinUNETR(1, 2, feature_size=12, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    # 64 along one axis: at 32^3 the 1/32 level is one voxel, instance norm gives 0 and encoder10 no gradient
    x = torch.randn(1, 1, 64, 32, 32)
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    grads = dict(ckpt.named_parameters())
    for name, p in plain.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6, rtol=1e-4), name


def test_swin_eval_is_batch_independent():
    torch.manual_seed(0)
    model = SwinUNETR(1, 2, feature_size=12).eval()
    x = torch.randn(2, 1, 32, 32, 64)
    with torch.no_grad():
        alone = model(x[:1])
        together = model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5, rtol=1e-5)


def test_swin_compiles_to_one_graph_equal_to_eager():
    # The window plans are constants of the geometry: no graph breaks, and no recompile once cached.
    torch.manual_seed(0)
    model = SwinUNETR(1, 2, feature_size=12).train()
    x = torch.randn(2, 1, 64, 32, 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    first, second = compiled(x), compiled(x)
    assert len(graphs) == 1
    assert torch.equal(first, second) and torch.allclose(first, model(x), atol=1e-6)


def test_load_swin_weights_self_supervised_and_dataparallel_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = SwinUNETR(1, 14, feature_size=12)
    # Self-supervised encoder checkpoint layout: {"state_dict": {"module.<swin key>": ...}}, MLP as fc1/fc2,
    # plus pre-training heads that the segmentation model does not have.
    encoder = {"module." + k[len("swinViT."):].replace("mlp.linear", "mlp.fc"): v
               for k, v in source.state_dict().items() if k.startswith("swinViT.")}
    encoder["module.rotation_head.weight"] = torch.zeros(4, 8)
    encoder["module.contrastive_head.weight"] = torch.zeros(8, 8)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"epoch": 3, "state_dict": encoder}, path)

    target = SwinUNETR(1, 14, feature_size=12)
    result = load_swin_weights(target, path)
    assert sorted(result.unexpected_keys) == ["module.contrastive_head.weight", "module.rotation_head.weight"]
    assert result.missing_keys == [k for k in target.state_dict() if not k.startswith("swinViT.")]
    for key, value in target.state_dict().items():
        if key.startswith("swinViT."):
            assert torch.equal(value, source.state_dict()[key]), key
    with pytest.raises(ValueError, match="strict=True"):
        load_swin_weights(SwinUNETR(1, 14, feature_size=12), path, strict=True)

    # A whole MONAI model saved from DataParallel: every key prefixed "module.", nested under "model".
    ref = monai_swinunetr(12)
    full = {"model": {"module." + k: v for k, v in ref.state_dict().items()}}
    target = SwinUNETR(1, 14, feature_size=12)
    assert load_swin_weights(target, full, strict=True) == ([], [])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in target.state_dict().items())

    bad = {k: v for k, v in ref.state_dict().items()}
    bad["out.conv.conv.weight"] = torch.zeros(3, 12, 1, 1, 1)
    with pytest.raises(ValueError, match="out.conv.conv.weight"):
        load_swin_weights(SwinUNETR(1, 14, feature_size=12), bad)


def test_build_backbone():
    assert isinstance(build_backbone("unet", out_channels=3), UNet3D)
    swin = build_backbone("swinunetr", in_channels=2, feature_size=12)
    assert isinstance(swin, SwinUNETR) and swin.out is None and swin.in_channels == 2
    assert swin.enc_channels == 192 and swin.dec_channels == 12
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet")


def test_unet_width_scales_every_stage_and_keeps_the_key_names():
    narrow = UNet3D(base_channels=4, out_channels=3)
    assert (narrow.enc_channels, narrow.dec_channels) == (64, 8)
    assert narrow.state_dict().keys() == UNet3D(out_channels=3).state_dict().keys()
    enc, dec = narrow.forward_features(torch.randn(1, 1, 16, 24, 32))
    assert enc.shape == (1, 64, 2, 3, 4) and dec.shape == (1, 8, 16, 24, 32)
    # Every conv shrinks by 8x in both channel counts (64x fewer weights), except those reading the image.
    wide = dict(UNet3D().named_parameters())
    for name, p in UNet3D(base_channels=4).named_parameters():
        if name.endswith("conv1.weight") and name != "down_tr64.ops.0.conv1.weight":
            assert p.numel() * 64 == wide[name].numel(), name
