"""experiments/: every recipe's commands against the real parsers, the data layouts, the collector's
arithmetic, and the recipes end to end on the bundled sample (``--smoke``)."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from experiments import collect, prepare, run
from experiments.recipes import AMOS_LABEL_MAP, MMWHS_LABEL_MAP
from mulmodseg import data as mdata
from mulmodseg.cli import predict as predict_cli
from mulmodseg.cli import train as train_cli
from mulmodseg.cli.text import build_parser as text_parser
from mulmodseg.config import TrainConfig
from mulmodseg.cost import count_parameters
from mulmodseg.metrics import write_metrics_csv
from mulmodseg.model import MulModSeg
from mulmodseg.predict import load_model
from mulmodseg.text import EmbeddingTable
from mulmodseg.text.prompts import model_table, resolve_classes

ROOT = Path(__file__).resolve().parent.parent


def plan_for(tables, tmp_path, *flags):
    args, extra = run.parse_args([*tables, "--out", str(tmp_path / "campaign"), *flags])
    return run.make_plan(args, extra)


def real_flags(tmp_path):
    return ["--amos", str(tmp_path / "amos"), "--mmwhs", str(tmp_path / "mmwhs"), "--clip_weights", "ViT-B-32.pt",
            "--embedding", "biobert=bio.pt", "--embedding", "medclip=med.pt"]


def steps(plan, kind):
    return [s for s in plan.steps if s.kind == kind]


def flag(argv, name):
    return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------------------------------ recipes


def test_every_command_parses_and_keeps_the_papers_settings(tmp_path):
    plan = plan_for(["all"], tmp_path, *real_flags(tmp_path))
    assert not plan.skipped
    for step in steps(plan, "table"):
        a = text_parser().parse_args(step.argv)
        assert (a.clip_weights, a.modalities, a.template) == ("ViT-B-32.pt", ["CT", "MR"], Path(a.out).stem[-2:])
    defaults = TrainConfig()
    for step in steps(plan, "train"):
        config = train_cli.config_from_args(train_cli.build_parser().parse_args(step.argv))
        # Only data, backbone, text and mode differ from the paper's settings (train.py's defaults).
        for name in ("roi_size", "epochs", "warmup_epochs", "lr", "weight_decay", "spacing", "ct_window",
                     "mr_percentiles", "num_samples", "batch_size", "base_channels", "feature_size"):
            assert getattr(config, name) == getattr(defaults, name), (name, step.command())
        num_classes = len(resolve_classes(config.classes))
        assert max(mdata.parse_label_map(config.label_map).values()) == num_classes - 1
        assert config.mode in ("alt", "mix", *config.data_dirs)
        assert sorted(config.data_dirs) == ["CT", "MR"]
    for step in steps(plan, "infer"):
        a = predict_cli.build_parser().parse_args(step.argv)
        assert Path(a.input).name == "imagesTs" and Path(a.labels).name == "labelsTs"
        assert len(a.checkpoint) == 1 and Path(a.checkpoint[0]).parent in {s.out for s in steps(plan, "train")}
    # 12 + 12 main runs; Table 1 adds 5 embeddings (V3 and vision-only are Table 2's), Table 4 four fold
    # runs, Table 5 two ratios, Table 6 two mixes.
    assert len(steps(plan, "train")) == 37
    assert len({s.out for s in plan.steps}) == len(plan.steps)


def test_tables_share_runs_and_each_cell_is_the_right_evaluation(tmp_path):
    t2 = plan_for(["table2"], tmp_path, *real_flags(tmp_path))
    assert (len(steps(t2, "train")), len(steps(t2, "infer"))) == (12, 24)
    shared = plan_for(["table2", "table6", "table7", "table8"], tmp_path, *real_flags(tmp_path))
    assert len(steps(shared, "train")) == 12 + 2  # Table 6's mixed-batch runs are the only new trainings
    assert len(steps(shared, "infer")) == 24 + 4 + 2  # mixes on CT and MR, Table 7's swapped prompts

    entries = shared.manifest["table7"]["entries"]
    swapped = [e for e in entries if e["row"] == "other modality's prompts"]
    assert {(e["column"], e["paper"]) for e in swapped} == {("CT", 86.37), ("MR", 85.10)}
    by_dir = {str(s.out): s.argv for s in steps(shared, "infer")}
    assert {e["column"]: flag(by_dir[e["eval_dir"]], "--prompt_modality") for e in swapped} == {"CT": "MR", "MR": "CT"}
    own = [e for e in shared.manifest["table6"]["entries"] if e["row"] == "vision-only, own modality"]
    assert [(e["column"], e["paper"], Path(e["eval_dir"]).parent.parent.name) for e in own] == [
        ("CT", 81.23, "unet-none-CT"), ("MR", 78.85, "unet-none-MR")]

    t4 = plan_for(["table4"], tmp_path, *real_flags(tmp_path))
    mmwhs = tmp_path / "mmwhs"
    for step in steps(t4, "train"):
        fold = step.out.name.split("-")[-2]  # unet-clip-v3-alt-cv0_ct-mr_all
        assert (flag(step.argv, "--ct_dir"), flag(step.argv, "--mr_dir")) == (
            str(mmwhs / fold.replace("_", "/")), str(mmwhs / "mr_all"))
        assert flag(step.argv, "--label_map") == MMWHS_LABEL_MAP and flag(step.argv, "--classes") == "mmwhs"
    tests = [flag(s.argv, "--input") for s in steps(t4, "infer")]
    assert tests == [str(mmwhs / f"cv{f}/ct/imagesTs") for f in (0, 1)] * 2

    t5 = plan_for(["table5"], tmp_path, *real_flags(tmp_path))
    assert [Path(flag(s.argv, "--ct_dir")).name for s in steps(t5, "train")] == ["ct", "ct_x2", "ct_x3"]
    tests = {flag(s.argv, "--input") for s in steps(t5, "infer")}
    assert tests == {str(tmp_path / "amos" / m / "imagesTs") for m in ("ct", "mr")}
    assert all(flag(s.argv, "--label_map") == AMOS_LABEL_MAP for s in steps(t5, "train"))


def test_user_tables_are_skipped_without_a_file_and_extra_flags_reach_train(tmp_path):
    plan = plan_for(["table1"], tmp_path, "--amos", str(tmp_path), "--", "--num_workers", "8")
    assert len(plan.skipped) == 2 and "--embedding biobert=PATH" in plan.skipped[0]
    assert [e["row"] for e in plan.manifest["table1"]["entries"]][::2] == [
        "vision-only", "one-hot", "CLIP V1", "CLIP V2", "CLIP V3"]
    assert all(s.argv[-4:-2] == ["--num_workers", "8"] for s in steps(plan, "train"))
    assert all("--download" in s.argv for s in steps(plan, "table"))  # no --clip_weights: fetch once
    with pytest.raises(SystemExit, match="needs --mmwhs"):
        plan_for(["table3"], tmp_path)


def test_device_and_amp_reach_training_and_evaluation(tmp_path):
    plan = plan_for(["table8"], tmp_path, "--amos", str(tmp_path), "--device", "cuda:1", "--amp", "none")
    assert steps(plan, "train") and steps(plan, "infer")
    for step in steps(plan, "train") + steps(plan, "infer"):
        assert "--device=cuda:1" in step.argv and "--amp=none" in step.argv
    plain = plan_for(["table8"], tmp_path, "--amos", str(tmp_path))
    assert not any(a.startswith(("--device", "--amp")) for s in plain.steps for a in s.argv)


def test_recipes_train_with_the_reference_ct_augmentation(tmp_path):
    plan = plan_for(["table2"], tmp_path, "--amos", str(tmp_path))
    for step in steps(plan, "train"):
        config = train_cli.config_from_args(train_cli.build_parser().parse_args(step.argv))
        assert (config.rotate_degrees, config.scale_range, config.warp_prob) == (6.0, 0.1, 1.0)
        assert config.warp_modalities == ["CT"]


def test_smoke_plan_uses_the_sample_and_dedupes(tmp_path):
    plan = plan_for(["all"], tmp_path, "--smoke")
    sample = run.SAMPLE
    for step in steps(plan, "train"):
        a = train_cli.build_parser().parse_args(step.argv)
        assert ([Path(d) for d in a.ct_dir], [Path(d) for d in a.mr_dir]) == ([sample / "ct"], [sample / "mr"])
        assert (a.epochs, a.roi_size, a.num_workers) == (1, [32], 0)
        if a.classes == "mmwhs":  # the sample's AMOS ids 1..7 stand for the 7 heart classes
            assert mdata.parse_label_map(a.label_map) == {**{v: v for v in range(1, 8)}, **{v: 0 for v in range(8, 14)}}
    # Ratios and folds differ only in data, which the sample replaces: trained once.
    assert len(steps(plan, "train")) == 37 - 2 - 4
    assert len(steps(plan_for(["table5"], tmp_path, "--smoke"), "train")) == 1


def test_random_tables_have_clip_shape_and_fit_the_trainer(tmp_path):
    for name, template, dim in (("clip", "v2", 512), ("biobert", None, 768)):
        path = tmp_path / f"{name}.pt"
        run.random_table(path, "mmwhs", template, dim)
        table = EmbeddingTable.load(path)
        assert tuple(table.embeddings.shape) == (2, 8, dim) and table.modalities == ("CT", "MR")
        assert table.template == ("There is a {cls} in this {mod}." if template else None)
        assert torch.isfinite(table.embeddings).all() and table.embeddings.std() > 0
        model = MulModSeg("unet", 8, *model_table(path), base_channels=4)
        assert model.text_to_vision.in_features == dim and list(model.classes) == list(resolve_classes("mmwhs"))
    clip = EmbeddingTable.load(tmp_path / "clip.pt").embeddings
    assert not torch.allclose(clip[0], clip[1])  # the modality phrase changes every prompt


def test_a_clip_table_step_builds_into_a_new_tables_folder(tmp_path):
    # A real (not smoke) table step runs the text CLI, which writes only into an existing folder.
    from mulmodseg.text import CLIPTextEncoder
    from mulmodseg.text.clip import TextConfig

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(CLIPTextEncoder(TextConfig(width=64, layers=1, heads=1, embed_dim=16)).state_dict(), weights)
    plan = plan_for(["table3"], tmp_path, "--mmwhs", str(tmp_path / "mmwhs"), "--clip_weights", str(weights))
    table_step = steps(plan, "table")[0]
    assert table_step.out.parent == tmp_path / "campaign" / "tables" and not table_step.out.parent.exists()
    run.execute(table_step)
    table = EmbeddingTable.load(table_step.out, classes=resolve_classes("mmwhs"))
    assert tuple(table.embeddings.shape) == (2, 8, 16) and table.template == "A {mod} of a {cls}."


# ------------------------------------------------------------------------------------------------ data


def tiny_nifti(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full((2, 2, 2), value, dtype=np.int16), np.eye(4)), str(path))


def linked_ids(folder: Path) -> list[str]:
    ids = sorted(mdata.nifti_stem(p) for p in folder.iterdir())
    assert all(p.is_symlink() for p in folder.iterdir())
    return ids


def test_prepare_amos_nested_disjoint_and_seeded(tmp_path):
    src = tmp_path / "amos22"
    ids = [f"amos_{i:04d}" for i in [*range(1, 9), *range(501, 505)]]  # 8 CT, 4 MR
    for i, case in enumerate(ids):
        tiny_nifti(src / "imagesTr" / f"{case}.nii.gz", i)
        tiny_nifti(src / "labelsTr" / f"{case}.nii.gz", 100 + i)
    entries = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ids]
    (src / "dataset.json").write_text(json.dumps({"training": entries[::2], "validation": entries[1::2]}))
    out = tmp_path / "prepared"
    small = ["--train", "2", "--test", "1", "--ratios", "3"]
    assert prepare.main(["amos", "--src", str(src), "--out", str(out), *small]) == 0

    ct_test = linked_ids(out / "ct/imagesTs")
    ct, ct_x3 = linked_ids(out / "ct/imagesTr"), linked_ids(out / "ct_x3/imagesTr")
    mr, mr_test = linked_ids(out / "mr/imagesTr"), linked_ids(out / "mr/imagesTs")
    assert (len(ct_test), len(ct), len(ct_x3), len(mr), len(mr_test)) == (1, 2, 6, 2, 1)
    assert set(ct) < set(ct_x3) and not set(ct_x3) & set(ct_test) and not set(mr) & set(mr_test)
    assert all(int(c[-4:]) <= 500 for c in ct_x3 + ct_test) and all(int(c[-4:]) > 500 for c in mr + mr_test)
    # Image and label of a case point at that case's files, and train.py reads the layout.
    for case in mdata.discover_cases(out / "ct_x3", "CT"):
        value = ids.index(case.id)
        assert nib.load(str(case.image)).get_fdata()[0, 0, 0] == value
        assert nib.load(str(case.label)).get_fdata()[0, 0, 0] == 100 + value
    assert [c.id for c in mdata.discover_cases(out / "mr", "MR", split="test")] == mr_test
    split = json.loads((out / "split.json").read_text())
    assert split["folders"]["ct_x3/imagesTr"] == ct_x3 and split["seed"] == 0

    again = tmp_path / "again"
    prepare.main(["amos", "--src", str(src), "--out", str(again), *small])
    assert json.loads((again / "split.json").read_text())["folders"] == split["folders"]
    assert prepare.main(["amos", "--src", str(src), "--out", str(out)]) == 2  # not empty
    assert prepare.main(["amos", "--src", str(src), "--out", str(tmp_path / "big"), "--train", "5"]) == 2


def test_prepare_mmwhs_challenge_names_splits_and_folds(tmp_path):
    src = tmp_path / "MMWHS"
    for mod in ("ct", "mr"):
        for n in range(1001, 1009):
            tiny_nifti(src / f"{mod}_train" / f"{mod}_train_{n}_image.nii.gz", n)
            tiny_nifti(src / f"{mod}_train" / f"{mod}_train_{n}_label.nii.gz", 205)
    out = tmp_path / "prepared"
    assert prepare.main(["mmwhs", "--src", str(src), "--out", str(out)]) == 0
    for mod in ("ct", "mr"):
        tr, ts = linked_ids(out / mod / "imagesTr"), linked_ids(out / mod / "imagesTs")
        assert (len(tr), len(ts)) == (6, 2) and not set(tr) & set(ts)
        assert linked_ids(out / mod / "labelsTs") == ts
    assert linked_ids(out / "mr_all/imagesTr") == [f"mr_train_{n}" for n in range(1001, 1009)]
    folds = [(linked_ids(out / f"cv{f}/ct/imagesTr"), linked_ids(out / f"cv{f}/ct/imagesTs")) for f in (0, 1)]
    assert folds[0][1] == folds[1][0] and folds[1][1] == folds[0][0] and len(folds[0][1]) == 4
    case = mdata.discover_cases(out / "cv0/ct", "CT", split="test")[0]
    assert nib.load(str(case.image)).get_fdata()[0, 0, 0] == int(case.id[-4:])
    assert mdata.apply_label_map(np.asanyarray(nib.load(str(case.label)).dataobj),
                                 mdata.parse_label_map(MMWHS_LABEL_MAP)).max() == 1

    (src / "ct_train" / "ct_train_1001_label.nii.gz").unlink()
    assert prepare.main(["mmwhs", "--src", str(src), "--out", str(tmp_path / "broken")]) == 2


# ------------------------------------------------------------------------------------------------ collector


def test_collector_pools_folds_and_puts_the_paper_beside(tmp_path):
    names = ["a", "b"]
    nan = np.nan
    fold0, fold1 = tmp_path / "f0", tmp_path / "f1"
    for folder, rows in ((fold0, [[0.5, nan], [1.0, 0.2]]), (fold1, [[0.0, 0.6]])):
        folder.mkdir()
        write_metrics_csv(folder / "metrics.csv", [{"case": f"c{i}", "modality": "CT", "dice": np.array(d)}
                                                   for i, d in enumerate(rows)], names)
    entries = [{"row": "UNet", "column": "CT", "eval_dir": str(d), "paper": 92.72} for d in (fold0, fold1)]
    entries.append({"row": "SwinUNETR", "column": "CT", "eval_dir": str(tmp_path / "missing"), "paper": 93.31})
    manifest = {"table4": {"title": "T4", "kind": "dice", "paper": {}, "smoke": False, "entries": entries}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = collect.collect(tmp_path)
    # a: (0.5 + 1.0 + 0.0) / 3 = 50 %; b: (0.2 + 0.6) / 2 = 40 % (absent case left out); average 45 %.
    assert "| UNet | 50.00 | 40.00 | 45.00 |" in text
    assert "| UNet | 45.00 | 92.72 |" in text
    assert f"| SwinUNETR | {collect.NOT_RUN} | 93.31 |" in text
    names_back, rows = collect.read_metrics_csv(fold0 / "metrics.csv")
    assert names_back == names and np.isnan(rows[0]["dice"][1]) and rows[1]["dice"][1] == pytest.approx(0.2)


def test_folds_train_every_fold_and_evaluate_their_ensemble(tmp_path):
    plan = plan_for(["table2"], tmp_path, *real_flags(tmp_path), "--backbone", "unet", "--folds", "2")
    trains = steps(plan, "train")
    run_dir = Path(flag(trains[0].argv, "--out"))
    assert [(flag(s.argv, "--fold"), flag(s.argv, "--num_folds"), s.out) for s in trains[:2]] == [
        ("0", "2", run_dir / "fold_0"), ("1", "2", run_dir / "fold_1")]
    assert all(flag(s.argv, "--out") == str(run_dir) for s in trains[:2])  # one study: one splits.json
    assert all(train_cli.given_fields(s.argv) >= {"fold", "num_folds"} for s in trains)
    first_eval = steps(plan, "infer")[0].argv
    assert first_eval[first_eval.index("--checkpoint") + 1:first_eval.index("--modality")] == [
        str(run_dir / "fold_0" / "last.pt"), str(run_dir / "fold_1" / "last.pt")]
    predict_cli.build_parser().parse_args(first_eval)
    folds = plan.manifest["table2"]["folds"]
    assert folds[0]["folds"] == [str(run_dir / "fold_0"), str(run_dir / "fold_1")]
    assert {f["folds"][0] for f in folds} == {str(Path(flag(s.argv, "--out")) / "fold_0") for s in trains}
    with pytest.raises(SystemExit, match="--folds 1: give 2 or more folds"):
        plan_for(["table2"], tmp_path, *real_flags(tmp_path), "--folds", "1")
    with pytest.raises(SystemExit, match="--folds with --smoke: the bundled sample holds one scan per modality"):
        plan_for(["table2"], tmp_path, "--smoke", "--folds", "2")


def test_collector_tabulates_fold_means_and_their_mean_and_std(tmp_path):
    nan = np.nan
    # Fold means of the CT validation: (0.5 + 1.0) / 2 = 75 % (b absent), then 55 %; MR 40 % and 60 %.
    for fold, ct, mr in ((0, [[0.5, nan], [1.0, nan]], [[0.4, 0.4]]), (1, [[0.5, 0.6]], [[0.6, 0.6]])):
        for name, rows in (("CT", ct), ("MR", mr)):
            folder = tmp_path / "run" / f"fold_{fold}" / "validation" / name
            folder.mkdir(parents=True)
            write_metrics_csv(folder / "metrics.csv", [{"case": f"c{i}", "modality": name, "dice": np.array(d)}
                                                       for i, d in enumerate(rows)], ["a", "b"])
    folds = [{"row": "UNet", "folds": [str(tmp_path / "run" / f"fold_{k}") for k in range(2)]},
             {"row": "SwinUNETR", "folds": [str(tmp_path / "swin" / f"fold_{k}") for k in range(2)]}]
    manifest = {"table2": {"title": "T2", "kind": "dice", "paper": {}, "smoke": False, "entries": [], "folds": folds}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = collect.collect(tmp_path)
    assert "| UNet | 0 | 75.00 | 40.00 |" in text and "| UNet | 1 | 55.00 | 60.00 |" in text
    # std over the folds with n - 1: |75 - 55| / sqrt(2) = 14.14
    assert "| UNet | mean ± std | 65.00 ± 14.14 | 50.00 ± 14.14 |" in text
    assert f"| SwinUNETR | 0 | {collect.NOT_RUN} | {collect.NOT_RUN} |" in text
    assert f"| SwinUNETR | mean ± std | {collect.NOT_RUN} | {collect.NOT_RUN} |" in text


# ------------------------------------------------------------------------------------------------ end to end


def test_smoke_campaign_end_to_end(tmp_path):
    """Tables 4, 5, 7 and 8 (UNet rows, then Table 4's SwinUNETR rows) on the sample: pooled folds, ratios,
    swapped prompts, cost; a rerun is a no-op; the collector's numbers are the evaluations' own."""
    out = tmp_path / "campaign"
    argv = ["table4", "table5", "table7", "table8", "--smoke", "--backbone", "unet", "--out", str(out)]
    assert run.main(argv) == 0
    run_dirs = sorted(p.parent.name for p in out.glob("*/*/done"))
    assert run_dirs == ["unet-clip-v3-alt", "unet-clip-v3-alt-cv0_ct-mr_all", "unet-none-alt"]
    stamp = (out / "amos/unet-clip-v3-alt/last.pt").stat().st_mtime_ns
    assert run.main(argv) == 0 and (out / "amos/unet-clip-v3-alt/last.pt").stat().st_mtime_ns == stamp
    (out / "amos/unet-clip-v3-alt/done").unlink()  # killed after the last epoch's save, before `done`
    assert run.main(argv) == 0 and (out / "amos/unet-clip-v3-alt/last.pt").stat().st_mtime_ns == stamp
    assert (out / "amos/unet-clip-v3-alt/done").is_file()
    # The other backbone's rows join the same tables.
    assert run.main(["table4", "--smoke", "--backbone", "swinunetr", "--out", str(out)]) == 0

    text = collect.collect(out)
    evals = out / "amos/unet-clip-v3-alt/eval"
    ours = {}
    for name in ("CT", "MR", "CT-promptMR", "MR-promptCT"):
        with open(evals / name / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1
        ours[name] = f"{100 * float(rows[0]['mean']):.2f}"  # one case: the table's average is the case's mean
    assert f"| own modality's prompts | {ours['CT']} | 87.14 | {ours['MR']} | 85.33 |" in text
    assert f"| other modality's prompts | {ours['CT-promptMR']} | 86.37 | {ours['MR-promptCT']} | 85.10 |" in text
    assert f"| 1:1 (35 CT) | {ours['CT']} | 87.14 |" in text and f"| 3:1 (105 CT) | {ours['CT']} | 88.92 |" in text
    assert "smoke run" in text

    model, _ = load_model(out / "amos/unet-clip-v3-alt/last.pt")
    cost = collect.read_cost(evals / "CT" / "summary.md")
    assert cost["params"] == count_parameters(model) and cost["window"] == "32x32x32"
    assert f"| UNet, CLIP V3, ALT | {cost['params'] / 1e6:.2f} | {cost['gflops']:.1f} |" in text
    assert model.text_embeddings.shape == (2, 14, 512)  # the random CLIP-shaped table went into the model

    fold = collect.read_metrics_csv(out / "mmwhs/unet-clip-v3-alt-cv0_ct-mr_all/eval/CT-cv0_ct/metrics.csv")
    assert fold[0] == list(resolve_classes("mmwhs"))[1:]
    assert collect.main([str(out), "--tables", "table4", "--out", str(tmp_path / "t4.md")]) == 0
    t4 = (tmp_path / "t4.md").read_text()
    assert t4.startswith("## Table 4") and "| UNet | " in t4 and "| SwinUNETR | " in t4
    assert "not run" not in t4 and "93.31" in t4
    swin, _ = load_model(out / "mmwhs/swinunetr-clip-v3-alt-cv0_ct-mr_all/last.pt")
    assert swin.backbone_kwargs == {"feature_size": 12} and swin.num_classes == 8


def test_missing_data_is_reported_before_any_work(tmp_path, capsys):
    out = tmp_path / "campaign"
    assert run.main(["table5", "--amos", str(tmp_path / "nowhere"), "--out", str(out), "--clip_weights", "w.pt"]) == 2
    err = capsys.readouterr().err
    assert "--ct_dir" in err and "ct_x3" in err and "--input" in err and "--clip_weights w.pt: no such file" in err
    assert not out.exists()


def test_missing_embedding_files_are_reported_before_any_work(tmp_path, capsys):
    amos = tmp_path / "amos"
    for sub in ("ct", "mr", "ct_test", "mr_test"):
        (amos / sub).mkdir(parents=True)
    weights = tmp_path / "ViT-B-32.pt"
    weights.write_bytes(b"x")
    code = run.main(["table1", "--amos", str(amos), "--out", str(tmp_path / "c"), "--clip_weights", str(weights),
                     "--embedding", f"biobert={tmp_path / 'typo.pt'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"--text {tmp_path / 'typo.pt'}: no such file" in err
    assert "clip-v" not in err  # the CLIP tables are built by earlier steps, not expected to exist yet


def test_dry_run_prints_runnable_commands(tmp_path, capsys):
    assert run.main(["table7", "--amos", "/data/amos", "--out", str(tmp_path), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("python -m mulmodseg.text --download --classes amos --template v3")
    assert [line.split()[1] for line in lines[1:]] == ["train.py", "infer.py", "infer.py", "infer.py", "infer.py"]
    assert not (tmp_path / "manifest.json").exists()

