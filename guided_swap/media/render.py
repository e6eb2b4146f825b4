"""Figures composed with numpy and Pillow: panels side by side, a title over each, a colour bar beside each map.

No matplotlib figure is made (a folder run draws one figure per input, and a matplotlib figure costs more than
explaining the image). What is drawn is decided elsewhere (:func:`guided_swap.media.viz.plan`, through
:func:`guided_swap.media.viz.picture`); this module lays out pictures already coloured, and writes text as plain
text: each character as it is, no math text. The font is the DejaVu Sans that matplotlib ships (a glyph the font
lacks shows as a box).

>>> import numpy as np
>>> grey = np.linspace(0.0, 1.0, 256)[:, None].repeat(3, axis=1)
>>> rows = [[Cell(np.zeros((4, 4, 3)), "input\\n$x^$.png"), Cell(np.ones((4, 4, 3)), "map", Bar((0.0, 0.5), grey))]]
>>> p = compose(rows)
>>> p.titles, p.boxes, p.image.mode
([['input\\n$x^$.png', 'map']], [[(8, 44, 168, 204), (186, 44, 346, 204)]], 'RGB')
>>> bar_ticks((0.0, 0.5), 224), bar_ticks((-4.9e-3, 4.9e-3), 224)
((['0.0', '0.1', '0.2', '0.3', '0.4', '0.5'], ''), (['−4', '−2', '0', '2', '4'], '1e−3'))
"""
import io
import math
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

FONT = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
TITLE_SIZE, TICK_SIZE = 13, 10  # pixels: about matplotlib's 9 and 6 points at the folder figures' 110 dpi
MIN_SIDE, MAX_SIDE = 160, 448  # a panel's longer side: smaller pictures are enlarged, larger ones reduced
MARGIN, GAP = 8, 18  # around the figure, between panels
BAR_GAP, BAR_WIDTH, TICK_LENGTH, TICK_PAD = 6, 12, 3, 2
POWER_LIMITS = (-2, 3)  # tick labels as a mantissa and an exponent outside 10^-2 .. 10^3 (matplotlib's bars)
PNG_STRATEGY = zlib.Z_RLE  # lossless like every zlib strategy; on these figures the fastest
MINUS = "\u2212"


@dataclass(frozen=True)
class Bar:
    """A colour bar: ``limits = (low, high)`` and ``colours``, an (N, 3) table in [0, 1] from low to high."""

    limits: Tuple[float, float]
    colours: np.ndarray


@dataclass(frozen=True)
class Cell:
    """One panel: an (H, W, 3) picture in [0, 1], its title (lines split at ``\\n``) and its bar, if any."""

    image: np.ndarray
    title: str
    bar: Optional[Bar] = None


Box = Tuple[int, int, int, int]  # left, top, right, bottom (exclusive), in pixels


class Picture:
    """A composed figure: ``image`` (a Pillow RGB image), the ``titles`` it shows and the ``boxes`` its panels'
    pictures fill, row by row.

    ``savefig`` takes what ``matplotlib.figure.Figure.savefig`` is given for a PNG, so code that saves a figure
    saves a Picture too (``dpi`` is ignored: the pixels are the picture's own)."""

    def __init__(self, image: Image.Image, titles: List[List[str]], boxes: List[List[Box]]):
        self.image, self.titles, self.boxes = image, titles, boxes

    @property
    def size(self) -> Tuple[int, int]:
        return self.image.size

    def savefig(self, fname, format: Optional[str] = "png", dpi=None, metadata: Optional[dict] = None) -> None:
        """Write a PNG to a path or a binary stream, ``metadata`` (str to str) as its text chunks."""
        if format not in (None, "png"):
            raise ValueError(f"a Picture is saved as PNG only, not {format!r}")
        data = png_bytes(np.asarray(self.image), metadata)
        if hasattr(fname, "write"):
            fname.write(data)
            return
        with open(fname, "wb") as stream:
            stream.write(data)

    def _repr_png_(self) -> bytes:  # shown in notebooks
        stream = io.BytesIO()
        self.savefig(stream)
        return stream.getvalue()


