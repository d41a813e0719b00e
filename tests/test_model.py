"""MulModSeg head: equivalence with a per-sample, per-class loop written from the formula; conditioning;
parameter counts; reference checkpoints; head memory; checkpointing and torch.compile."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mulmodseg.model import MulModSeg, dynamic_head, load_reference_checkpoint
from mulmodseg.text.prompts import model_table


class TinyBackbone(nn.Module):
    """Stands in for a UNet: encoder code at 1/4 resolution, decoder features at full resolution."""

    enc_channels, dec_channels = 32, 16

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv3d(1, 32, 4, stride=4)
        self.dec = nn.Conv3d(1, 16, 3, padding=1)

    def forward_features(self, x):
        return self.enc(x), self.dec(x)


def loop_forward(model: MulModSeg, x: torch.Tensor, modalities: list[str]) -> torch.Tensor:
    """The method as the paper writes it: for each sample and class, theta from the controller, three 1x1x1 convs."""
    enc, dec = model.backbone.forward_features(x)
    out = []
    for b, mod in enumerate(modalities):
        e_vis = model.GAP(enc[b : b + 1]).flatten()
        feat = model.precls_conv(dec[b : b + 1])
        per_class = []
        for k in range(model.num_classes):
            text = F.relu(model.text_to_vision(model.text_embeddings[model.modalities.index(mod), k]))
            theta = model.controller(torch.cat([e_vis, text])[None, :, None, None, None]).flatten()
            w1, w2, w3 = theta[:64].view(8, 8), theta[64:128].view(8, 8), theta[128:136].view(1, 8)
            b1, b2, b3 = theta[136:144], theta[144:152], theta[152:153]
            h = F.relu(F.conv3d(feat, w1[..., None, None, None], b1))
            h = F.relu(F.conv3d(h, w2[..., None, None, None], b2))
            per_class.append(F.conv3d(h, w3[..., None, None, None], b3))
        out.append(torch.cat(per_class, dim=1))
    return torch.cat(out)


def tiny_model(num_classes=5, dim=12, seed=0):
    torch.manual_seed(seed)
    return MulModSeg(TinyBackbone(), num_classes=num_classes, embeddings=torch.randn(2, num_classes, dim))


def test_vectorised_head_equals_loop_on_mixed_batch():
    model = tiny_model().eval()
    x = torch.randn(3, 1, 16, 12, 8)
    mods = ["CT", "MR", "CT"]
    with torch.no_grad():
        ours = model(x, mods)
        ref = loop_forward(model, x, mods)
    assert ours.shape == (3, 5, 16, 12, 8)
    assert (ours - ref).abs().max().item() < 1e-5


def test_chunked_inference_equals_whole_volume():
    model = tiny_model().eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        whole = model(x, "MR", chunk_voxels=None)
        chunked = model(x, "MR", chunk_voxels=1000)  # 4096 voxels in uneven chunks
    assert torch.equal(whole, chunked) or (whole - chunked).abs().max().item() < 1e-6


def test_modality_conditions_the_output():
    model = tiny_model().eval()
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        ct, ct_again, mr = model(x, "CT"), model(x, "CT"), model(x, "MR")
        wrong = model(x, "CT", prompt_modality="MR")
        mixed = model(x, ["CT", "MR"])
    assert torch.equal(ct, ct_again)
    assert (ct - mr).abs().max().item() > 1e-3
    assert torch.equal(wrong, mr)  # the override takes the other modality's rows
    assert torch.equal(mixed[0], ct[0]) and torch.equal(mixed[1], mr[1])


def test_unknown_modality_and_missing_modality_are_clear_errors():
    model = tiny_model()
    x = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="unknown modality.*PET"):
        model(x, "PET")
    with pytest.raises(ValueError, match="needs the batch's modality"):
        model(x)
    with pytest.raises(ValueError, match="2 modality names for a batch of 1"):
        model(x, ["CT", "MR"])


def test_table_shape_is_checked():
    with pytest.raises(ValueError, match="3 modality rows"):
        MulModSeg(TinyBackbone(), num_classes=4, embeddings=torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="5 classes but num_classes=4"):
        MulModSeg(TinyBackbone(), num_classes=4, embeddings=torch.randn(2, 5, 8))


def test_table_is_a_buffer_not_a_parameter():
    model = tiny_model()
    assert "text_embeddings" in model.state_dict()
    assert all("text_embeddings" not in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("backbone,expected", [("unet", 19_416_417), ("swinunetr", 62_595_315)])
def test_parameter_counts_equal_the_reference(backbone, expected):
    model = MulModSeg(backbone, num_classes=14, embeddings=torch.zeros(2, 14, 512))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vision_only_uses_the_backbone_output_conv():
    model = MulModSeg("unet", num_classes=14, embeddings=None)
    assert sum(p.numel() for p in model.parameters()) == 19_074_510
    assert not hasattr(model, "controller")


def test_onehot_table():
    model = MulModSeg(TinyBackbone(), 3, *model_table("onehot", ("CT", "MR"), ["bg", "liver", "spleen"]))
    table = model.text_embeddings
    assert table.shape == (2, 3, 5)
    assert torch.equal(table[1, 2], torch.tensor([0.0, 1, 0, 0, 1]))


def test_reference_checkpoint_loads_and_matches_the_loop():
    """A reference-format file: 'net', 'module.' prefixes, organ_embedding (2, K, 512) with row 0 = MR."""
    source = tiny_model(num_classes=4, dim=512, seed=1).eval()
    net = {"module." + k: v for k, v in source.state_dict().items() if k != "text_embeddings"}
    ct_rows, mr_rows = source.text_embeddings[0], source.text_embeddings[1]
    net["module.organ_embedding"] = torch.stack([mr_rows, ct_rows]).half()
    model = load_reference_checkpoint({"net": net, "epoch": 5}, backbone=TinyBackbone()).eval()
    assert model.modalities == ("CT", "MR")
    x = torch.randn(2, 1, 8, 8, 8)
    with torch.no_grad():
        ours = model(x, ["MR", "CT"])
        ref = loop_forward(model, x, ["MR", "CT"])
    assert (ours - ref).abs().max().item() < 1e-5
    assert torch.equal(model.text_embeddings[1], mr_rows.half().float())


def test_reference_test_time_slice_needs_its_modality():
    source = tiny_model(num_classes=4, dim=512).eval()
    net = {k: v for k, v in source.state_dict().items() if k != "text_embeddings"}
    net["organ_embedding"] = source.text_embeddings[1]
    with pytest.raises(ValueError, match="modality='CT' or 'MR'"):
        load_reference_checkpoint({"net": dict(net)}, backbone=TinyBackbone())
    model = load_reference_checkpoint({"net": net}, backbone=TinyBackbone(), modality="MR")
    assert model.modalities == ("MR",)


def test_config_round_trip_rebuilds_the_same_network():
    model = MulModSeg("unet", num_classes=3, embeddings=torch.randn(2, 3, 6), classes=["a", "b", "c"])
    clone = MulModSeg.from_config(model.config())
    clone.load_state_dict(model.state_dict())
    assert clone.config() == model.config()


def test_head_memory_for_backward_is_two_hidden_maps():
    """Saved-for-backward bytes of the head at 64^3, batch 2, 14 classes.

    Bound: the two hidden maps (2 x B x K x 8 x S floats) + the shared feature map (B x 8 x S) + the
    dynamic parameters. The reference's grouped conv also stores the feature map repeated K times
    (B x K x 8 x S more), so the bound is below what it keeps.
    """
    B, K, S = 2, 14, 64**3
    feat = torch.randn(B, 8, 64, 64, 64, requires_grad=True)
    params = torch.randn(B, K, 153, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dynamic_head(feat, params)
    saved = sum(seen.values())
    bound = 4 * (2 * B * K * 8 * S + B * 8 * S) + 4 * B * K * 153 * 4
    reference = 4 * (3 * B * K * 8 * S)
    assert saved <= bound < reference
    out.sum().backward()
    assert feat.grad is not None and params.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = tiny_model()
    ckpt = tiny_model()
    ckpt.gradient_checkpointing = True
    x = torch.randn(2, 1, 8, 8, 8)
    for model in (plain, ckpt):
        model(x, ["CT", "MR"]).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_set_gradient_checkpointing_reaches_the_swin_blocks():
    torch.manual_seed(0)
    plain = MulModSeg("swinunetr", 3, *model_table("onehot", classes=("bg", "a", "b")), feature_size=12)
    ckpt = MulModSeg("swinunetr", 3, *model_table("onehot", classes=("bg", "a", "b")), feature_size=12)
    ckpt.load_state_dict(plain.state_dict())
    blocks = [m for m in ckpt.modules() if hasattr(m, "use_checkpoint")]
    assert len(blocks) == 8 and not any(m.use_checkpoint for m in blocks)
    ckpt.set_gradient_checkpointing(True)  # after construction, as a trainer (or a resumed run) does
    assert ckpt.gradient_checkpointing and all(m.use_checkpoint for m in blocks)
    x = torch.randn(1, 1, 32, 32, 32)
    for model in (plain, ckpt):
        model(x, "CT").square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is None:  # encoder10 on a 1^3 bottleneck: see test_nets
            assert b.grad is None, name
        else:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    assert not any(m.use_checkpoint for m in ckpt.set_gradient_checkpointing(False).modules()
                   if hasattr(m, "use_checkpoint"))


def test_torch_compile_matches_eager():
    model = tiny_model().eval()
    x = torch.randn(2, 1, 8, 8, 8)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        assert (compiled(x, "CT") - model(x, "CT")).abs().max().item() < 1e-5


def test_table_file_brings_its_names(tmp_path):
    from mulmodseg.text import EmbeddingTable

    table = EmbeddingTable(("MR", "CT", "PET"), ("bg", "liver", "spleen"), torch.randn(3, 3, 7), "v3", "test")
    table.save(tmp_path / "table.pt")
    model = MulModSeg(TinyBackbone(), 3, *model_table(tmp_path / "table.pt"))
    assert model.modalities == ("MR", "CT", "PET") and model.classes == ("bg", "liver", "spleen")
    assert torch.equal(model.text_embeddings, table.embeddings)
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert (model(x, "PET") - loop_forward(model, x, ["PET"])).abs().max().item() < 1e-5


# ------------------------------------------------------------------- per-modality normalisation statistics

def small_unet_model(norm_stats: str, vision_only: bool = False) -> MulModSeg:
    torch.manual_seed(0)
    embeddings = None if vision_only else torch.randn(2, 3, 6)
    return MulModSeg("unet", num_classes=3, embeddings=embeddings, base_channels=4, norm_stats=norm_stats)


def test_per_modality_statistics_keep_the_parameter_count():
    model = MulModSeg("unet", num_classes=14, embeddings=torch.zeros(2, 14, 512), norm_stats="per_modality")
    assert sum(p.numel() for p in model.parameters()) == 19_416_417
    assert model.backbone.down_tr64.ops[0].bn1.running_mean.shape == (2, 32)
    with pytest.raises(ValueError, match="norm_stats"):
        MulModSeg("unet", num_classes=3, embeddings=None, norm_stats="per_sample")


def test_mixed_batch_uses_each_samples_statistics_in_training_and_eval():
    """A batch [CT, MR, CT] gives what a CT-only and an MR-only batch give (train: batch statistics of
    each modality; eval: each modality's running statistics); the prompts' modality never picks them."""
    x = torch.randn(3, 1, 16, 16, 16)
    x[1] = x[1] * 4 + 3
    mixed, split = small_unet_model("per_modality"), small_unet_model("per_modality")
    out = mixed(x, ["CT", "MR", "CT"])
    ct, mr = split(x[[0, 2]], "CT"), split(x[1:2], "MR")
    assert torch.allclose(out[[0, 2]], ct, atol=1e-5) and torch.allclose(out[1:2], mr, atol=1e-5)
    split_state = split.state_dict()
    for key, value in mixed.state_dict().items():  # the same running statistics per modality
        if not key.endswith("num_batches_tracked"):  # counts forward calls: one here, two there
            assert torch.allclose(value, split_state[key], atol=1e-6), key
    bn = mixed.backbone.down_tr64.ops[0].bn1
    assert not torch.allclose(bn.running_mean[0], bn.running_mean[1])
    mixed.eval()
    with torch.no_grad():
        out = mixed(x, ["CT", "MR", "CT"])
        assert torch.allclose(out[1:2], mixed(x[1:2], "MR"), atol=1e-5)
        assert torch.allclose(out[:1], mixed(x[:1], "CT"), atol=1e-5)
        # The wrong-modality test swaps the prompts only: the MR image keeps the MR statistics.
        swapped = mixed(x[1:2], "MR", prompt_modality="CT")
        features = mixed.forward_features(x[1:2], "MR")
        params = mixed.dynamic_params(features[0], "CT")
        assert torch.allclose(swapped, dynamic_head(mixed.precls_conv(features[1]), params), atol=1e-6)
    with pytest.raises(ValueError, match="its own statistics"):
        mixed(x[:1], prompt_modality="CT")


def test_a_shared_checkpoint_loads_into_per_modality_statistics():
    shared = small_unet_model("shared")
    shared(torch.randn(2, 1, 16, 16, 16), "CT")  # running statistics that are not the initial ones
    per_modality = small_unet_model("per_modality")
    per_modality.load_state_dict(shared.state_dict())
    shared.eval(), per_modality.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        for modality in ("CT", "MR"):
            assert torch.allclose(per_modality(x, modality), shared(x, modality), atol=1e-5)
    clone = MulModSeg.from_config(per_modality.config())
    clone.load_state_dict(per_modality.state_dict())
    assert clone.backbone.norm_domains == 2


def test_vision_only_per_modality_needs_the_modality():
    model = small_unet_model("per_modality", vision_only=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="its own statistics"):
        model(x)
    with torch.no_grad():
        assert model(x, "MR").shape == (1, 3, 16, 16, 16)


def test_head_runs_in_fp32_at_inference_under_autocast():
    torch.manual_seed(0)
    model = MulModSeg("unet", num_classes=4, embeddings=torch.randn(2, 4, 8), base_channels=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, "CT")
        enc_last, dec_last = model.forward_features(x, "CT")
        assert enc_last.dtype == dec_last.dtype == torch.bfloat16  # the backbone stays in bf16
    with torch.no_grad():
        expected = model.head(enc_last.float(), dec_last.float(), "CT")
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: the head follows autocast
        assert model(x, "CT").dtype == torch.bfloat16


def test_the_model_module_imports_only_the_backbones():
    """model.py copies alone: importing it loads mulmodseg.nets, not the text package (CLIP, tokenizer, ftfy)."""
    code = "import sys, mulmodseg.model; print(' '.join(sorted(m for m in sys.modules if m.startswith('mulmodseg'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {m.split(".")[1] for m in loaded if "." in m} == {"model", "nets"}

