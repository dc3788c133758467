"""A small line-and-point chart drawn with PIL (no plotting dependency).

Enough for a guidance sweep: one labelled point per setting, joined in sweep
order, on linear axes with ticks and labels.
"""

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

_SIZE = (720, 520)
_MARGIN = (84, 56, 40, 70)  # left, top, right, bottom


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
  """About `count` round tick values covering [lo, hi]."""
  if hi <= lo:
    hi = lo + 1.0
  step = (hi - lo) / count
  mag = 10 ** math.floor(math.log10(step))
  step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=10 * mag)
  start = math.floor(lo / step) * step
  return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt(v: float) -> str:
  return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def line_plot(
  xs: Sequence[float],
  ys: Sequence[float],
  labels: Sequence[str],
  path: str,
  *,
  x_label: str,
  y_label: str,
  title: str,
  note: Optional[str] = None,
) -> None:
  """Writes a PNG with the points (xs[i], ys[i]) labelled labels[i], joined in order.

  Args:
    xs, ys: coordinates (finite floats).
    labels: text beside each point (e.g. 'w=3').
    path: the PNG to write.
    x_label, y_label, title: axis labels and the title.
    note: an optional line under the title (e.g. what lower/higher means).
  """
  font = ImageFont.load_default(size=15)
  small = ImageFont.load_default(size=12)
  img = Image.new("RGB", _SIZE, "white")
  d = ImageDraw.Draw(img)
  left, top, right, bottom = _MARGIN
  x0, y0, x1, y1 = left, top, _SIZE[0] - right, _SIZE[1] - bottom
  xt, yt = _ticks(min(xs), max(xs)), _ticks(min(ys), max(ys))
  (xa, xb), (ya, yb) = (xt[0], xt[-1]), (yt[0], yt[-1])

  def px(x, y):
    return (
      x0 + (x - xa) / ((xb - xa) or 1) * (x1 - x0),
      y1 - (y - ya) / ((yb - ya) or 1) * (y1 - y0),
    )

  for t in xt:
    u = px(t, ya)[0]
    d.line([(u, y0), (u, y1)], fill=(232, 232, 232))
    d.text((u, y1 + 6), _fmt(t), fill="black", font=small, anchor="mt")
  for t in yt:
    v = px(xa, t)[1]
    d.line([(x0, v), (x1, v)], fill=(232, 232, 232))
    d.text((x0 - 6, v), _fmt(t), fill="black", font=small, anchor="rm")
  d.rectangle([x0, y0, x1, y1], outline="black")
  points = [px(x, y) for x, y in zip(xs, ys)]
  if len(points) > 1:
    d.line(points, fill=(70, 110, 200), width=2)
  for (u, v), label in zip(points, labels):
    d.ellipse([u - 5, v - 5, u + 5, v + 5], fill=(200, 60, 40), outline="black")
    d.text((u + 8, v - 8), label, fill="black", font=small, anchor="ls")
  d.text(((x0 + x1) / 2, 12), title, fill="black", font=font, anchor="mt")
  if note:
    d.text(((x0 + x1) / 2, 32), note, fill=(90, 90, 90), font=small, anchor="mt")
  d.text(((x0 + x1) / 2, _SIZE[1] - 24), x_label, fill="black", font=font, anchor="mm")
  label_img = Image.new("RGB", (y1 - y0, 22), "white")
  ImageDraw.Draw(label_img).text(((y1 - y0) / 2, 11), y_label, fill="black", font=font, anchor="mm")
  img.paste(label_img.rotate(90, expand=True), (8, y0))
  img.save(path)
