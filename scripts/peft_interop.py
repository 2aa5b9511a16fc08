#!/usr/bin/env python3
"""Interop check: a task adapter saved by `nlora run` (PEFT format) loads with
Python PEFT onto the same base model in transformers, and the logits match
nlora's on a few prompts.

Needs torch, transformers, peft and gguf (not needed by CI). Usage:
  python scripts/peft_interop.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
      --adapter runs/mini-nlora/task-1-dbpedia [--nlora target/release/nlora]
Exit code 0 when every prompt's last-position logits agree within --tol.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PROMPTS = [
    "Task:TC\nDataset:dbpedia\nWhat is the topic of the following paragraph? Choose one from the option.\n"
    "Option: Company, EducationalInstitution, Artist \nThe Vienna Philharmonic is an orchestra.\nAnswer:",
    "The capital of France is",
    "Task:SC\nDataset:amazon\nWhat is the sentiment of the following paragraph? Choose one from the option.\n"
    "Option: very negative, negative, neutral, positive, very positive \nGreat blender, works fine.\nAnswer:",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the base .gguf file")
    ap.add_argument("--adapter", required=True, help="a PEFT adapter folder written by nlora")
    ap.add_argument("--nlora", default="target/release/nlora", help="the nlora binary")
    ap.add_argument("--tol", type=float, default=2e-3)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf = os.path.abspath(args.model)
    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), torch_dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    worst = 0.0
    ok = True
    for prompt in PROMPTS:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run(
                [args.nlora, "generate", "--model", gguf, "--adapter", args.adapter,
                 "--prompt", prompt, "--max-new-tokens", "1", "--logits-out", f.name],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            ours = json.load(open(f.name))
        ids = torch.tensor([ours["prompt_ids"]])
        with torch.no_grad():
            theirs = model(input_ids=ids).logits[0, -1]
        diff = (theirs - torch.tensor(ours["last_logits"])).abs().max().item()
        same_top = int(theirs.argmax()) == max(range(len(ours["last_logits"])), key=ours["last_logits"].__getitem__)
        worst = max(worst, diff)
        ok &= diff < args.tol and same_top
        print(f"max |logit diff| {diff:.2e}  same argmax {same_top}  prompt {prompt[:40]!r}")
    print(f"worst {worst:.2e} (tolerance {args.tol}): {'OK' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
