"""Class vocabularies, templates, modality phrases, and the embedding table (build, file format, one-hot,
the reference's raw tensor)."""

import dataclasses
import json
import os

import pytest
import torch

from mulmodseg.cli import text as text_cli
from mulmodseg.cli.text import main
from mulmodseg.text import CLASS_SETS, EmbeddingTable, TableError, build_embedding_table, tokenize
from mulmodseg.text.clip import CLIPTextEncoder, TextConfig
from mulmodseg.text.prompts import make_prompts, modality_phrase, model_table, resolve_classes, resolve_template

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
    with pytest.raises(ValueError, match=r"class names repeat: \['liver', 'liver'\]"):
        resolve_classes(["liver", "liver "])  # the same name once stripped
    (tmp_path / "spaced.json").write_text(json.dumps([" background", "background"]))
    with pytest.raises(ValueError, match="repeat"):
        resolve_classes(tmp_path / "spaced.json")
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
    # a user phrase wins over the built-in one, whatever its case
    assert make_prompts(["liver"], ["CT"], "v3", {"ct": "CT scan"}) == (("A CT scan of a liver.",),)
    assert modality_phrase("ct", {"CT": "CT scan"}) == "CT scan"
    assert modality_phrase("mr", {"ct": "CT scan"}) == "magnetic resonance imaging"
    assert modality_phrase("CT", {"ct": "CT scan", "CT": "exact"}) == "exact"
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


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_saved_table_gets_the_umask_mode(tmp_path, umask):
    table = EmbeddingTable.onehot(["CT"], ["background", "liver"])
    for mask, mode in [(0o027, 0o640), (0o002, 0o664)]:
        umask(mask)
        table.save(tmp_path / f"t{mask:o}.pt")
        assert (tmp_path / f"t{mask:o}.pt").stat().st_mode & 0o777 == mode  # not mkstemp's 0o600


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


def test_model_table_gives_the_models_embeddings_modalities_and_classes(tmp_path):
    onehot, modalities, classes = model_table("onehot", ("CT", "MR"), ("background", "liver"))
    assert torch.equal(onehot, EmbeddingTable.onehot(("CT", "MR"), ("background", "liver")).embeddings)
    assert (modalities, classes) == (("CT", "MR"), ("background", "liver"))
    EmbeddingTable(("MR", "PET"), ("bg", "a"), torch.ones(2, 2, 3)).save(tmp_path / "t.pt")
    saved = model_table(tmp_path / "t.pt", ("CT", "MR"), ("background", "liver"))  # a table brings its names
    assert saved[0].shape == (2, 2, 3) and saved[1:] == (("MR", "PET"), ("bg", "a"))
    assert model_table(None, ["CT"], None) == (None, ("CT",), None)  # vision-only
    with pytest.raises(TableError, match="a one-hot table needs the class names"):
        model_table("onehot", ("CT", "MR"))


def test_table_validation():
    with pytest.raises(ValueError, match="do not match"):
        EmbeddingTable(("CT",), ("a", "b"), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="repeat"):
        EmbeddingTable(("CT", "CT"), ("a",), torch.zeros(2, 1, 4))
    good = {"modalities": ["CT", "MR"], "classes": ["a", "b"], "embeddings": torch.zeros(2, 2, 4)}
    bad = [
        ({"modalities": "CT"}, "modalities must be a non-empty list of non-empty strings, got 'CT'"),
        ({"modalities": ["CT", 3]}, "modalities must be a non-empty list"),
        ({"classes": ["a", 1]}, "classes must be a non-empty list"),
        ({"classes": ["a", " "]}, "classes must be a non-empty list"),
        ({"classes": ["a", "a"]}, r"classes repeat: \['a', 'a'\]"),
        ({"modalities": [], "embeddings": torch.zeros(0, 2, 4)}, "modalities must be a non-empty list"),
        ({"classes": [], "embeddings": torch.zeros(2, 0, 4)}, "classes must be a non-empty list"),
        ({"embeddings": torch.zeros(2, 2, 0)},
         r"shape \(2, 2, 0\) do not match 2 modalities x 2 classes x D \(D >= 1\)"),
        ({"embeddings": torch.zeros(2, 2, 4, dtype=torch.long)}, "floating-point tensor, got torch.int64"),
        ({"embeddings": [[[0.0]]]}, "floating-point tensor, got list"),
        ({"embeddings": torch.tensor([[[0.0], [float("nan")]], [[float("inf")], [1.0]]])}, "2 NaN or infinite"),
        ({"embeddings": torch.full((2, 2, 4), 1e39, dtype=torch.float64)}, "16 NaN or infinite value.*float32"),
    ]
    for change, message in bad:
        with pytest.raises(TableError, match=message):
            EmbeddingTable(**{**good, **change})
    with pytest.raises(TableError, match="template must be a string or None, got int"):
        EmbeddingTable(**good, template=3)
    with pytest.raises(TableError, match="encoder must be a string, got NoneType"):
        EmbeddingTable(**good, encoder=None)


