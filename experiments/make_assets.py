"""How the demo's pictures in this folder were made (run once, from the repository root, with the `test`
extra installed and the data sets found by mirage.train.data):

    python src/mirage/assets/make_assets.py

- fashion_test.png, digits_test.png: item 0 of the Fashion-MNIST / MNIST test sets (28 px: an ankle boot and
  a 0), the "real test image" of the course for the built-in models.
- fashion_sketch.png, digits_sketch.png: 28-px hand drawings (a T-shirt outline, a 4) as strokes on black,
  the way the data sets draw them.
- photo.png: scikit-image's `chelsea` (a cat, public domain) centre-cropped to 64 px, the test photo for IF.
- sketch64.png: a 64-px line drawing of a house on white, the hand drawing for IF.
"""
from pathlib import Path

from PIL import Image, ImageDraw

from mirage.train.data import load_dataset

HERE = Path(__file__).parents[1] / "src" / "mirage" / "assets"


def strokes(size: int, lines: list[list[tuple[float, float]]], width: int, ink: int, paper: int) -> Image.Image:
    """Polylines given in a 0..1 box, drawn at 4x and downsampled so the edges are soft like a pen's."""
    big = Image.new("L", (4 * size, 4 * size), paper)
    pen = ImageDraw.Draw(big)
    for line in lines:
        pen.line([(x * 4 * size, y * 4 * size) for x, y in line], fill=ink, width=4 * width, joint="curve")
    return big.resize((size, size), Image.Resampling.LANCZOS)


TSHIRT = [[(0.36, 0.18), (0.18, 0.26), (0.08, 0.44), (0.22, 0.50), (0.28, 0.40), (0.28, 0.86), (0.72, 0.86),
           (0.72, 0.40), (0.78, 0.50), (0.92, 0.44), (0.82, 0.26), (0.64, 0.18), (0.50, 0.28), (0.36, 0.18)]]
FOUR = [[(0.58, 0.14), (0.24, 0.62), (0.78, 0.62)], [(0.60, 0.30), (0.60, 0.88)]]
HOUSE = [[(0.18, 0.50), (0.50, 0.18), (0.82, 0.50)], [(0.26, 0.44), (0.26, 0.86), (0.74, 0.86), (0.74, 0.44)],
         [(0.42, 0.86), (0.42, 0.64), (0.56, 0.64), (0.56, 0.86)], [(0.08, 0.86), (0.92, 0.86)],
         [(0.62, 0.30), (0.62, 0.18), (0.70, 0.18), (0.70, 0.38)]]


def main() -> None:
    import skimage.data


    for name in ("fashion", "digits"):
        images, _ = load_dataset(name, "test")
        Image.fromarray(images[0].numpy()).save(HERE / f"{name}_test.png")
    strokes(28, TSHIRT, 2, 255, 0).save(HERE / "fashion_sketch.png")
    strokes(28, FOUR, 3, 255, 0).save(HERE / "digits_sketch.png")
    strokes(64, HOUSE, 2, 0, 255).save(HERE / "sketch64.png")
    cat = Image.fromarray(skimage.data.chelsea())
    side = min(cat.size)
    left = (cat.width - side) // 2
    cat.crop((left, 0, left + side, side)).resize((64, 64), Image.Resampling.LANCZOS).save(HERE / "photo.png")


if __name__ == "__main__":
    main()
