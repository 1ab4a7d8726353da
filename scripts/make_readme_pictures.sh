#!/usr/bin/env bash
# Regenerate the README's pictures with the three CLI commands on the embedded model (CPU, about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
PC=".venv/bin/promptcontrol"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PC inspect "a red circle on the left and a blue square on the right" --out "$tmp/inspect" --quiet
for w in 0.5 1.0 2.0; do  # one run each: the same seed gives the same starting noise
    $PC generate "a red circle and a (blue:$w) square" --mode embedding --out "$tmp/weighted/$w" --quiet
done
$PC edit "a red circle on the left and a blue square on the right" \
    "a green circle on the left and a blue square on the right" \
    "a red triangle on the left and a blue square on the right" \
    --cross-steps 0.8 --self-steps 0.4 --out "$tmp/edit" --quiet
cp "$tmp/inspect/image_grid.png" docs/img/readme_inspect.png
.venv/bin/python - "$tmp/weighted" docs/img/readme_generate.png <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
folder, target = Path(sys.argv[1]), sys.argv[2]
weights = ["0.5", "1.0", "2.0"]
labels = [f"(blue:{w}) square" for w in weights]
images = [Image.open(folder / w / "image.png").convert("RGB").resize((128, 128), Image.NEAREST) for w in weights]
canvas = Image.new("RGB", (3 * 136, 152), "white")
draw = ImageDraw.Draw(canvas)
for i, (image, label) in enumerate(zip(images, labels)):
    canvas.paste(image, (4 + 136 * i, 20))
    draw.text((8 + 136 * i, 4), label, fill="black")
canvas.save(target)
PY
cp "$tmp/edit/grid.png" docs/img/readme_edit.png
ls -la docs/img/readme_*.png
