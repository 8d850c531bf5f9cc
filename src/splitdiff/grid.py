"""Image grids for demos and benchmarks: diffusers' make_image_grid, with a caption above each cell."""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw

LINE = 10  # pixels per caption line at font size 8


def image_grid(images: list[Image.Image | None], rows: int, cols: int, captions: list[str] | None = None,
               cell: int | None = None, lines: int = 1) -> Image.Image:
    """`rows` x `cols` cells in reading order; None leaves a cell blank.

    `cell` resizes every image to that square side first (nearest neighbour, so small
    generations keep their pixels); `captions` (one per cell, `lines` lines at most,
    wrapped to the cell's width) go in a white strip above each image.
    """
    from diffusers.utils import make_image_grid

    first = next(im for im in images if im is not None)
    size = (cell, cell) if cell else first.size
    images = [Image.new("RGB", size, "white") if im is None else
              im.convert("RGB").resize(size, Image.Resampling.NEAREST) if cell else im.convert("RGB")
              for im in images]
    if captions is not None:
        strip = LINE * lines + 3
        labelled = []
        for im, text in zip(images, captions):
            framed = Image.new("RGB", (size[0], size[1] + strip), "white")
            framed.paste(im, (0, strip))
            wrapped = textwrap.wrap(text, width=max(8, size[0] // 5))[:lines]
            ImageDraw.Draw(framed).multiline_text((2, 1), "\n".join(wrapped), fill="black", spacing=0, font_size=8)
            labelled.append(framed)
        images = labelled
    return make_image_grid(images, rows=rows, cols=cols)