def test_load_rejects_malformed_tables_naming_the_file(tmp_path):
    saved = EmbeddingTable(("CT", "MR"), ("a", "b"), torch.zeros(2, 2, 4), "v3", "test").to_dict()
    bad = [
        ({"modalities": "CT"}, "modalities must be a non-empty list"),
        ({"classes": ["a", 2]}, "classes must be a non-empty list"),
        ({"classes": ["a", "a"]}, "classes repeat"),
        ({"embeddings": torch.full((2, 2, 4), float("nan"))}, "16 NaN"),
        ({"embeddings": torch.zeros(2, 2, 4, dtype=torch.int32)}, "floating-point tensor"),
        ({"version": "1"}, "version must be a positive integer, got '1'"),
        ({"version": 2}, "version 2 is newer than this code"),
        ({"format": None}, "not an embedding table"),
    ]
    for i, (change, message) in enumerate(bad):
        torch.save({**saved, **change}, tmp_path / f"bad{i}.pt")
        with pytest.raises(TableError, match=rf"bad{i}\.pt: .*{message}"):
            EmbeddingTable.load(tmp_path / f"bad{i}.pt")
    torch.save({k: v for k, v in saved.items() if k not in ("classes", "encoder")}, tmp_path / "short.pt")
    with pytest.raises(TableError, match=r"short\.pt: the embedding table lacks \['classes', 'encoder'\]"):
        EmbeddingTable.load(tmp_path / "short.pt")
    torch.save(["not", "a", "table"], tmp_path / "list.pt")
    with pytest.raises(TableError, match=r"list\.pt: neither an embedding table"):
        EmbeddingTable.load(tmp_path / "list.pt")
    torch.save(torch.zeros(2, 3, 4, dtype=torch.long), tmp_path / "ints.pth")
    with pytest.raises(TableError, match=r"ints\.pth: embeddings must be a floating-point tensor"):
        EmbeddingTable.load(tmp_path / "ints.pth", classes=["a", "b", "c"])
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(TableError, match=r"cannot read the embedding table .*garbage\.pt"):
        EmbeddingTable.load(tmp_path / "garbage.pt")
    with pytest.raises(TableError, match=r"embedding table not found: .*missing\.pt"):
        EmbeddingTable.load(tmp_path / "missing.pt")
    with pytest.raises(TableError, match="not an embedding table .*'list'"):
        EmbeddingTable.from_dict([1, 2])


def test_load_checks_class_names_and_order(tmp_path):
    EmbeddingTable(("CT", "MR"), ("background", "liver"), torch.zeros(2, 2, 4)).save(tmp_path / "t.pt")
    assert EmbeddingTable.load(tmp_path / "t.pt", classes=("background", "liver")).classes == ("background", "liver")
    with pytest.raises(TableError, match=r"t\.pt was built for other classes or another order: the table has "
                                         r"\['background', 'liver'\], expected \['liver', 'background'\]"):
        EmbeddingTable.load(tmp_path / "t.pt", classes=["liver", "background"])


