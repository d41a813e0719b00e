"""mulmodseg.outputs.plan_outputs refuses, before any inference, what used to fail late or write where it should
not: files that are not NIfTI, an output folder that holds the inputs, a labels folder that does not
exist, names the file system cannot take."""

import shutil
from pathlib import Path

import pytest

from mulmodseg.data import DataError
from mulmodseg.files import name_max
from mulmodseg.outputs import find_inputs, plan_outputs

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
CT = SAMPLE / "ct" / "imagesTr" / "ts_ct_001.nii.gz"


def problems(*args, **kwargs) -> list[str]:
    with pytest.raises(DataError) as err:
        plan_outputs(*args, **kwargs)
    return err.value.problems


def test_a_file_that_is_not_nifti_is_named_with_what_is_read(tmp_path):
    # A .nrrd file, or one without an extension, gave a TypeError traceback (is_extra_channel got None).
    nrrd, bare = tmp_path / "scan.nrrd", tmp_path / "scan"
    for path in (nrrd, bare):
        path.write_bytes(b"NRRD0004")
    message = "not a NIfTI file; only .nii and .nii.gz files are read (convert .nrrd, .mha or DICOM to NIfTI first)"
    assert problems(find_inputs(nrrd), tmp_path / "out") == [f"{nrrd}: {message}"]
    assert problems([bare, CT], tmp_path / "out") == [f"{bare}: {message}"]


def test_an_output_folder_of_the_inputs_is_refused_unless_insisted_on(tmp_path):
    # infer.py -i X/imagesTr -o X/imagesTr wrote case.nii.gz and dataset.json among the scans; the next run on the
    # folder read case.nii.gz as a scan and printed its problem twice.
    images = tmp_path / "X" / "imagesTr"
    images.mkdir(parents=True)
    shutil.copy(CT, images / "case_0000.nii.gz")
    message = ("where label maps would mix with the inputs; choose another --output, or pass --into_input_folder to "
               "write there anyway")
    assert problems(find_inputs(images), images) == [f"--output {images}: the folder of the scans, {message}"]
    assert problems([CT], images / "pred") == [f"--output {images / 'pred'}: inside the dataset folder {images}, "
                                               f"{message}"]
    labels = tmp_path / "labels"
    labels.mkdir()
    shutil.copy(CT, labels / "case_0000.nii.gz")
    assert problems([images / "case_0000.nii.gz"], labels, labels) == [
        f"--output {labels}: the folder of the labels (--labels), {message}"]
    plan = plan_outputs(find_inputs(images), images, into_input_folder=True)
    assert plan.targets == {images / "case_0000.nii.gz": images / "case.nii.gz"}
    shutil.copy(CT, images / "case.nii.gz")  # what that run wrote: each problem is listed once
    found = problems(find_inputs(images), images, into_input_folder=True, overwrite=True)
    assert len(found) == len(set(found)) == 2
    assert found[0] == (f"{images / 'case_0000.nii.gz'}: would write {images / 'case.nii.gz'}, as "
                        f"{images / 'case.nii.gz'} does; rename one of them")


def test_a_labels_folder_that_does_not_exist_is_one_problem(tmp_path):
    scans = [tmp_path / f"s{i}.nii.gz" for i in range(3)]
    for scan in scans:
        shutil.copy(CT, scan)
    assert problems(scans, tmp_path / "out", tmp_path / "none") == [f"--labels {tmp_path / 'none'}: no such folder"]


def test_an_output_name_longer_than_the_file_system_takes(tmp_path):
    # 245 characters: the label map's name fits, the probabilities' (stem + "_probabilities.npz") does not.
    scan = tmp_path / ("s" * 238 + ".nii.gz")
    shutil.copy(CT, scan)
    plan_outputs([scan], tmp_path / "out")
    long = tmp_path / "out" / ("s" * 238 + "_probabilities.npz")
    assert problems([scan], tmp_path / "out", probabilities=True) == [
        f"{long}: its name is 256 bytes long, and the file system of {tmp_path / 'out'} allows {name_max(tmp_path)}; "
        f"shorten the name of {scan}"]
