#!/usr/bin/env bash
# Regenerate the README's pictures with the three CLI commands on the embedded model (CPU, about a minute).
# The 32×32 images are shown enlarged for reading: images NEAREST-upscaled ×5 (pixels stay pixels); the heat-map
# grid is matplotlib's (maps bicubically upsampled from the attention grid to 32×32 by the library, then drawn
# without further smoothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PC=".venv/bin/promptcontrol"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PROMPT="a red circle on the left and a blue square on the right"
$PC inspect "$PROMPT" --weighting resolution --out "$tmp/inspect" --quiet
for w in 0.5 1.0 2.0; do  # one run each: the same seed gives the same starting noise
    $PC generate "a red circle and a (blue:$w) square" --mode embedding --out "$tmp/weighted/$w" --quiet
done
$PC edit "$PROMPT" "a green circle on the left and a blue square on the right" \
    "a red triangle on the left and a blue square on the right" \
    --cross-steps 0.8 --self-steps 0.4 --out "$tmp/edit" --quiet
cp "$tmp/inspect/image_grid.png" docs/img/readme_inspect.png
.venv/bin/python - "$tmp" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw

tmp = Path(sys.argv[1])
SCALE, GAP, HEAD = 5, 12, 34  # 32 px → 160 px tiles, nearest; white gaps between images; two caption lines


def strip(paths, captions, target):
    """Images side by side, NEAREST-upscaled ×SCALE, a white gap between them, a caption over each."""
    tiles = [Image.open(p).convert("RGB") for p in paths]
    tiles = [t.resize((t.width * SCALE, t.height * SCALE), Image.NEAREST) for t in tiles]
    w, h = tiles[0].size
    canvas = Image.new("RGB", (len(tiles) * (w + GAP) + GAP, h + HEAD + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, caption) in enumerate(zip(tiles, captions)):
        x = GAP + i * (w + GAP)
        canvas.paste(tile, (x, HEAD))
        for j, line in enumerate(caption.split("\n")):
            draw.text((x, 4 + 14 * j), line, fill="black")
    canvas.save(target)


weights = ["0.5", "1.0", "2.0"]
strip([tmp / "weighted" / w / "image.png" for w in weights],
      [f"(blue:{w}) square\nsame seed" for w in weights], "docs/img/readme_generate.png")
strip([tmp / "edit" / "source.png", tmp / "edit" / "edit_0.png", tmp / "edit" / "edit_1.png"],
      ["source\na red circle ... blue square", "edit: red -> green\n(circle)", "edit: circle -> triangle\n(red)"],
      "docs/img/readme_edit.png")
PY
ls -la docs/img/readme_*.png