def png_bytes(rgb: np.ndarray, metadata: Optional[dict] = None) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes, ``metadata`` as text chunks (``tEXt``, or ``iTXt`` for text beyond
    Latin-1). Each row is stored as its difference from the row above (PNG's "Up" filter) and deflated with
    zlib's run-length strategy: lossless, and about twice as fast as Pillow's encoder on these figures.

    >>> import io
    >>> from PIL import Image
    >>> a = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    >>> with Image.open(io.BytesIO(png_bytes(a, {"note": "$x^$ é €"}))) as image:
    ...     np.array_equal(np.asarray(image), a), image.info["note"]
    (True, '$x^$ é €')
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or not rgb.size:
        raise ValueError(f"png_bytes takes an (H, W, 3) array with pixels, got shape {rgb.shape}")
    height, width, _ = rgb.shape
    rows = rgb.reshape(height, -1).copy()
    rows[1:] -= rgb.reshape(height, -1)[:-1]  # uint8 arithmetic wraps, as the filter wants
    raw = np.concatenate([np.full((height, 1), 2, np.uint8), rows], axis=1)  # 2: "Up"
    raw[0, 0] = 0  # the first row has no row above: stored as it is ("None")
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, PNG_STRATEGY)
    chunks = [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    chunks += [_text_chunk(key, value) for key, value in (metadata or {}).items()]
    chunks += [(b"IDAT", deflate.compress(raw.tobytes()) + deflate.flush()), (b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(struct.pack(">I", len(data)) + kind + data
                                    + struct.pack(">I", zlib.crc32(kind + data)) for kind, data in chunks)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _text_chunk(key: str, value: str) -> Tuple[bytes, bytes]:
    try:
        keyword = key.encode("latin-1")
    except UnicodeEncodeError:
        keyword = b""
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword or "\0" in value:
        raise ValueError(f"a PNG text key is 1 to 79 Latin-1 characters and no text holds a NUL; got {key!r}")
    try:
        return b"tEXt", keyword + b"\0" + value.encode("latin-1")
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language, no translated keyword, UTF-8
        return b"iTXt", keyword + b"\0\0\0\0\0" + value.encode("utf-8")

def compose(rows: Sequence[Sequence[Cell]]) -> Picture:
    """One figure: one row of panels per sequence of cells, each column as wide as its widest cell."""
    if not rows or not all(rows):
        raise ValueError("compose needs at least one row, each of at least one cell")
    fitted = [[_fit(cell.image) for cell in row] for row in rows]
    ticks = [[bar_ticks(cell.bar.limits, image.height) if cell.bar else None for cell, image in zip(row, images)]
             for row, images in zip(rows, fitted)]
    widths = [max(_cell_width(image, tick) for image, tick in zip(column, column_ticks))
              for column, column_ticks in zip(zip(*fitted), zip(*ticks))]
    lines = [[_wrap(cell.title, width) for cell, width in zip(row, widths)] for row in rows]
    heads = [_head_height(row_lines, row_ticks) for row_lines, row_ticks in zip(lines, ticks)]
    heights = [head + max(image.height for image in images) for head, images in zip(heads, fitted)]
    canvas = Image.new("RGB", (2 * MARGIN + sum(widths) + GAP * (len(widths) - 1),
                               2 * MARGIN + sum(heights) + GAP * (len(heights) - 1)), "white")
    draw = ImageDraw.Draw(canvas)
    boxes, top = [], MARGIN
    for r, row in enumerate(rows):
        left = MARGIN
        boxes.append([])
        for c, cell in enumerate(row):
            boxes[r].append(_draw_cell(canvas, draw, (left, top), widths[c], heads[r], fitted[r][c], lines[r][c],
                                       cell.bar, ticks[r][c]))
            left += widths[c] + GAP
        top += heights[r] + GAP
    return Picture(canvas, [[cell.title for cell in row] for row in rows], boxes)


def _draw_cell(canvas, draw, corner, width: int, head: int, image: Image.Image, lines: List[str],
               bar: Optional[Bar], ticks) -> Box:
    """Draw one cell with its top left corner at ``corner``; the box its picture fills."""
    left, top = corner
    title = _font(TITLE_SIZE)
    for k, line in enumerate(lines):  # centred over the picture, kept inside the cell
        half = title.getlength(line) / 2
        centre = min(max(left + image.width / 2, left + half), left + width - half)
        draw.text((centre, top + k * _line_height(TITLE_SIZE)), line, font=title, fill="black", anchor="ma")
    y = top + head
    canvas.paste(image, (left, y))
    draw.rectangle((left - 1, y - 1, left + image.width, y + image.height), outline="black")
    if bar is not None:
        _draw_bar(canvas, draw, (left + image.width + BAR_GAP, y), image.height, bar, ticks)
    return left, y, left + image.width, y + image.height


def _draw_bar(canvas, draw, corner, height: int, bar: Bar, ticks) -> None:
    left, top = corner
    colours = np.asarray(bar.colours, dtype=np.float64)
    rows = colours[np.linspace(len(colours) - 1, 0, height).round().astype(np.intp)]  # high at the top
    strip = np.repeat(_to_bytes(rows)[:, None], BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(strip), (left, top))
    draw.rectangle((left - 1, top - 1, left + BAR_WIDTH, top + height), outline="black")
    labels, offset = ticks
    font = _font(TICK_SIZE)
    low, high = bar.limits
    for value, label in zip(_tick_values(bar.limits, height), labels):
        y = top + round((high - value) / (high - low) * (height - 1))
        draw.line((left + BAR_WIDTH, y, left + BAR_WIDTH + TICK_LENGTH, y), fill="black")
        draw.text((left + BAR_WIDTH + TICK_LENGTH + TICK_PAD, y), label, font=font, fill="black", anchor="lm")
    if offset:
        draw.text((left, top - 3), offset, font=font, fill="black", anchor="ld")


def _tick_values(limits: Tuple[float, float], height: int) -> np.ndarray:
    low, high = limits
    values = MaxNLocator(nbins=max(2, height // 28), steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
    slack = 1e-9 * (high - low)
    return values[(values >= low - slack) & (values <= high + slack)]


def bar_ticks(limits: Tuple[float, float], height: int) -> Tuple[List[str], str]:
    """The tick labels of a bar ``height`` pixels tall over ``limits``, and the exponent shown above it ('' when
    the labels are the values themselves)."""
    values = _tick_values(limits, height)
    largest = float(np.abs(values).max(initial=0.0))
    power = math.floor(math.log10(largest)) if largest > 0 else 0
    if POWER_LIMITS[0] < power < POWER_LIMITS[1]:
        power = 0
    mantissas = values / 10.0 ** power
    decimals = next((d for d in range(8) if np.allclose(mantissas * 10 ** d, np.round(mantissas * 10 ** d),
                                                        rtol=0, atol=1e-6)), 8)
    labels = [_number(f"{m:.{decimals}f}") for m in mantissas]
    return labels, (_number(f"1e{power}") if power else "")


def _number(text: str) -> str:
    """A formatted number as a label: a typographic minus, and no sign on zero."""
    text = text.lstrip("-") if float(text) == 0 else text
    return text.replace("-", MINUS)


def _cell_width(image: Image.Image, ticks) -> int:
    if ticks is None:
        return image.width
    labels, offset = ticks
    font = _font(TICK_SIZE)
    text = max([font.getlength(label) for label in labels] + [font.getlength(offset) - BAR_WIDTH, 0.0])
    return image.width + BAR_GAP + BAR_WIDTH + TICK_LENGTH + TICK_PAD + math.ceil(text)


def _head_height(lines: List[List[str]], ticks) -> int:
    """The band over a row's pictures: its longest title, and an exponent's line if a bar has one."""
    offset = any(tick is not None and tick[1] for tick in ticks)
    return max(len(cell) for cell in lines) * _line_height(TITLE_SIZE) + (TICK_SIZE + 4 if offset else 0) + 4


def _wrap(text: str, width: int) -> List[str]:
    """The lines of ``text``, each line longer than ``width`` pixels broken: after a space, ``/``, ``_`` or ``-``
    where one is in reach, else where the width ends. Only the spaces at a break are dropped."""
    font = _font(TITLE_SIZE)
    out = []
    for line in text.split("\n"):
        while len(line) > 1 and font.getlength(line) > width:
            cut = _longest_prefix(line, font, width)
            after = max(line.rfind(mark, 1, cut) for mark in BREAKS)
            cut = after + 1 if after > 0 else cut
            out.append(line[:cut].rstrip(" "))
            line = line[cut:].lstrip(" ") or line[cut:]
        out.append(line)
    return out


BREAKS = " /_-"


def _longest_prefix(line: str, font, width: int) -> int:
    """The most characters of ``line`` (at least one) that fit in ``width`` pixels."""
    low, high = 1, len(line)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if font.getlength(line[:middle]) <= width else (low, middle - 1)
    return low


def _fit(image: np.ndarray) -> Image.Image:
    """A picture as a panel: enlarged by whole pixels when small, reduced by a whole factor when large."""
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a cell's image must be (H, W, 3), got shape {array.shape}")
    side = max(array.shape[:2])
    if side < MIN_SIDE:
        factor = math.ceil(MIN_SIDE / side)
        array = np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)
    picture = Image.fromarray(_to_bytes(array))
    return picture.reduce(math.ceil(side / MAX_SIDE)) if side > MAX_SIDE else picture


def _to_bytes(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _line_height(size: int) -> int:
    return round(size * 1.25)


@lru_cache(maxsize=None)
def _font(size: int):
    if os.path.exists(FONT):
        return ImageFont.truetype(FONT, size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1
