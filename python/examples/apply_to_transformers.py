"""Applies a factpatch patch to a model loaded with Hugging Face transformers, in memory.

Loads the model folder with transformers (float32), greedy-generates each edited prompt of the
patch, adds the patch's deltas in place with `factpatch.apply_to_model` (each touched tensor's
base hash is checked against the live weights first), and generates again.

Usage (from the repository root, with torch and transformers installed beside factpatch):

    factpatch compile --model fixtures/models/SmolLM2-135M-Instruct \
        --fact '{} is located in the city of|The Eiffel Tower|Rome' --out eiffel.fpatch
    python python/examples/apply_to_transformers.py fixtures/models/SmolLM2-135M-Instruct eiffel.fpatch
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import factpatch


def greedy(model, tokenizer, prompt, max_new_tokens):
    """`prompt` and its greedy continuation."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Hugging Face model folder the patch was compiled for")
    parser.add_argument("patch", help="a .fpatch file")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    patch = factpatch.Patch(args.patch)
    print(f"patch {patch.id}: {len(patch.edits)} edit(s), {len(patch.tensors)} tensor(s)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [e["prompt"].replace("{}", e["subject"]) for e in patch.edits]
    before = [greedy(model, tokenizer, p, args.max_new_tokens) for p in prompts]

    started = time.perf_counter()
    factpatch.apply_to_model(model, patch)
    print(f"applied in memory in {time.perf_counter() - started:.2f} s")

    for p, b in zip(prompts, before):
        print(f"before: {b!r}")
        print(f"after:  {greedy(model, tokenizer, p, args.max_new_tokens)!r}")


if __name__ == "__main__":
    main()
