import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mirage.errors import UsageError
from mirage.illusions.filters import (
    KINDS,
    gaussian_blur,
    grayscale,
    lowpass,
    make_components,
    motion_kernel,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [8, 28, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_components_add_up_to_the_identity(kind, size):
    x = rand(2, 3, size, size)
    parts = make_components(kind, size)
    assert len(parts) == (3 if kind == "lowmidhigh" else 2)
    assert torch.allclose(sum(p(x) for p in parts), x, atol=1e-5)
    if size >= 28:  # (at 8 px the finest split, sigma 1/8 px, leaves nothing above it)
        assert all(p(x).abs().mean() > 1e-2 for p in parts)


def test_components_add_up_at_256_px():
    x = rand(1, 3, 256, 256)
    assert torch.allclose(sum(p(x) for p in make_components("lowhigh", 256)), x, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_components_are_linear(kind):
    x, y = rand(1, 3, 28, 28, seed=1), rand(1, 3, 28, 28, seed=2)
    for part in make_components(kind, 28):
        assert torch.allclose(part(2 * x - 3 * y), 2 * part(x) - 3 * part(y), atol=1e-4)


def test_component_names_are_what_the_cli_calls_them():
    assert [p.name for p in make_components("lowmidhigh", 64)] == ["low", "mid", "high"]
    assert [p.name for p in make_components("graycolor", 64)] == ["gray", "color"]
    assert [p.name for p in make_components("motion", 64)] == ["motion", "still"]


def test_lowpass_removes_high_frequencies_and_keeps_low_ones():
    size = 64
    low, high = make_components("lowhigh", size)
    checker = (torch.arange(size)[:, None] + torch.arange(size)[None, :]) % 2 * 2.0 - 1
    checker = checker.expand(1, 3, size, size)
    assert low(checker).abs().max() < 1e-3  # the finest pattern is gone from the low pass...
    assert torch.allclose(high(checker), checker, atol=1e-3)  # ...and all in the high pass
    flat = torch.full((1, 3, size, size), 0.3)
    assert torch.allclose(low(flat), flat, atol=1e-6) and high(flat).abs().max() < 1e-6

    x = rand(1, 3, size, size)
    spectrum = lambda im: torch.fft.fft2(im).abs() ** 2  # noqa: E731
    f = torch.fft.fftfreq(size).abs()
    fine = (f[:, None] > 0.25) | (f[None, :] > 0.25)
    assert spectrum(low(x))[..., fine].sum() < 1e-3 * spectrum(x)[..., fine].sum()
    assert spectrum(high(x))[..., ~fine].sum() < spectrum(x)[..., ~fine].sum()


def test_band_split_orders_frequencies():
    size = 64
    low, mid, high = make_components("lowmidhigh", size)
    x = rand(1, 1, size, size)
    f = torch.fft.fftfreq(size).abs()
    radius = torch.maximum(f[:, None], f[None, :])

    def centre_of_mass(part):
        power = torch.fft.fft2(part(x)).abs() ** 2
        return float((power * radius).sum() / power.sum())

    assert centre_of_mass(low) < centre_of_mass(mid) < centre_of_mass(high)


def test_filter_sizes_scale_with_resolution():
    for size, kernel, sigma in [(64, 33, 2.0), (256, 129, 8.0), (28, 15, 0.875)]:
        x = rand(1, 3, size, size)
        assert torch.allclose(lowpass(size)(x), gaussian_blur(x, kernel, sigma), atol=1e-6)
    # the same picture at 4x the resolution is blurred by the same amount (relative to its size)
    x = gaussian_blur(rand(1, 3, 64, 64), 9, 1.5)
    up = lambda im: F.interpolate(im, scale_factor=4, mode="bilinear", align_corners=False)  # noqa: E731
    a, b = lowpass(256)(up(x)), up(lowpass(64)(x))
    inner = (..., slice(40, -40), slice(40, -40))  # away from the borders, where upsampling differs
    assert (a - b)[inner].norm() / b[inner].norm() < 0.02  # (unscaled, sigma 2 at 256 px, gives 0.8)


def test_gaussian_blur_matches_a_direct_reflect_padded_convolution():
    x = rand(1, 2, 9, 9)
    out = gaussian_blur(x, 5, 1.3)
    r = np.arange(5) - 2
    k1 = np.exp(-0.5 * (r / 1.3) ** 2)
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    direct = np.zeros_like(x.numpy())
    for i in range(9):
        for j in range(9):
            direct[..., i, j] = (padded[..., i:i + 5, j:j + 5] * k2).sum((-1, -2))
    assert np.allclose(out.numpy(), direct, atol=1e-5)
    with pytest.raises(UsageError):
        gaussian_blur(x, 4, 1.0)
    with pytest.raises(UsageError):
        gaussian_blur(x, 5, 0.0)


def test_gray_component_has_equal_channels_and_color_has_none_of_it():
    x = rand(2, 3, 16, 16)
    gray, color = make_components("graycolor", 16)
    g = gray(x)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert torch.allclose(g[:, 0], x.mean(1))
    assert color(x).mean(1).abs().max() < 1e-6
    assert torch.equal(grayscale(x), g)


def test_motion_kernel_is_a_normalised_line_at_its_angle():
    flat = motion_kernel(7, 0)
    assert torch.isclose(flat.sum(), torch.tensor(1.0, dtype=flat.dtype))
    c = flat.shape[0] // 2
    assert flat[c].sum() > 0.999 and (flat[c] > 0).sum() == 7  # one row, 7 taps
    upright = motion_kernel(7, 90)
    assert upright[:, c].sum() > 0.999
    diagonal = motion_kernel(9, 45)
    assert torch.allclose(diagonal, diagonal.flip(0, 1))  # symmetric about the centre
    assert diagonal[0, -1] + diagonal[1, -2] > diagonal[0, 0] + diagonal[1, 1]  # up and to the right


def test_motion_blur_smears_across_its_direction_not_along_it():
    size = 64
    blur, still = make_components("motion", size)
    i = torch.arange(size)
    along = ((i[:, None] + i[None, :]) % 4 < 2).float()[None, None] * 2 - 1  # stripes running up-right
    across = ((i[:, None] - i[None, :]) % 4 < 2).float()[None, None] * 2 - 1
    inner = (..., slice(8, -8), slice(8, -8))
    assert blur(along)[inner].std() > 0.5  # the blur runs up-right (45 degrees): these stripes survive
    assert blur(across)[inner].std() < 0.1  # and these are wiped out
    assert torch.allclose(blur(along) + still(along), along, atol=1e-5)


def test_bad_kind_and_wrong_size():
    with pytest.raises(UsageError) as err:
        make_components("sharp", 64)
    assert all(k in str(err.value) for k in KINDS)
    low, _ = make_components("lowhigh", 64)
    with pytest.raises(UsageError, match="64"):
        low(torch.zeros(1, 3, 32, 32))


def test_sigma_sets_the_low_high_split():
    x = rand(2, 1, 28, 28)
    default, wider = make_components("lowhigh", 28), make_components("lowhigh", 28, sigma=4.0)
    assert torch.allclose(wider[0](x) + wider[1](x), x, atol=1e-5)
    assert wider[0](x).std() < default[0](x).std()  # a wider blur keeps less of the image in the low pass
    with pytest.raises(UsageError):
        make_components("lowhigh", 28, sigma=0.0)
