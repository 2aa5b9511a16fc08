#!/usr/bin/env python3
"""A whole continual-learning run in PyTorch + transformers + PEFT, replaying
the data that `nlora data export` wrote for an nlora run.

What it mirrors (read from the export's settings.json; anything it cannot
mirror is refused):
  * the model: the same GGUF file, dequantised to f32 by transformers;
  * per stage a fresh PEFT LoRA adapter on the same modules (r, alpha,
    dropout; PEFT's default init = nlora's: A kaiming-uniform, B = 0),
    seeded with seed + stage. At the stage's end the adapter is merged into
    the base weights (merge_and_unload), which is the same function as
    nlora's frozen stacked adapters (the paper notes the equivalence); the
    next stage wraps the merged model in a new adapter;
  * N-LoRA's l1 penalty lambda * SUM_sites SUM |B A| (times alpha/r when
    l1_scaled), added to the batch loss;
  * AdamW (torch.optim.AdamW, nlora's betas, eps, weight decay), fresh per
    stage, constant learning rate, one step per batch;
  * the exported batches in the exported order (right-padded input_ids,
    attention_mask, labels with -100 off the answer): the loss is
    transformers' causal-LM loss, the mean over labelled positions, as nlora's;
  * after each stage every task is evaluated: greedy generate with KV cache,
    left padding, the export's max_new_tokens / EOS / pad, batches of the
    export's eval batch size, model.eval() + torch.inference_mode(); the new
    tokens up to EOS are decoded with nlora's own tokenizer.json (skipping
    special tokens) and scored by exact match after the reference's
    normalisation.

Writes one JSON object (stdout, or --out): per-stage train / eval wall
seconds, the accuracy matrix (row i = after stage i, column j = task j),
the first batch's loss of every stage (stage 1's is the base model's loss,
to compare with nlora's train.log), and the whole process's wall time.
Threads: --threads (torch.set_num_threads); set OMP_WAIT_POLICY=PASSIVE in
the environment (bench/whole_run.sh does).
"""
import argparse
import json
import os
import resource
import string
import sys
import time

T_START = time.perf_counter()

PUNCT = set(string.punctuation)


