import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mirage.errors import UsageError
from mirage.illusions.views import VIEW_NAMES, make_view, parse_views

PERMUTATIONS = [n for n in VIEW_NAMES if n != "negate"]
MOVING = [n for n in PERMUTATIONS if n != "identity"]
RANDOM = ["patch_permute", "pixel_permute", "jigsaw"]  # the views whose layout the seed picks


def noise(size, seed=0, lead=(2, 3)):
    return torch.randn(*lead, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [28, 64, 256])
@pytest.mark.parametrize("name", VIEW_NAMES)
def test_inverse_undoes_view_exactly(name, size):
    view = make_view(name, seed=3)
    x = noise(size)
    y = view.view(x)
    assert y.shape == x.shape
    assert torch.equal(view.inverse(y), x)
    assert torch.equal(view.view(view.inverse(x)), x)
    if name != "identity":
        assert not torch.equal(y, x)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(2, 80), name=st.sampled_from(VIEW_NAMES), seed=st.integers(0, 2**31 - 1))
def test_inverse_at_any_size_and_seed(size, name, seed):
    view = make_view(name, seed)
    x = noise(size, lead=(1,))
    assert torch.equal(view.inverse(view.view(x)), x)
    assert torch.equal(view.view(view.inverse(x)), x)


@pytest.mark.parametrize("name", PERMUTATIONS)
def test_permutation_views_keep_gaussian_noise_gaussian(name):
    x = noise(64, seed=1, lead=(4, 3))
    y = make_view(name, seed=2).view(x)
    # the very same values, only moved: the same multiset in every image and channel
    assert torch.equal(y.flatten(-2).sort(-1).values, x.flatten(-2).sort(-1).values)
    assert abs(y.mean().item()) < 0.02 and abs(y.std().item() - 1) < 0.02


def test_negate_keeps_gaussian_noise_gaussian():
    x = noise(64, seed=1, lead=(4, 3))
    y = make_view("negate").view(x)
    assert torch.equal(y, -x)
    assert abs(y.mean().item()) < 0.02 and abs(y.std().item() - 1) < 0.02


@pytest.mark.parametrize("name, expected", [
    ("flip", lambda x: torch.flip(x, (-2,))),  # upside down
    ("mirror", lambda x: torch.flip(x, (-1,))),
    ("rotate_ccw", lambda x: torch.rot90(x, 1, (-2, -1))),
    ("rotate_cw", lambda x: torch.rot90(x, -1, (-2, -1))),
    ("rotate_180", lambda x: torch.rot90(x, 2, (-2, -1))),
    ("identity", lambda x: x),
])
def test_geometric_views_are_what_their_names_say(name, expected):
    for size in (28, 65):
        x = noise(size)
        assert torch.equal(make_view(name).view(x), expected(x))


def test_skew_shifts_each_column_circularly_by_an_amount_growing_across():
    x = noise(28, lead=(1,))
    y = make_view("skew").view(x)
    for col in (0, 5, 27):
        assert torch.equal(y[..., col], torch.roll(x[..., col], col // 2, dims=-1))


def test_inner_circle_turns_the_disc_and_keeps_the_ring():
    x = noise(64, lead=(1,))
    y = make_view("inner_circle").view(x)
    assert torch.equal(y[..., 32, 32], x[..., 31, 31])  # the centre, turned 180 degrees
    assert torch.equal(y[..., 0, :], x[..., 0, :]) and torch.equal(y[..., :, 0], x[..., :, 0])


def test_jigsaw_pieces_have_tabs():
    view = make_view("jigsaw", seed=0)
    pieces = view.pieces(64).piece.reshape(64, 64)
    counts = torch.bincount(pieces.flatten())
    assert (counts[:16] > 0).all()
    assert (counts[:16] != 16 * 16).any()  # not plain squares: tabs move pixels between pieces
    assert not torch.equal(pieces, pieces.T)


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_views_commute_with_upsampling_so_stage_two_sees_the_stage_one_illusion(name):
    view = make_view(name, seed=4)
    x = noise(64, lead=(1, 3))
    up = lambda im: im.repeat_interleave(4, -2).repeat_interleave(4, -1)  # noqa: E731
    assert torch.equal(view.view(up(x)), up(view.view(x)))


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_views_are_deterministic_per_seed(name):
    x = noise(64)
    assert torch.equal(make_view(name, 7).view(x), make_view(name, 7).view(x))


@pytest.mark.parametrize("name", RANDOM)
def test_random_views_differ_across_seeds(name):
    x = noise(64)
    outs = [make_view(name, seed).view(x) for seed in range(4)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])


def test_unknown_view_lists_known_ones():
    with pytest.raises(UsageError) as err:
        make_view("upside_down")
    message = str(err.value)
    assert "upside_down" in message and "\n" not in message
    assert all(name in message for name in VIEW_NAMES)


def test_names_are_forgiving_and_parse_views_reads_lists_and_strings():
    assert make_view("Rotate-CW").name == "rotate_cw"
    assert [v.name for v in parse_views("identity, flip")] == ["identity", "flip"]
    assert [v.name for v in parse_views(["jigsaw", "negate"], seed=2)] == ["jigsaw", "negate"]
    with pytest.raises(UsageError):
        parse_views(["identity", "nope"])


def test_non_square_images_are_refused():
    with pytest.raises(UsageError, match="square"):
        make_view("flip").view(torch.zeros(1, 3, 8, 9))


def test_variance_moves_with_the_pixels_but_keeps_its_sign():
    v = noise(16)
    assert torch.equal(make_view("negate").inverse_variance(v), v)
    flip = make_view("flip")
    assert torch.equal(flip.inverse_variance(v), flip.inverse(v))


@pytest.mark.parametrize("name", VIEW_NAMES)
def test_frames_go_from_the_image_to_its_view(name):
    view = make_view(name, seed=1)
    img = torch.rand(3, 28, 28) * 2 - 1
    frames = view.frames(img, 6)
    assert len(frames) == 6 and all(f.shape == img.shape for f in frames)
    assert torch.equal(frames[0], img) and torch.equal(frames[-1], view.view(img))
    if name != "identity":
        assert not torch.allclose(frames[2], img) and not torch.allclose(frames[2], view.view(img))
    big = view.frames(img, 3, size=100, pad=0.2)
    assert all(f.shape == (3, 100, 100) for f in big)
    assert (big[0][:, :3, :3] == 1).all()  # white margin around the image


@pytest.mark.parametrize("name", MOVING)
def test_pixels_start_where_they_are_and_end_where_the_view_puts_them(name):
    view = make_view(name, seed=5)
    start = view.positions(20, 0.0)
    r = torch.arange(20, dtype=torch.float64)
    assert torch.allclose(start, torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2))
    end = view.positions(20, 1.0).round().long()
    perm, _ = view.permutation(20)
    assert torch.equal(perm[end[:, 0] * 20 + end[:, 1]], torch.arange(400))


def test_frames_need_two_or_more():
    with pytest.raises(UsageError):
        make_view("flip").frames(torch.zeros(3, 8, 8), 1)
