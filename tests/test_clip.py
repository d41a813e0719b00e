"""CLIP text tower: numbers against transformers' CLIPTextModelWithProjection (random weights converted
here), every checkpoint format giving the same embeddings, clear errors, and the download without network."""

import hashlib
import io
import json
import os
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

from mulmodseg.text import WeightsError, WeightsUnavailableError, load_text_encoder, tokenize
from mulmodseg.text.clip import CLIPTextEncoder, TextConfig
from mulmodseg.text.prompts import CLASS_SETS, make_prompts
from mulmodseg.text.weights import (
    OPENAI_VIT_B_32_URL,
    download_weights,
    read_safetensors,
    read_weights,
    text_state_dict,
)

SMALL = TextConfig(width=64, layers=2, heads=1, embed_dim=48)  # real vocabulary and context, small body


def _random_encoder(config: TextConfig, seed: int) -> CLIPTextEncoder:
    """CLIP init plus random biases and LayerNorm affines, so that every parameter's mapping matters."""
    torch.manual_seed(seed)
    encoder = CLIPTextEncoder(config).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif ".ln_" in name or name.startswith("ln_"):
                p.normal_(1, 0.1)
    return encoder


def _openai_to_hf(sd: dict) -> dict:
    """OpenAI text keys -> transformers CLIPTextModelWithProjection keys (the oracle's own conversion)."""
    width = sd["ln_final.weight"].shape[0]
    out = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
    }
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")}
    for i in layers:
        a, h = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for j, name in enumerate("qkv"):
                out[f"{h}self_attn.{name}_proj.{kind}"] = sd[f"{a}attn.in_proj_{kind}"][j * width : (j + 1) * width]
            for src, dst in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:  # fmt: skip
                out[f"{h}{dst}.{kind}"] = sd[f"{a}{src}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def _hf_model(config: TextConfig, hf_sd: dict):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.width,
        intermediate_size=4 * config.width,
        projection_dim=config.embed_dim,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        max_position_embeddings=config.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    model = transformers.CLIPTextModelWithProjection(hf_config).eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@pytest.fixture(scope="module")
def prompts_ids():
    prompts = make_prompts(CLASS_SETS["amos"], ["CT", "MR"], "v3")
    return tokenize([prompts[0][1], prompts[0][9], prompts[1][12], "A photo of a background."])


@pytest.fixture(scope="module")
def small(prompts_ids):
    """A small random tower, its OpenAI-layout state dict and its embeddings of the prompts."""
    encoder = _random_encoder(SMALL, seed=1)
    with torch.no_grad():
        expected = encoder(prompts_ids)
    return encoder.state_dict(), expected


def test_full_size_matches_transformers(prompts_ids):
    encoder = _random_encoder(TextConfig(), seed=0)
    assert sum(p.numel() for p in encoder.parameters()) == 63_428_096
    assert len(encoder.state_dict()) == 149
    hf = _hf_model(TextConfig(), _openai_to_hf(encoder.state_dict()))
    with torch.no_grad():
        ours = encoder(prompts_ids)
        theirs = hf(input_ids=prompts_ids).text_embeds
        unpadded = encoder(prompts_ids[:1, :13])
    assert ours.shape == (4, 512) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 1e-5
    assert (unpadded - ours[:1]).abs().max() < 1e-5  # padding after EOT changes nothing (causal)


def test_small_matches_transformers_and_options(small, prompts_ids):
    sd, expected = small
    hf = _hf_model(SMALL, _openai_to_hf(sd))
    with torch.no_grad():
        theirs = hf(input_ids=prompts_ids).text_embeds
    assert expected.shape == (4, 48)
    assert (expected - theirs).abs().max() < 1e-5
    assert TextConfig.from_state_dict(sd) == SMALL

    encoder = CLIPTextEncoder(SMALL, normalize=True).eval()
    encoder.load_state_dict(sd)
    with torch.no_grad():
        normed = encoder(prompts_ids)
    assert torch.allclose(normed, F.normalize(expected, dim=-1), atol=1e-6)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(4), atol=1e-6)
    with pytest.raises(ValueError, match="context_length"):
        encoder(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_low_precision(small, prompts_ids, tmp_path, dtype, tol):
    sd, expected = small
    torch.save(sd, tmp_path / "w.pt")
    encoder = load_text_encoder(tmp_path / "w.pt", dtype=dtype)
    with torch.no_grad():
        out = encoder(prompts_ids)
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max() < tol * expected.abs().max()


def _loaded_embeddings(path, prompts_ids):
    encoder = load_text_encoder(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(k.split(".")[0] in {"token_embedding", "positional_embedding", "transformer", "ln_final",
                                   "text_projection"} for k in encoder.state_dict())  # fmt: skip
    with torch.no_grad():
        return encoder(prompts_ids)


def _image_tower_keys(prefix: str) -> dict:
    return {
        f"{prefix}conv1.weight": torch.randn(8, 3, 4, 4),
        f"{prefix}transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8),
        f"{prefix}ln_post.weight": torch.randn(8),
    }


def test_openai_and_open_clip_layouts(small, prompts_ids, tmp_path):
    sd, expected = small
    full = {**sd, **_image_tower_keys("visual."), "logit_scale": torch.tensor(4.6)}
    full.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(full, tmp_path / "openai.pt")
    assert torch.equal(_loaded_embeddings(tmp_path / "openai.pt", prompts_ids), expected)

    # open_clip training checkpoint: nested under "state_dict", DDP "module." prefix, legacy serialisation
    nested = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in full.items()}}
    torch.save(nested, tmp_path / "open_clip.bin", _use_new_zipfile_serialization=False)
    assert torch.equal(_loaded_embeddings(tmp_path / "open_clip.bin", prompts_ids), expected)

    # open_clip CustomTextCLIP keeps the tower under "text."
    torch.save({**{f"text.{k}": v for k, v in sd.items()}, **_image_tower_keys("visual.")}, tmp_path / "custom.pt")
    assert torch.equal(_loaded_embeddings(tmp_path / "custom.pt", prompts_ids), expected)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_archive(small, prompts_ids, tmp_path):
    """Like OpenAI's ViT-B-32.pt: a TorchScript archive of the whole CLIP with top-level text keys."""
    sd, expected = small
    whole = CLIPTextEncoder(SMALL).eval()
    whole.load_state_dict(sd)
    whole.visual = torch.nn.Linear(8, 8)  # stands for the image tower, which must be dropped
    whole.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
    with torch.no_grad():
        traced = torch.jit.trace(whole, prompts_ids[:1])
    traced.save(str(tmp_path / "ViT-B-32.pt"))
    assert "visual.weight" in torch.jit.load(str(tmp_path / "ViT-B-32.pt")).state_dict()
    assert torch.equal(_loaded_embeddings(tmp_path / "ViT-B-32.pt", prompts_ids), expected)


