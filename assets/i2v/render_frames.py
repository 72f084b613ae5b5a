"""Render the first frames of assets/i2v_prompts.jsonl (832 x 480, Wan2.1-I2V-480P's landscape size): simple scenes
drawn with PIL, so that image-to-video smoke runs need no downloaded images. Deterministic; re-run to rewrite them:

    python assets/i2v/render_frames.py
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT = 832, 480
HERE = Path(__file__).resolve().parent


def vertical_gradient(top, bottom, height=HEIGHT, width=WIDTH):
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line([(0, y), (width, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def sunset_hills():
    image = vertical_gradient((250, 150, 90), (255, 220, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse([520, 170, 640, 290], fill=(255, 245, 200))
    draw.polygon([(0, 330), (180, 250), (380, 320), (560, 260), (832, 340), (832, 480), (0, 480)], fill=(70, 110, 60))
    draw.polygon([(0, 400), (260, 340), (520, 410), (832, 360), (832, 480), (0, 480)], fill=(45, 80, 40))
    return image


def ball_on_table():
    image = vertical_gradient((225, 220, 210), (200, 195, 185))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 300, 832, 480], fill=(140, 90, 50))
    for x in range(0, 832, 104):
        draw.line([(x, 300), (x + 40, 480)], fill=(120, 75, 40), width=3)
    draw.ellipse([180, 330, 240, 350], fill=(110, 70, 35))  # shadow
    draw.ellipse([160, 220, 260, 320], fill=(210, 30, 35))
    draw.ellipse([185, 240, 215, 265], fill=(240, 120, 120))
    return image


def sailboat():
    image = vertical_gradient((120, 180, 235), (200, 230, 250), height=300)
    full = Image.new("RGB", (WIDTH, HEIGHT))
    full.paste(image, (0, 0))
    full.paste(vertical_gradient((40, 100, 160), (20, 60, 110), height=180), (0, 300))
    draw = ImageDraw.Draw(full)
    for y in range(315, 480, 22):
        draw.line([(0, y), (832, y + 6)], fill=(70, 130, 190), width=2)
    draw.polygon([(300, 320), (460, 320), (430, 350), (330, 350)], fill=(120, 60, 30))
    draw.line([(380, 320), (380, 160)], fill=(60, 40, 20), width=5)
    draw.polygon([(385, 165), (385, 310), (470, 310)], fill=(250, 250, 245))
    return full


def lighthouse_night():
    image = vertical_gradient((10, 15, 45), (40, 50, 100))
    draw = ImageDraw.Draw(image)
    for i in range(40):
        x, y = (i * 197) % 832, (i * 89) % 260
        draw.ellipse([x, y, x + 3, y + 3], fill=(240, 240, 255))
    draw.polygon([(0, 380), (300, 330), (520, 390), (832, 360), (832, 480), (0, 480)], fill=(25, 30, 35))
    draw.polygon([(600, 360), (640, 140), (680, 140), (720, 360)], fill=(230, 230, 225))
    for y in (190, 260, 320):
        draw.rectangle([600, y, 720, y + 22], fill=(190, 40, 40))
    draw.rectangle([630, 110, 690, 140], fill=(255, 230, 120))
    draw.polygon([(660, 125), (300, 60), (300, 170)], fill=(255, 240, 170))
    return image.filter(ImageFilter.SMOOTH)


def city_street():
    image = vertical_gradient((170, 200, 225), (230, 235, 240))
    draw = ImageDraw.Draw(image)
    for i, (x, w, h) in enumerate([(0, 140, 260), (150, 120, 320), (280, 160, 220), (460, 130, 300), (600, 232, 250)]):
        shade = 90 + 25 * (i % 3)
        draw.rectangle([x, 360 - h, x + w, 360], fill=(shade, shade - 10, shade - 20))
        for wy in range(360 - h + 20, 340, 40):
            for wx in range(x + 15, x + w - 20, 35):
                draw.rectangle([wx, wy, wx + 15, wy + 20], fill=(250, 230, 150) if (wx + wy) % 3 else (60, 70, 90))
    draw.rectangle([0, 360, 832, 480], fill=(60, 60, 65))
    for x in range(20, 832, 120):
        draw.rectangle([x, 415, x + 60, 423], fill=(240, 240, 240))
    draw.rounded_rectangle([90, 380, 250, 440], radius=14, fill=(30, 90, 200))
    draw.rectangle([120, 350, 215, 385], fill=(30, 90, 200))
    for cx in (125, 215):
        draw.ellipse([cx - 20, 425, cx + 20, 465], fill=(20, 20, 20))
    return image


def paper_lanterns():
    image = vertical_gradient((60, 30, 70), (140, 60, 60))
    draw = ImageDraw.Draw(image)
    draw.line([(0, 90), (832, 120)], fill=(30, 20, 20), width=3)
    for i, x in enumerate(range(60, 832, 130)):
        y = 100 + i * 4
        draw.line([(x, y), (x, y + 40)], fill=(30, 20, 20), width=2)
        color = [(255, 150, 60), (255, 90, 70), (250, 200, 90)][i % 3]
        draw.ellipse([x - 40, y + 40, x + 40, y + 150], fill=color)
        draw.rectangle([x - 18, y + 35, x + 18, y + 45], fill=(40, 30, 30))
    return image.filter(ImageFilter.GaussianBlur(1))


SCENES = {"sunset_hills": sunset_hills, "ball_on_table": ball_on_table, "sailboat": sailboat,
          "lighthouse_night": lighthouse_night, "city_street": city_street, "paper_lanterns": paper_lanterns}

if __name__ == "__main__":
    for name, draw in SCENES.items():
        draw().save(HERE / f"{name}.png", optimize=True)
        print(f"wrote {HERE / name}.png")
