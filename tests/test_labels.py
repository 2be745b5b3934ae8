"""Bad data is refused at load with the file named (issue #14 part B): RGB labels, 16-bit ids,
label/image size mismatches, corrupt files, out-of-range ids, ACDC condition choice."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import H, W, make_acdc, make_cityscapes, make_voc

from transkd_fast.data import ACDC, VOC2012, Cityscapes, DataError, DatasetLayoutError, build_dataset
from transkd_fast.data.cityscapes import CITYSCAPES_PALETTE
from transkd_fast.data.sampler import StepBatchSampler

CITY_LABEL = os.path.join("gtFine", "val", "city0", "city0_000000_000000_gtFine_labelTrainIds.png")
CITY_IDS = os.path.join("gtFine", "val", "city0", "city0_000000_000000_gtFine_labelIds.png")
CITY_IMAGE = os.path.join("leftImg8bit", "val", "city0", "city0_000000_000000_leftImg8bit.png")


def _cityscapes(tmp_path, train_ids: bool = True) -> str:
    root = str(tmp_path / "cs")
    make_cityscapes(root, "val", train_ids=train_ids)
    return root


def _train_ids(root: str) -> np.ndarray:
    with Image.open(os.path.join(root, CITY_LABEL)) as im:
        return np.array(im)


def _index_of(ds, label_path: str) -> int:
    return next(i for i, s in enumerate(ds.samples) if s[1] == label_path)


def test_data_error_is_a_value_error_and_layout_errors_are_data_errors():
    assert issubclass(DataError, ValueError)
    assert issubclass(DatasetLayoutError, DataError) and issubclass(DatasetLayoutError, FileNotFoundError)


# ---- 5: RGB labels -------------------------------------------------------------------------------


def test_rgb_colour_label_is_refused_with_a_hint(tmp_path):
    root = _cityscapes(tmp_path)
    ids = _train_ids(root)
    colour = np.zeros(ids.shape + (3,), np.uint8)
    colour[ids < 19] = CITYSCAPES_PALETTE[ids[ids < 19]]
    path = os.path.join(root, CITY_LABEL)
    Image.fromarray(colour).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError) as e:
        ds[_index_of(ds, path)]
    msg = str(e.value)
    assert path in msg and "RGB" in msg and "colour" in msg


def test_grey_label_saved_as_rgb_is_refused(tmp_path):
    root = _cityscapes(tmp_path)
    ids = _train_ids(root)
    path = os.path.join(root, CITY_LABEL)
    Image.fromarray(np.repeat(ids[..., None], 3, axis=2)).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError, match="single-channel") as e:
        ds.load(_index_of(ds, path))
    assert path in str(e.value) and "channels are equal" in str(e.value)


def test_voc_palette_labels_still_load(tmp_path):
    make_voc(str(tmp_path))
    ds = VOC2012(str(tmp_path), "train")
    _, lab = ds.load(0)
    with Image.open(ds.samples[0][1]) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(lab, np.array(im))


def test_voc_label_resaved_as_rgb_is_refused(tmp_path):
    make_voc(str(tmp_path))
    path = os.path.join(tmp_path, "SegmentationClass", "2007_000039.png")
    with Image.open(path) as im:
        im.convert("RGB").save(path)
    with pytest.raises(DataError, match="2007_000039.png") as e:
        VOC2012(str(tmp_path), "train").load(1)
    assert "palette" in str(e.value)


# ---- 6: 16-bit labels ----------------------------------------------------------------------------


def test_16bit_label_ids_are_not_wrapped(tmp_path):
    root = _cityscapes(tmp_path)
    ids = _train_ids(root).astype(np.uint16)
    path = os.path.join(root, CITY_LABEL)
    Image.fromarray(ids).save(path)  # a valid 16-bit train-id PNG loads unchanged
    with Image.open(path) as im:
        assert im.mode == "I;16"
    ds = Cityscapes(root, "val")
    i = _index_of(ds, path)
    np.testing.assert_array_equal(ds.load(i)[1], ids)
    ids[3, 5] = 263  # 263 mod 256 = 7 (traffic sign): must not load as 7
    Image.fromarray(ids).save(path)
    with pytest.raises(DataError) as e:
        ds.load(i)
    assert path in str(e.value) and "263" in str(e.value)


def test_16bit_label_ids_file_is_not_wrapped(tmp_path):
    root = _cityscapes(tmp_path, train_ids=False)
    path = os.path.join(root, CITY_IDS)
    with Image.open(path) as im:
        ids = np.array(im).astype(np.uint16)
    ids[0, 0] = 256 + 7  # would become 7 (road) after a uint8 cast
    Image.fromarray(ids).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError, match="263") as e:
        ds.load(_index_of(ds, path))
    assert path in str(e.value)


# ---- 7: label size differs from the image --------------------------------------------------------


def test_label_size_mismatch_is_an_error_unless_label_resize(tmp_path):
    root = _cityscapes(tmp_path)
    ids = _train_ids(root)
    path = os.path.join(root, CITY_LABEL)
    half = ids[::2, ::2]
    Image.fromarray(half).save(path)
    ds = Cityscapes(root, "val")
    i = _index_of(ds, path)
    with pytest.raises(DataError) as e:
        ds[i]
    msg = str(e.value)
    assert path in msg and os.path.join(root, CITY_IMAGE) in msg
    assert f"{W // 2}x{H // 2}" in msg and f"{W}x{H}" in msg and "label_resize" in msg
    # opted in: resized (nearest) to the image's size
    ok = build_dataset("cityscapes", "val", root=root, label_resize=True)
    img, lab = ok.load(i)
    assert lab.shape == (H, W) and img.size == (W, H)
    np.testing.assert_array_equal(lab, np.array(Image.fromarray(half).resize((W, H), Image.NEAREST)))


def test_aspect_mismatch_voc_and_acdc(tmp_path):
    make_voc(str(tmp_path / "voc"))
    path = os.path.join(tmp_path, "voc", "SegmentationClass", "2007_000032.png")
    with Image.open(path) as im:
        im.resize((W, H * 2), Image.NEAREST).save(path)
    with pytest.raises(DataError, match=f"{W}x{H * 2}"):
        VOC2012(str(tmp_path / "voc"), "train").load(0)
    assert VOC2012(str(tmp_path / "voc"), "train", label_resize=True).load(0)[1].shape == (H, W)
    make_acdc(str(tmp_path / "acdc"), conds=("night",))
    lab = os.path.join(tmp_path, "acdc", "gt", "night", "train", "GOPR0475",
                       "GOPR0475_frame_000041_gt_labelTrainIds.png")
    with Image.open(lab) as im:
        im.resize((W + 3, H), Image.NEAREST).save(lab)
    with pytest.raises(DataError, match="GOPR0475_frame_000041_rgb_anon.png"):
        ACDC(str(tmp_path / "acdc"), "train").load(0)


# ---- 14a: corrupt files --------------------------------------------------------------------------


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.parametrize("which", ["image", "label"])
def test_truncated_png_names_the_file(tmp_path, which):
    root = _cityscapes(tmp_path)
    path = os.path.join(root, CITY_IMAGE if which == "image" else CITY_LABEL)
    _truncate(path)
    ds = Cityscapes(root, "val")
    ds.transform = None
    loader = torch.utils.data.DataLoader(ds, batch_sampler=StepBatchSampler(len(ds), 4, total_steps=1, seed=0))
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert path in str(e.value) and "truncated" in str(e.value)


def test_garbage_file_names_the_file(tmp_path):
    make_voc(str(tmp_path))
    path = os.path.join(tmp_path, "JPEGImages", "2007_000039.jpg")
    with open(path, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(DataError, match="2007_000039.jpg"):
        VOC2012(str(tmp_path), "train")[1]


def test_16bit_image_is_refused(tmp_path):
    root = _cityscapes(tmp_path)
    path = os.path.join(root, CITY_IMAGE)
    Image.fromarray((np.arange(H * W).reshape(H, W) * 20).astype(np.uint16)).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError, match="I;16") as e:
        ds.load(next(i for i, s in enumerate(ds.samples) if s[0] == path))
    assert path in str(e.value)


# ---- 14b: ids out of range -----------------------------------------------------------------------


def test_out_of_range_train_id_is_refused_at_load(tmp_path):
    root = _cityscapes(tmp_path)
    ids = _train_ids(root)
    ids[1, 1], ids[2, 2] = 50, 19  # 19: the void *output* id is not a valid label either
    path = os.path.join(root, CITY_LABEL)
    Image.fromarray(ids).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError) as e:
        ds.load(_index_of(ds, path))
    msg = str(e.value)
    assert path in msg and "50" in msg and "19" in msg and "[0, 19)" in msg and "255" in msg


def test_out_of_range_voc_index_is_refused(tmp_path):
    make_voc(str(tmp_path))
    path = os.path.join(tmp_path, "SegmentationClass", "2007_000032.png")
    with Image.open(path) as im:
        arr, pal = np.array(im), im.getpalette()
    arr[5, 5] = 30
    im = Image.frombytes("P", (W, H), arr.tobytes())
    im.putpalette(pal)
    im.save(path)
    with pytest.raises(DataError, match="30") as e:
        VOC2012(str(tmp_path), "train").load(0)
    assert path in str(e.value) and "[0, 21)" in str(e.value)


def test_unknown_cityscapes_label_id_is_refused(tmp_path):
    root = _cityscapes(tmp_path, train_ids=False)
    path = os.path.join(root, CITY_IDS)
    with Image.open(path) as im:
        ids = np.array(im)
    ids[0, 0] = 40  # Cityscapes label ids are 0..33 (and 255 for the license plate's -1)
    Image.fromarray(ids).save(path)
    ds = Cityscapes(root, "val")
    with pytest.raises(DataError, match="40") as e:
        ds.load(_index_of(ds, path))
    assert "labelIds" in str(e.value) and "[0, 34)" in str(e.value)


# ---- 14c: ACDC conditions ------------------------------------------------------------------------


def test_acdc_uses_the_conditions_present(tmp_path):
    make_acdc(str(tmp_path), conds=("night",))
    ds = ACDC(str(tmp_path), "train")
    assert ds.conditions == ("night",) and len(ds) == 1
    ds.load(0)
    assert build_dataset("acdc", "train", root=str(tmp_path)).conditions == ("night",)


def test_acdc_explicit_conditions(tmp_path):
    make_acdc(str(tmp_path), conds=("fog", "night", "snow"))
    assert build_dataset("acdc", "train", root=str(tmp_path), conditions=["snow", "fog"]).conditions == ("snow", "fog")
    assert len(build_dataset("acdc", "train", root=str(tmp_path), conditions="night,fog")) == 2
    with pytest.raises(DatasetLayoutError) as e:
        ACDC(str(tmp_path), "train", conditions=("rain",))
    assert os.path.join(str(tmp_path), "rgb_anon", "rain", "train") in str(e.value)
    with pytest.raises(ValueError, match="sunny.*fog, night, rain, snow"):
        ACDC(str(tmp_path), "train", conditions=("sunny",))
    with pytest.raises(ValueError, match="conditions"):
        build_dataset("cityscapes", "train", root=str(tmp_path), conditions=("fog",))


def test_acdc_no_condition_present_says_which_were_looked_for(tmp_path):
    make_acdc(str(tmp_path), conds=("night",))
    with pytest.raises(DatasetLayoutError) as e:
        ACDC(str(tmp_path), "val")
    msg = str(e.value)
    for cond in ("fog", "night", "rain", "snow"):
        assert os.path.join(str(tmp_path), "rgb_anon", cond, "val") in msg
    assert "night (train)" in msg  # what is there instead


def test_check_files_lists_every_bad_file(tmp_path):
    root = _cityscapes(tmp_path)
    ds = Cityscapes(root, "val")
    assert ds.check_files() == []
    bad_label = os.path.join(root, CITY_LABEL)
    Image.fromarray(np.zeros((H, W, 3), np.uint8) + 7).save(bad_label)
    bad_image = ds.samples[3][0]
    _truncate(bad_image)
    errors = ds.check_files()
    assert len(errors) == 2
    assert any(bad_label in e for e in errors) and any(bad_image in e for e in errors)
    assert len(ds.check_files(max_errors=1)) == 1
