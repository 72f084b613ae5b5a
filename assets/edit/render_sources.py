"""Render the source images of assets/edit_prompts.jsonl (square, 512 x 512: a square run's source aspect ratio), the
edit smoke-run data of `--model flux_kontext`. Deterministic; rerun to regenerate:

    python assets/edit/render_sources.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 512
HERE = Path(__file__).resolve().parent


def red_ball(draw):
    draw.rectangle([0, 360, SIZE, SIZE], fill=(150, 105, 60))  # a wooden table
    draw.ellipse([180, 200, 340, 360], fill=(210, 30, 30))


def blue_house(draw):
    draw.rectangle([0, 380, SIZE, SIZE], fill=(70, 150, 60))  # grass
    draw.rectangle([150, 220, 370, 380], fill=(40, 80, 200))
    draw.polygon([(130, 220), (260, 110), (390, 220)], fill=(120, 40, 30))  # the roof
    draw.rectangle([235, 300, 285, 380], fill=(80, 50, 20))  # the door


def green_tree(draw):
    draw.rectangle([0, 400, SIZE, SIZE], fill=(90, 160, 70))
    draw.rectangle([235, 280, 275, 420], fill=(100, 60, 30))  # the trunk
    draw.ellipse([150, 120, 360, 320], fill=(30, 130, 40))


def yellow_sun(draw):
    draw.rectangle([0, 330, SIZE, SIZE], fill=(40, 90, 170))  # the sea
    draw.ellipse([190, 80, 320, 210], fill=(250, 210, 40))


SOURCES = {"red_ball.png": ((235, 235, 240), red_ball), "blue_house.png": ((170, 210, 240), blue_house),
           "green_tree.png": ((200, 225, 245), green_tree), "yellow_sun.png": ((140, 190, 235), yellow_sun)}

if __name__ == "__main__":
    for name, (background, draw_scene) in SOURCES.items():
        image = Image.new("RGB", (SIZE, SIZE), background)
        draw_scene(ImageDraw.Draw(image))
        image.save(HERE / name, optimize=True)