def test_hugging_face_layouts(small, prompts_ids, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd, expected = small
    hf_sd = _openai_to_hf(sd)
    (tmp_path / "bin").mkdir()
    torch.save(hf_sd, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "st").mkdir()
    safetensors_torch.save_file(hf_sd, str(tmp_path / "st" / "model.safetensors"))
    # full CLIPModel: text and vision towers side by side, here also under a "model." prefix
    full = {**hf_sd, "vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 4, 4),
            "visual_projection.weight": torch.randn(48, 8), "logit_scale": torch.tensor(2.6)}  # fmt: skip
    safetensors_torch.save_file({f"model.{k}": v for k, v in full.items()}, str(tmp_path / "full.safetensors"))
    torch.save(full, tmp_path / "full.bin")
    for path in ["bin", "st", "bin/pytorch_model.bin", "st/model.safetensors", "full.safetensors", "full.bin"]:
        assert torch.equal(_loaded_embeddings(tmp_path / path, prompts_ids), expected), path


def _randomize(model: torch.nn.Module) -> None:
    """Random biases and LayerNorm affines, so that the mapping of each matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
            elif "layer_norm" in name:
                p.normal_(1, 0.1)


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_hugging_face_config_sets_activation_heads_and_eps(prompts_ids, tmp_path, activation):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, projection_dim=48,
        hidden_act=activation, layer_norm_eps=1e-3,
    )  # fmt: skip
    hf = transformers.CLIPTextModelWithProjection(config).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        theirs = hf(input_ids=prompts_ids).text_embeds
    for path in [tmp_path / "hf", tmp_path / "hf" / "model.safetensors"]:  # config.json beside the file counts
        encoder = load_text_encoder(path)
        assert (encoder.config.activation, encoder.config.heads, encoder.config.layer_norm_eps) == (activation, 4, 1e-3)
        with torch.no_grad():
            assert (encoder(prompts_ids) - theirs).abs().max() < 1e-5, path
    # without config.json the same tensors mean OpenAI's tower (QuickGELU, 64 // 64 = 1 head): clearly other numbers
    torch.save(hf.state_dict(), tmp_path / "bare.bin")
    bare = load_text_encoder(tmp_path / "bare.bin")
    assert (bare.config.activation, bare.config.heads, bare.config.layer_norm_eps) == ("quick_gelu", 1, 1e-5)
    with torch.no_grad():
        assert (bare(prompts_ids) - theirs).abs().max() > 1e-2


def test_activation_option_for_state_dicts_that_do_not_record_it(prompts_ids, tmp_path):
    # open_clip's LAION towers are OpenAI's layout with nn.GELU; nothing in their state dict says so.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, projection_dim=48,
        hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.CLIPTextModelWithProjection(config).eval()
    _randomize(hf)
    with torch.no_grad():
        theirs = hf(input_ids=prompts_ids).text_embeds
    torch.save(hf.state_dict(), tmp_path / "bare.bin")
    with torch.no_grad():
        assert (load_text_encoder(tmp_path / "bare.bin")(prompts_ids) - theirs).abs().max() > 1e-3
        encoder = load_text_encoder(tmp_path / "bare.bin", activation="gelu")
        assert encoder.config.activation == "gelu"
        assert (encoder(prompts_ids) - theirs).abs().max() < 1e-5
    with pytest.raises(ValueError, match="activation 'swish' is not supported"):
        load_text_encoder(tmp_path / "missing.bin", activation="swish")


def test_hugging_face_clip_model_config_and_bad_configs(prompts_ids, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, projection_dim=32,
                hidden_act="gelu")  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)  # fmt: skip
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.eval()
    _randomize(model)
    model.save_pretrained(tmp_path / "clip")
    with torch.no_grad():
        theirs = model.text_projection(model.text_model(input_ids=prompts_ids).pooler_output)
        encoder = load_text_encoder(tmp_path / "clip")
        assert (encoder.config.activation, encoder.config.heads) == ("gelu", 2)  # read from text_config
        assert (encoder(prompts_ids) - theirs).abs().max() < 1e-5

    config_file = tmp_path / "clip" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["hidden_act"] = "relu"
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"config\.json: hidden_act 'relu' is not supported; supported: gelu,"):
        load_text_encoder(tmp_path / "clip")
    config["text_config"].update(hidden_act="gelu", num_attention_heads=3)  # 64 is not divisible by 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="clip: the weights do not fit.*width 64 is not divisible by heads 3"):
        load_text_encoder(tmp_path / "clip")
    config["text_config"]["num_attention_heads"] = "4"
    config_file.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="num_attention_heads must be a positive integer, got '4'"):
        load_text_encoder(tmp_path / "clip")
    config_file.write_text("{not json")
    with pytest.raises(WeightsError, match=r"cannot read .*config\.json"):
        load_text_encoder(tmp_path / "clip")


def test_hugging_face_keys_without_text_model_prefix(small, prompts_ids, tmp_path):
    sd, expected = small
    hf_sd = {k.removeprefix("text_model."): v for k, v in _openai_to_hf(sd).items()}
    assert "embeddings.token_embedding.weight" in hf_sd and "text_projection.weight" in hf_sd
    torch.save(hf_sd, tmp_path / "unprefixed.bin")
    assert torch.equal(_loaded_embeddings(tmp_path / "unprefixed.bin", prompts_ids), expected)
    # a CLIPTextModel has no projection: say so, not that positional_embedding etc. are missing
    torch.save({k: v for k, v in hf_sd.items() if k != "text_projection.weight"}, tmp_path / "noproj.bin")
    with pytest.raises(WeightsError, match=r"noproj\.bin: the text tower lacks 'text_projection\.weight'"):
        load_text_encoder(tmp_path / "noproj.bin")


def test_activation_names_are_checked():
    with pytest.raises(ValueError, match="activation 'swish' is not supported"):
        CLIPTextEncoder(TextConfig(width=64, layers=1, heads=1, embed_dim=8, activation="swish"))


def test_safetensors_reader(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "i64": torch.arange(-5, 6),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "scalar": torch.tensor(1.5),
    }
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    ours = read_safetensors(tmp_path / "t.safetensors")
    assert set(ours) == set(tensors)
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_bad_files_give_clear_errors(small, tmp_path):
    sd, _ = small
    torch.save(sd, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.bin").write_bytes(b"this is not a checkpoint at all" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file(_openai_to_hf(sd), str(tmp_path / "m.safetensors"))
    st = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(st[: len(st) - 1000])
    for name in ["truncated.pt", "garbage.bin", "empty.pt", "truncated.safetensors"]:
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            load_text_encoder(tmp_path / name)

    torch.save({"conv.weight": torch.randn(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="other.pt.*no CLIP text tower"):
        load_text_encoder(tmp_path / "other.pt")
    torch.save({k: v for k, v in sd.items() if k != "text_projection"}, tmp_path / "noproj.pt")
    with pytest.raises(WeightsError, match="text_projection"):
        load_text_encoder(tmp_path / "noproj.pt")
    hf_no_proj = {k: v for k, v in _openai_to_hf(sd).items() if k != "text_projection.weight"}
    with pytest.raises(WeightsError, match="text_projection"):
        text_state_dict(hf_no_proj)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(WeightsError, match="emptydir"):
        read_weights(tmp_path / "emptydir")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_text_encoder(tmp_path / "missing.pt")


class _FakeResponse(io.BytesIO):
    """What urlopen returns: a readable context manager."""


def test_download_offline_fails_fast_and_clearly(monkeypatch, tmp_path):
    calls = []

    def offline(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError, match="could not download .*; pass --clip_weights PATH") as err:
        load_text_encoder(download=True, cache_dir=tmp_path)
    assert "--text" not in str(err.value)  # a flag of train.py, which adds it; python -m mulmodseg.text has none
    assert calls == [(OPENAI_VIT_B_32_URL, 15.0)]
    assert list(tmp_path.iterdir()) == []  # no partial file left

    with pytest.raises(WeightsUnavailableError, match="--clip_weights PATH"):
        load_text_encoder(cache_dir=tmp_path)  # nothing cached, no download allowed
    assert len(calls) == 1


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_downloaded_file_gets_the_umask_mode(monkeypatch, tmp_path, umask):
    content = b"weights"
    url = f"https://example.invalid/clip/models/{hashlib.sha256(content).hexdigest()}/ViT-B-32.pt"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(content))
    for mask, mode in [(0o027, 0o640), (0o002, 0o664)]:
        umask(mask)
        (tmp_path / "ViT-B-32.pt").unlink(missing_ok=True)
        path = download_weights(url, cache_dir=tmp_path)
        assert path.stat().st_mode & 0o777 == mode  # not mkstemp's 0o600


def test_download_checks_hash_and_caches(monkeypatch, tmp_path, small, prompts_ids):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(b"not the weights"))
    with pytest.raises(WeightsUnavailableError, match="SHA-256"):
        download_weights(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []

    sd, expected = small
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    content = buffer.getvalue()
    url = f"https://example.invalid/clip/models/{hashlib.sha256(content).hexdigest()}/ViT-B-32.pt"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(content))
    path = download_weights(url, cache_dir=tmp_path)
    assert path == tmp_path / "ViT-B-32.pt" and path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["ViT-B-32.pt"]

    def no_network(url, timeout=None):
        raise AssertionError("a cached file with the right hash must not be downloaded again")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert download_weights(url, cache_dir=tmp_path) == path
    # without a path, the cached ViT-B-32.pt is used
    encoder = load_text_encoder(cache_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(encoder(prompts_ids), expected)
