"""Run by the `.venv-vision` interpreter (torchvision beside torch 2.14, which our torch 2.13 cannot
import): transformers' own `Llama4Processor` on image files, saved for `test_images.py` to compare.

    python vision_reference.py MODEL_DIR OUT.pt TEXT IMAGE...

TEXT holds one `<|image|>` per image; OUT.pt gets input_ids (placeholders expanded) and pixel_values.
"""

import sys

import torch
from PIL import Image
from transformers import AutoProcessor


def main(model_dir: str, out: str, text: str, paths: list[str]) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    images = [Image.open(p) for p in paths]
    batch = processor(text=text, images=images or None, add_special_tokens=False, return_tensors="pt")
    torch.save({"input_ids": batch["input_ids"][0].tolist(), "pixel_values": batch.get("pixel_values"),
                "torchvision": __import__("torchvision").__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
