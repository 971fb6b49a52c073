import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mirage.errors import MirageError, UsageError
from mirage.illusions.animate import illusion_animation, save_gif, save_mp4
from mirage.illusions.views import parse_views
from mirage.io import (
    atomic_write,
    contact_sheet,
    from_pil,
    load_image,
    read_settings,
    save_png,
    to_pil,
    unique_path,
    write_json,
)


def picture(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def only_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# ---- loading ------------------------------------------------------------------------------------
def test_load_gives_a_batch_in_range(tmp_path):
    path = tmp_path / "a.png"
    picture(40, 40).save(path)
    x = load_image(path, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert load_image(path, 28, channels=1).shape == (1, 1, 28, 28)


def test_same_size_load_is_exact(tmp_path):
    path = tmp_path / "a.png"
    pic = picture(16, 16)
    pic.save(path)
    expected = torch.from_numpy(np.array(pic)).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert torch.allclose(load_image(path, 16), expected)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red...
    rgba[:4, :, 3] = 255  # ...opaque in the top half, fully transparent below
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 8)
    assert torch.allclose(x[0, :, :4], torch.tensor([1.0, -1, -1])[:, None, None].expand(3, 4, 8))
    assert torch.allclose(x[0, :, 4:], torch.ones(3, 4, 8))


def test_palette_grayscale_and_16_bit_pictures(tmp_path):
    paletted = picture(8, 8).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    paletted.save(tmp_path / "p.png")
    assert torch.equal(load_image(tmp_path / "p.png", 8), from_pil(paletted.convert("RGB")))
    picture(8, 8, "L").save(tmp_path / "l.png")
    gray = load_image(tmp_path / "l.png", 8)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    deep = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert torch.allclose(load_image(tmp_path / "d.png", 8, channels=1), torch.zeros(1, 1, 8, 8), atol=0.01)


def test_non_square_is_centre_cropped_with_a_note(tmp_path, caplog):
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 20:40] = 255  # only the middle third is white
    Image.fromarray(array).save(tmp_path / "wide.png")
    notes = []
    with caplog.at_level(logging.WARNING):
        x = load_image(tmp_path / "wide.png", 20, notes=notes)
    assert torch.allclose(x, torch.ones(1, 3, 20, 20))
    assert len(notes) == 1 and "cropped" in notes[0] and "60x20" in notes[0]
    assert "cropped" in caplog.text


def test_downsizing_is_antialiased(tmp_path):
    checker = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    Image.fromarray(checker).save(tmp_path / "c.png")
    x = load_image(tmp_path / "c.png", 32, channels=1)
    assert x.abs().max() < 0.1  # mid grey, not an aliased pattern


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing.png", "not found"),
    (lambda d: d, "not a file"),
    (lambda d: (d / "notes.png").write_text("hello") and d / "notes.png", "not an image"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, words):
    with pytest.raises(MirageError) as err:
        load_image(make(tmp_path), 8)
    assert words in only_line(err)


def test_truncated_png_gives_one_line_error(tmp_path):
    picture(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MirageError) as err:
        load_image(tmp_path / "cut.png", 8)
    assert "cut.png" in only_line(err)


def test_pil_round_trip():
    x = torch.randint(0, 256, (1, 3, 5, 7)).float() / 127.5 - 1
    assert torch.allclose(from_pil(to_pil(x)), x, atol=1e-6)
    assert to_pil(x[0]).size == (7, 5) and to_pil(x[:, :1]).mode == "L"
    with pytest.raises(UsageError):
        to_pil(torch.zeros(2, 3, 4, 4))


# ---- writing ------------------------------------------------------------------------------------
SETTINGS = {"prompt": "an oil painting of a snowy village, at dusk", "seed": 3, "views": ["identity", "flip"],
            "stages": [{"model": "IF-I-XL", "steps": 50}], "note": "café ☕"}


def test_png_carries_its_settings(tmp_path):
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    path = save_png(tmp_path / "out.png", x[0], SETTINGS)
    assert read_settings(path) == SETTINGS
    text = Image.open(path).text
    assert json.loads(text["mirage"]) == SETTINGS
    line = text["parameters"]
    assert "\n" not in line and "seed: 3" in line and '"an oil painting of a snowy village, at dusk"' in line
    assert torch.allclose(load_image(path, 8), x, atol=1 / 127)


def test_png_without_settings_reads_as_empty(tmp_path):
    picture(4, 4).save(tmp_path / "plain.png")
    assert read_settings(tmp_path / "plain.png") == {}
    with pytest.raises(MirageError):
        read_settings(tmp_path / "nothing.png")


