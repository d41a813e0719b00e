"""Class vocabularies, templates, modality phrases, and the embedding table (build, file format, one-hot,
the reference's raw tensor)."""

import json

import pytest
import torch

from mulmodseg.text import CLASS_SETS, EmbeddingTable, build_embedding_table, tokenize
from mulmodseg.text.__main__ import main
from mulmodseg.text.clip import CLIPTextEncoder, TextConfig
from mulmodseg.text.prompts import make_prompts, modality_phrase, resolve_classes, resolve_template

SMALL = TextConfig(width=64, layers=1, heads=1, embed_dim=32)


def test_class_sets():
    assert len(CLASS_SETS["amos"]) == len(CLASS_SETS["amos_reference"]) == 14
    assert len(CLASS_SETS["mmwhs"]) == 8
    assert all(s[0] == "background" for s in CLASS_SETS.values())
    changed = {a: b for a, b in zip(CLASS_SETS["amos"], CLASS_SETS["amos_reference"]) if a != b}
    assert changed == {"gallbladder": "gall bladder", "aorta": "arota", "inferior vena cava": "postcava"}
    assert CLASS_SETS["mmwhs"][1] == "left ventricle myocardium" and CLASS_SETS["mmwhs"][-1] == "pulmonary artery"


def test_user_classes(tmp_path):
    (tmp_path / "lines.txt").write_text("# heart\nbackground\n\n  left atrium  \naorta\n")
    (tmp_path / "list.json").write_text(json.dumps(["background", "tumour"]))
    assert resolve_classes(tmp_path / "lines.txt") == ("background", "left atrium", "aorta")
    assert resolve_classes(str(tmp_path / "list.json")) == ("background", "tumour")
    assert resolve_classes(["background", "liver"]) == ("background", "liver")
    assert resolve_classes("amos") == CLASS_SETS["amos"]
    with pytest.raises(ValueError, match="unknown class set"):
        resolve_classes("amoss")
    with pytest.raises(ValueError, match="repeat"):
        resolve_classes(["liver", "liver"])
    with pytest.raises(ValueError, match="non-empty"):
        resolve_classes([])


def test_templates_and_modalities():
    assert resolve_template("V3") == "A {mod} of a {cls}."
    assert resolve_template("An image of the {cls}.") == "An image of the {cls}."
    for bad in ["A {mod} scan", "A {cls} in {organ}", "{0} {cls}"]:
        with pytest.raises(ValueError, match="cls"):
            resolve_template(bad)
    assert modality_phrase("CT") == "computed tomography imaging"
    assert modality_phrase("mr") == "magnetic resonance imaging"
    assert modality_phrase("PET") == "PET"
    assert (
        modality_phrase("T1", {"T1": "T1-weighted magnetic resonance imaging"})
        == "T1-weighted magnetic resonance imaging"
    )
    prompts = make_prompts(("background", "spleen"), ["CT", "MR"], "v3")
    assert prompts == (
        ("A computed tomography imaging of a background.", "A computed tomography imaging of a spleen."),
        ("A magnetic resonance imaging of a background.", "A magnetic resonance imaging of a spleen."),
    )
    assert make_prompts(("liver",), ["CT"], "v2") == (("There is a liver in this computed tomography imaging.",),)
    assert make_prompts(("liver",), ["CT", "MR"], "v1") == (("A photo of a liver.",), ("A photo of a liver.",))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return CLIPTextEncoder(SMALL, name="clip:test").eval()


def test_build_table_matches_one_by_one(encoder):
    table = build_embedding_table(encoder, "mmwhs", ["CT", "MR", "PET"], "v2")
    assert table.embeddings.shape == (3, 8, 32) and table.embeddings.dtype == torch.float32
    assert table.modalities == ("CT", "MR", "PET") and table.classes == CLASS_SETS["mmwhs"]
    assert table.template == "There is a {cls} in this {mod}." and table.encoder == "clip:test"
    with torch.no_grad():
        single = encoder(tokenize("There is a pulmonary artery in this PET."))[0]
        ct_row = encoder(tokenize(list(make_prompts(CLASS_SETS["mmwhs"], ["CT"], "v2")[0])))
    assert torch.allclose(table.row("PET")[7], single, atol=1e-5)
    assert torch.allclose(table.row("CT"), ct_row, atol=1e-5)
    with pytest.raises(KeyError, match="T2"):
        table.row("T2")
    assert not table.embeddings.requires_grad


