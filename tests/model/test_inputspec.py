"""InputSpec: what each source's weights expect, turned into the per-channel (mean, std) applied to
0..255 pixels, checked against each source's own preprocessing written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from alexnet_pipe.model.inputspec import InputSpec

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # H x W x RGB


def test_torchvision_input_is_unit_range_rgb_with_imagenet_mean_and_std():
    spec = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "RGB", (0.0, 1.0))
    expected = (PIXELS / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(spec.normalize(PIXELS), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_caffe_input_is_bgr_255_minus_the_bgr_mean():
    spec = InputSpec(227, (122.7, 116.7, 104.0), None, "BGR")
    expected = PIXELS[..., ::-1].astype(np.float64) - np.array([104.0, 116.7, 122.7])  # Caffe's B, G, R mean
    np.testing.assert_allclose(spec.normalize(PIXELS), expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-4)
    mean, std = spec.pixel_normalization()
    assert mean == pytest.approx((104.0, 116.7, 122.7)) and std == (1.0, 1.0, 1.0)


def test_pixel_normalization_is_what_normalize_applies():
    for spec in (InputSpec(67, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), InputSpec(67, (0.1, 0.2, 0.3), None, "BGR", (0, 1))):
        mean, std = spec.pixel_normalization()
        pixels = PIXELS[..., ::-1] if spec.channel_order == "BGR" else PIXELS
        expected = (pixels - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(spec.normalize(PIXELS), expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)


def test_data_block_round_trip_and_old_files():
    spec = InputSpec(227, (122.7, 116.7, 104.0), None, "BGR", short_side=256)
    assert InputSpec.from_data(spec.to_data(), 227) == spec
    old = {"mean_rgb": [120.0, 115.0, 100.0], "std_rgb": None, "crop": 112}  # before channel order was recorded
    assert InputSpec.from_data(old, 112) == InputSpec(112, (120.0, 115.0, 100.0))
    assert InputSpec.from_data(old, 112).native


@pytest.mark.parametrize("kw, message", [
    ({"channel_order": "GRB"}, "channel order"), ({"value_range": (0.0, 2.0)}, "value range"),
    ({"std_rgb": (1.0, 0.0, 1.0)}, "std values must be > 0"), ({"mean_rgb": (1.0, 2.0)}, "three values"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        InputSpec(224, **kw)
