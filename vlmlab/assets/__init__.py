"""What vlmlab ships: the bundled tiny captioner, the sample images and the scene generator
that made both (``scenes.py``). Nothing here imports torch."""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL_DIR = ASSETS_DIR / "tiny-captioner"
SAMPLES_DIR = ASSETS_DIR / "samples"
