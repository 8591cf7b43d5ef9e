"""Where a training step's memory goes: the activations autograd keeps for the backward pass, per part of the
model, and the tuned parameters' gradients and optimizer state, for each tuning method.

Usage: .venv/bin/python bench/activation_memory.py [--arch vit_upernet] [--crop 16x128x128] [--batch 2]

One forward pass of the training step (fp32, no checkpointing, random weights and input) runs under
``torch.autograd.graph.saved_tensors_hooks``; every saved tensor that is not a parameter or buffer is counted once
(by its storage) and charged to the part of the model that was running: the backbone's blocks, the modules a
method inserts (Med-Adapters, adapters, prompts), the decoder, or the rest (patch embedding, norms). Prints a
Markdown table; nothing is timed, so a busy machine gives the same figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedTuningLib.models import ModelConfig, build_model  # noqa: E402

MB = 2**20


def measure(arch: str, method: str, crop: tuple[int, int, int], batch: int) -> dict:
    torch.manual_seed(0)
    d, h, w = crop
    model = build_model(ModelConfig(arch=arch, in_channels=1, num_classes=3, img_size=h, depth=d, method=method))
    model.train()
    encoder = model.encoder
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    parts = {"blocks": 0, "inserted": 0, "decoder": 0, "rest": 0}
    running = ["rest"]  # a stack: the innermost part wins

    def enter(part):
        return lambda *_: running.append(part)

    def leave(*_):
        running.pop()

    # A block's children, not the block: with modules inside a block the encoder calls them one by one.
    hooked = [(child, "blocks") for block in encoder.blocks for child in block.children()]
    hooked += [(m, "inserted") for group in (encoder.before, encoder.after) for modules in group for m in modules]
    hooked += [(m, "inserted") for inner in encoder.inner for m in inner.values()]
    hooked.append((model.decoder, "decoder"))
    handles = [h for module, part in hooked for h in (module.register_forward_pre_hook(enter(part)),
                                                      module.register_forward_hook(leave))]
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in own and key not in seen:
            seen.add(key)
            parts[running[-1]] += t.untyped_storage().nbytes()
        return t

    image = torch.randn(batch, 1, d, h, w)
    with saved_tensors_hooks(pack, lambda t: t):
        logits = model(image)
    del logits
    for handle in handles:
        handle.remove()
    tuned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Gradients plus Adam with amsgrad (exp_avg, exp_avg_sq, max_exp_avg_sq): four fp32 copies of the tuned ones.
    return {**{k: v / MB for k, v in parts.items()}, "tuned_m": tuned / 1e6, "optimizer": 4 * 4 * tuned / MB,
            "weights": sum(p.numel() for p in model.parameters()) * 4 / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_upernet")
    parser.add_argument("--crop", default="16x128x128")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--methods", default="full,med_tuning,adapter,head")
    args = parser.parse_args()
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    print(f"{args.arch}, crop {args.crop}, batch {args.batch}, fp32, no checkpointing: MB kept for the backward pass")
    print()
    print("| method | tuned params (M) | backbone blocks | inserted modules | decoder | rest | activations | "
          "gradients + Adam | activations + gradients + Adam |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        r = measure(args.arch, method, crop, args.batch)
        activations = r["blocks"] + r["inserted"] + r["decoder"] + r["rest"]
        print(f"| {method} | {r['tuned_m']:.3f} | {r['blocks']:.0f} | {r['inserted']:.0f} | {r['decoder']:.0f} | "
              f"{r['rest']:.0f} | {activations:.0f} | {r['optimizer']:.0f} | {activations + r['optimizer']:.0f} |")


if __name__ == "__main__":
    main()