def normalize_answer(s):
    """The reference's normalize_answer without article removal (= nlora_data::normalize_answer)."""
    return " ".join("".join(c for c in s.lower() if c not in PUNCT).split())


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_supported(s):
    """Refuses settings this script does not mirror, naming them."""
    problems = []
    opt, pen = s["optimizer"], s["penalty"]
    if s["method"] not in ("nlora", "inclora", "ns"):
        problems.append(f"method {s['method']!r} (supported: nlora, inclora, ns)")
    if pen["l1"] and pen["l1_form"] != "dw":
        problems.append(f"l1_form {pen['l1_form']!r} (supported: dw)")
    if pen["auto_lambda"]:
        problems.append("auto_lambda")
    if pen["orthogonality"]:
        problems.append("an orthogonality term")
    if opt["schedule"] != "constant" or opt["warmup_steps"] != 0:
        problems.append(f"schedule {opt['schedule']!r} with {opt['warmup_steps']} warm-up steps")
    if opt["grad_accum"] != 1:
        problems.append(f"grad_accum {opt['grad_accum']}")
    if opt["clip_grad_norm"] is not None:
        problems.append(f"clip_grad_norm {opt['clip_grad_norm']}")
    if s["eval"]["rank_classification"]:
        problems.append("eval.rank_classification (only exact match is mirrored)")
    if any(len(st["tasks"]) != 1 for st in s["train"]["stages"]):
        problems.append("a stage over several tasks")
    if problems:
        sys.exit("error: pytorch_run.py does not mirror these settings of the export: " + "; ".join(problems))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", required=True, help="folder written by `nlora data export`")
    ap.add_argument("--model", help="the GGUF file (default: the export's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = ap.parse_args()
    if args.threads < 1:
        sys.exit("error: --threads must be at least 1")
    settings_path = os.path.join(args.export, "settings.json")
    if not os.path.isfile(settings_path):
        sys.exit(f"error: {settings_path} is missing: run `nlora data export --out {args.export}` first")
    with open(settings_path) as f:
        s = json.load(f)
    if s.get("format") != 1:
        sys.exit(f"error: {settings_path} has format {s.get('format')}, this script reads format 1")
    check_supported(s)
    model_path = args.model or s["model"]
    if not os.path.isfile(model_path):
        sys.exit(f"error: model {model_path} is missing: run scripts/fetch-model.sh (or give --model)")

    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folder, file = os.path.split(os.path.abspath(model_path))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = Tokenizer.from_file(os.path.join(args.export, "tokenizer.json"))
    load_seconds = time.perf_counter() - t0

    lora, pen, opt_s = s["lora"], s["penalty"], s["optimizer"]
    stages = s["train"]["stages"]
    tasks = s["eval"]["tasks"]
    train_data = [read_jsonl(os.path.join(args.export, st["file"])) for st in stages]
    eval_data = [read_jsonl(os.path.join(args.export, t["file"])) for t in tasks]
    for st, batches in zip(stages, train_data):
        if len(batches) != st["batches"]:
            sys.exit(f"error: {st['file']} has {len(batches)} batches, settings.json says {st['batches']}")
    eval_bs = s["eval"]["batch_size"]

    def evaluate(model, task, examples):
        gen = GenerationConfig(
            max_new_tokens=task["max_new_tokens"], do_sample=False, num_beams=1,
            eos_token_id=task["eos_token_ids"], pad_token_id=task["pad_token_id"])
        eos = set(task["eos_token_ids"])
        correct = 0
        for i in range(0, len(examples), eval_bs):
            chunk = examples[i:i + eval_bs]
            width = max(len(e["prompt_ids"]) for e in chunk)
            pad = task["pad_token_id"]
            ids = torch.tensor([[pad] * (width - len(e["prompt_ids"])) + e["prompt_ids"] for e in chunk])
            mask = torch.tensor([[0] * (width - len(e["prompt_ids"])) + [1] * len(e["prompt_ids"]) for e in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
            for e, row in zip(chunk, out[:, width:].tolist()):
                new = []
                for tok in row:
                    if tok in eos:
                        break
                    new.append(tok)
                text = tokenizer.decode(new, skip_special_tokens=True)
                correct += normalize_answer(text) == normalize_answer(e["answer"])
        return correct / max(1, len(examples))

    matrix, train_seconds, eval_seconds, first_loss, steps = [], [], [], [], []
    model = base
    for k, (st, batches) in enumerate(zip(stages, train_data)):
        t0 = time.perf_counter()
        torch.manual_seed(s["seed"] + k)
        cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                         target_modules=lora["target_modules"], task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=st["lr"], betas=(opt_s["beta1"], opt_s["beta2"]),
                                eps=opt_s["eps"], weight_decay=opt_s["weight_decay"])
        sites = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        lam = st["lambda"] if pen["l1"] else 0.0
        l1_scale = lora["scale"] if pen["l1_scaled"] else 1.0
        model.train()
        for n, b in enumerate(batches):
            out = model(input_ids=torch.tensor(b["input_ids"]),
                        attention_mask=torch.tensor(b["attention_mask"]),
                        labels=torch.tensor(b["labels"]))
            loss = out.loss
            if n == 0:
                first_loss.append(loss.item())
            if lam > 0.0:
                l1 = sum((m.lora_B["default"].weight @ m.lora_A["default"].weight).abs().sum() for m in sites)
                loss = loss + lam * l1_scale * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        steps.append(len(batches))
        # Merging the finished adapter = nlora's frozen, still-applied adapter.
        model = model.merge_and_unload()
        train_seconds.append(time.perf_counter() - t0)
        print(f"stage {k + 1}/{len(stages)} ({st['tasks'][0]}): {len(batches)} steps in "
              f"{train_seconds[-1]:.1f} s, first-batch loss {first_loss[-1]:.6f}", file=sys.stderr)

        t0 = time.perf_counter()
        model.eval()
        row = []
        with torch.inference_mode():
            for task, examples in zip(tasks, eval_data):
                row.append(evaluate(model, task, examples))
        matrix.append(row)
        eval_seconds.append(time.perf_counter() - t0)
        print(f"  evaluated in {eval_seconds[-1]:.1f} s: "
              + ", ".join(f"{t['task']} {a:.3f}" for t, a in zip(tasks, row)), file=sys.stderr)

    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "tasks": [t["task"] for t in tasks],
        "history": "merged at each stage's end (merge_and_unload)",
        "accuracy_matrix": matrix,
        "first_batch_loss": first_loss,
        "steps": steps,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "run_seconds": sum(train_seconds) + sum(eval_seconds),
        "load_seconds": load_seconds,
        "process_seconds": time.perf_counter() - T_START,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    else:
        print(text)


if __name__ == "__main__":
    main()