def test_never_overwrites_and_unique_path_finds_a_free_name(tmp_path):
    target = tmp_path / "img.png"
    save_png(target, picture(4, 4), {"seed": 1})
    before = target.read_bytes()
    with pytest.raises(MirageError) as err:
        save_png(target, picture(4, 4, seed=1), {"seed": 2})
    assert "overwrite" in only_line(err)
    assert target.read_bytes() == before
    assert unique_path(target) == tmp_path / "img-2.png"
    save_png(unique_path(target), picture(4, 4), {})
    assert unique_path(target) == tmp_path / "img-3.png"
    with pytest.raises(MirageError):
        write_json(target, {})


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def explode(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.json", explode)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_file_the_users_umask(tmp_path, umask):
    def private(tmp):  # as safetensors does: a fresh 0600 file
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x")
        os.close(fd)
    old = os.umask(umask)
    try:
        made = atomic_write(tmp_path / "a.bin", private)
        replaced = atomic_write(made, lambda tmp: tmp.write_bytes(b"y"), replace=True)
    finally:
        os.umask(old)
    assert made.stat().st_mode & 0o777 == 0o666 & ~umask
    assert replaced.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_replaces_only_when_asked(tmp_path):
    path = atomic_write(tmp_path / "state.json", lambda tmp: tmp.write_text("old"))
    with pytest.raises(MirageError) as err:
        atomic_write(path, lambda tmp: tmp.write_text("new"))
    assert "overwrite" in only_line(err) and path.read_text() == "old"
    assert atomic_write(path, lambda tmp: tmp.write_text("new"), replace=True) == path
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left behind


def test_write_json(tmp_path):
    path = write_json(tmp_path / "sub" / "result.json", {"images": [{"file": "a.png"}], "é": 1})
    assert json.loads(path.read_text(encoding="utf-8")) == {"images": [{"file": "a.png"}], "é": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


# ---- sheets -------------------------------------------------------------------------------------
def test_contact_sheet_blows_small_images_up_crisply_and_labels_them():
    digit = torch.rand(1, 28, 28) * 2 - 1
    plain = contact_sheet([[digit]])
    assert plain.size == (8 + 196 + 8, 8 + 196 + 8)  # 28 px -> 7x = 196 px, nothing else on it
    cell = np.asarray(plain)[8:8 + 196, 8:8 + 196, 0]
    assert (cell == np.kron(np.asarray(to_pil(digit)), np.ones((7, 7), dtype=np.uint8))).all()  # nearest
    assert (np.asarray(plain)[:8] == 255).all()  # white background

    rows = [[(digit, "identity"), (digit, "flip")], [digit, None]]
    sheet = contact_sheet(rows, title="anagram", col_labels=["a", "b"], row_labels=["seed 0", "seed 1"])
    array = np.asarray(sheet)
    assert sheet.mode == "RGB" and sheet.width > 2 * 196 + 24 and sheet.height > 2 * 196 + 24
    assert (array[:25] < 128).any()  # the title along the top
    assert (array[:, :20] < 128).any()  # row labels down the left
    bottom_right = array[-196:, -196:]
    assert (bottom_right == 255).all()  # the empty cell stays blank


def test_contact_sheet_needs_an_image():
    with pytest.raises(UsageError):
        contact_sheet([[None]])


# ---- animations ---------------------------------------------------------------------------------
def test_gif_has_every_frame_and_never_overwrites(tmp_path):
    frames = [torch.full((3, 16, 16), v) for v in (-1.0, -0.5, 0.0, 0.5, 1.0)]
    path = save_gif(tmp_path / "a.gif", frames, duration=40)
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.info["loop"] == 0 and gif.info["duration"] == 40
    with pytest.raises(MirageError):
        save_gif(path, frames)


def test_illusion_animation_holds_each_view_and_fades_captions(tmp_path):
    img = torch.rand(3, 16, 16) * 2 - 1
    views = parse_views(["identity", "rotate_cw"])
    frames = illusion_animation(img, views, ["a cat", "a dog"], size=64, steps=6, hold=3)
    assert len(frames) == 2 * 3 + 2 * 6  # hold, move, hold, move back
    assert all(f.size == frames[0].size for f in frames) and frames[0].width == 64
    pics = [np.asarray(f) for f in frames]
    image, band = slice(0, 64), slice(64, None)
    still = np.asarray(to_pil(views[0].frames(img, 2, size=64, pad=views[1].margin)[0]).convert("RGB"))
    turned = np.asarray(to_pil(views[1].frames(img, 2, size=64, pad=views[1].margin)[-1]).convert("RGB"))
    assert (pics[0][image] == still).all() and (pics[3 + 6][image] == turned).all()
    assert (pics[0][band] < 128).any() and (pics[9][band] < 128).any()  # a caption under each view...
    assert not np.array_equal(pics[0][band], pics[9][band])  # ...its own
    assert pics[3 + 2][band].min() > pics[0][band].min()  # fading out during the move
    with Image.open(save_gif(tmp_path / "a.gif", frames)) as gif:
        durations = []
        for k in range(gif.n_frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
    assert sum(durations) == len(frames) * 50  # held frames are stored once, for longer


def test_animation_of_three_views_passes_through_the_illusion():
    img = torch.rand(1, 3, 8, 8) * 2 - 1
    frames = illusion_animation(img, parse_views(["identity", "flip", "negate"]), ["a", "b", "c"],
                                size=32, steps=4, hold=2)
    assert len(frames) == 3 * 2 + 4 + (4 + 4 - 1) + 4
    with pytest.raises(UsageError):
        illusion_animation(img, parse_views(["identity", "flip"]), ["only one"])


def test_mp4_without_encoder_is_a_note_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if not installed
    note = save_mp4(tmp_path / "a.mp4", [torch.zeros(3, 8, 8)] * 3)
    assert isinstance(note, str) and "imageio-ffmpeg" in note and "\n" not in note
    assert not (tmp_path / "a.mp4").exists()


def test_mp4_with_encoder(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    frames = [torch.full((3, 15, 15), v) for v in np.linspace(-1, 1, 6)]  # odd sides get padded
    assert save_mp4(tmp_path / "a.mp4", frames, fps=10) is None
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "a.mp4"))
    meta = next(reader)
    assert meta["size"] == (16, 16) and sum(1 for _ in reader) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]