def test_save_load_round_trip(encoder, tmp_path):
    table = build_embedding_table(encoder, ["background", "liver"], ["MR", "CT"], "v3")
    table.save(tmp_path / "t.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]  # no temporary file left
    loaded = EmbeddingTable.load(tmp_path / "t.pt")
    assert loaded.modalities == ("MR", "CT") and loaded.classes == ("background", "liver")
    assert loaded.template == "A {mod} of a {cls}." and loaded.encoder == "clip:test"
    assert torch.equal(loaded.embeddings, table.embeddings)
    again = EmbeddingTable.from_dict(table.to_dict())
    assert (again.modalities, again.classes, again.template) == (table.modalities, table.classes, table.template)
    with pytest.raises(ValueError, match="not an embedding table"):
        EmbeddingTable.from_dict({"embeddings": table.embeddings})


def test_reference_tensor(tmp_path):
    raw = torch.randn(2, 14, 512).half()  # as the reference saved it: fp16, MR then CT
    torch.save(raw, tmp_path / "CLIP_V3_mod_cls_txt_encoding.pth")
    table = EmbeddingTable.load(tmp_path / "CLIP_V3_mod_cls_txt_encoding.pth")
    assert table.modalities == ("MR", "CT") and table.classes == CLASS_SETS["amos_reference"]
    assert table.embeddings.dtype == torch.float32 and table.encoder == "reference"
    assert torch.equal(table.row("MR"), raw[0].float()) and torch.equal(table.row("CT"), raw[1].float())

    torch.save(torch.randn(2, 3, 16), tmp_path / "three.pth")
    with pytest.raises(ValueError, match="classes"):
        EmbeddingTable.load(tmp_path / "three.pth")
    assert EmbeddingTable.load(tmp_path / "three.pth", classes=["a", "b", "c"]).classes == ("a", "b", "c")
    torch.save(torch.randn(14, 512), tmp_path / "slice.pth")
    with pytest.raises(ValueError, match=r"\(2, K, D\)"):
        EmbeddingTable.load(tmp_path / "slice.pth")


def test_onehot():
    table = EmbeddingTable.onehot(["CT", "MR"], ["background", "liver", "spleen"])
    assert table.embeddings.shape == (2, 3, 5) and table.encoder == "onehot"
    assert table.row("MR")[2].tolist() == [0, 1, 0, 0, 1]
    assert table.row("CT")[0].tolist() == [1, 0, 1, 0, 0]
    flat = table.embeddings.reshape(6, 5)
    assert len({tuple(r.tolist()) for r in flat}) == 6 and flat.sum(dim=1).eq(2).all()


def test_table_validation():
    with pytest.raises(ValueError, match="do not match"):
        EmbeddingTable(("CT",), ("a", "b"), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="repeat"):
        EmbeddingTable(("CT", "CT"), ("a",), torch.zeros(2, 1, 4))


def test_command_line(encoder, tmp_path, capsys):
    torch.save(encoder.state_dict(), tmp_path / "w.pt")
    (tmp_path / "classes.txt").write_text("background\nliver\n")
    argv = ["--clip_weights", str(tmp_path / "w.pt"), "--classes", str(tmp_path / "classes.txt"),
            "--template", "v3", "--modalities", "CT", "T1", "--phrase", "T1=T1-weighted imaging",
            "--out", str(tmp_path / "out.pt")]  # fmt: skip
    assert main(argv) == 0
    table = EmbeddingTable.load(tmp_path / "out.pt")
    assert table.modalities == ("CT", "T1") and table.embeddings.shape == (2, 2, 32)
    with torch.no_grad():
        expected = encoder(tokenize("A T1-weighted imaging of a liver."))[0]
    assert torch.allclose(table.row("T1")[1], expected, atol=1e-5)
    assert "A T1-weighted imaging of a background." in capsys.readouterr().out

    assert main(["--clip_weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--clip_weights" in capsys.readouterr().out
