"""Draws the bundled example image (examples/images/shapes.png): a red triangle, a blue circle, a green square."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "images" / "shapes.png"

image = Image.new("RGB", (448, 336), "white")
draw = ImageDraw.Draw(image)
draw.polygon([(60, 260), (160, 80), (260, 260)], fill=(220, 30, 30))
draw.ellipse([(290, 60), (400, 170)], fill=(30, 60, 220))
draw.rectangle([(300, 210), (390, 300)], fill=(30, 170, 60))
image.save(OUT)