def test_train_reports_a_table_for_other_classes_as_a_user_error(tmp_path):
    from mulmodseg.config import TrainConfig, build_table
    from mulmodseg.errors import UserError  # what train.py reports as one line, without a traceback

    EmbeddingTable(("CT", "MR"), ("background", "liver"), torch.zeros(2, 2, 4)).save(tmp_path / "t.pt")
    with pytest.raises(UserError, match=r"expected \['background', 'spleen'\]"):
        build_table(TrainConfig(text=str(tmp_path / "t.pt")), ["CT", "MR"], ("background", "spleen"), tmp_path)


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

    assert main(["--clip_weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2  # as train
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert "--clip_weights" in help_text and "replace --out if it exists" in help_text

    # an existing --out is replaced only with --overwrite
    before = (tmp_path / "out.pt").read_bytes()
    assert main(argv) == 2
    assert f"error: --out {tmp_path / 'out.pt'} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "out.pt").read_bytes() == before
    (tmp_path / "out.pt").write_bytes(b"old")
    assert main([*argv, "--overwrite"]) == 0
    assert EmbeddingTable.load(tmp_path / "out.pt").modalities == ("CT", "T1")

    # --activation reaches the tower: the same weights computed with exact GELU
    assert main([*argv, "--overwrite", "--activation", "gelu"]) == 0
    gelu = CLIPTextEncoder(dataclasses.replace(SMALL, activation="gelu")).eval()
    gelu.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        expected_gelu = gelu(tokenize("A T1-weighted imaging of a liver."))[0]
    got = EmbeddingTable.load(tmp_path / "out.pt").row("T1")[1]
    assert torch.allclose(got, expected_gelu, atol=1e-5) and not torch.allclose(got, expected, atol=1e-3)


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading the encoder fail loudly: the checks under test must come first."""

    def load(*args, **kwargs):
        raise AssertionError("the encoder was loaded before the command line was checked")

    monkeypatch.setattr(text_cli, "load_text_encoder", load)


def test_command_line_never_writes_over_its_inputs(encoder, tmp_path, capsys, no_loading):
    torch.save(encoder.state_dict(), tmp_path / "w.pt")
    (tmp_path / "classes.txt").write_text("background\nliver\n")
    (tmp_path / "hf").mkdir()
    torch.save(encoder.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "link.pt").symlink_to(tmp_path / "w.pt")
    weights, classes = str(tmp_path / "w.pt"), str(tmp_path / "classes.txt")
    cases = [
        ([weights, classes, weights], "is the --clip_weights file"),
        ([weights, classes, str(tmp_path / "link.pt")], "is the --clip_weights file"),
        ([weights, classes, classes], "is the --classes file"),
        ([str(tmp_path / "hf"), "amos", str(tmp_path / "hf" / "pytorch_model.bin")],
         "is inside the --clip_weights folder"),
        ([str(tmp_path / "hf"), "amos", str(tmp_path / "hf" / "new.pt")], "is inside the --clip_weights folder"),
    ]
    contents = {p: p.read_bytes()
                for p in [tmp_path / "w.pt", tmp_path / "classes.txt", tmp_path / "hf" / "pytorch_model.bin"]}
    for (w, c, out), message in cases:
        assert main(["--clip_weights", w, "--classes", c, "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out} ") and message in err and "write the table elsewhere" in err
    assert {p: p.read_bytes() for p in contents} == contents and not (tmp_path / "hf" / "new.pt").exists()
    # without --clip_weights, the cached ViT-B-32.pt is the weights file
    cached = tmp_path / "cache" / "ViT-B-32.pt"
    assert main(["--cache_dir", str(tmp_path / "cache"), "--out", str(cached)]) == 2
    assert "is the --clip_weights file" in capsys.readouterr().err


def test_command_line_checks_output_and_device_first(encoder, tmp_path, capsys, monkeypatch, no_loading):
    torch.save(encoder.state_dict(), tmp_path / "w.pt")
    base = ["--clip_weights", str(tmp_path / "w.pt")]
    cases = [
        (["--out", str(tmp_path / "nofolder" / "t.pt")], f"the folder {tmp_path / 'nofolder'} does not exist"),
        (["--out", str(tmp_path)], f"is a folder; give the table's file name, e.g. --out {tmp_path / 'table.pt'}"),
        (["--out", str(tmp_path / "t.pt"), "--device", "bogus"], "--device bogus: not a device name"),
        (["--out", str(tmp_path / "t.pt"), "--device", "meta"], "--device meta: use cpu, cuda or cuda:N"),
    ]
    for args, message in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--out", str(tmp_path / "t.pt"), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main([*base, "--out", str(tmp_path / "t.pt"), "--device", "cuda:1"]) == 2
    assert "has 1 CUDA device(s), so N in cuda:N must be below 1" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "t.pt"), "--device", "gpu:1"]) == 2  # TotalSegmentator's spelling
    assert "--device gpu:1: this machine has 1 CUDA device(s)" in capsys.readouterr().err
    assert text_cli.device_name("gpu") == "cuda" and text_cli.device_name("gpu:0") == "cuda:0"

    monkeypatch.setattr(text_cli.os, "access", lambda path, mode: False)  # a read-only folder, even for root
    assert main([*base, "--out", str(tmp_path / "t.pt")]) == 2
    assert f"cannot write in the folder {tmp_path}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "w.pt"]
