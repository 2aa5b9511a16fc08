#!/usr/bin/env python3
"""Writes the SmolLM2 reference fixtures the nlora-model tests compare against.

Run once by a developer (not by CI), with the transformers venv:

    HF_HUB_OFFLINE=1 /root/mlvenv/bin/python scripts/gen_smollm2_fixtures.py \
        [--model ~/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--data ../shared/cl_benchmark]

Reference: transformers' GGUF loader (dequantised weights, f32), with one correction to
its tokenizer: transformers has no split rule for llama.cpp's "smollm" pre-tokenizer and
falls back to GPT-2's regex, while llama.cpp and SmolLM2's own tokenizer.json split every
digit first (Digits(individual_digits=True), then ByteLevel). The reference here uses the
SmolLM2 split; `stock_transformers_differs` records where the stock loader disagrees.

Benchmark text is never written into the repository: a prompt is stored as
(task folder, file, record index) plus its UTF-8 length, and the tests rebuild it from the
data folder with the prompt format of REFERENCE.md ("Prompts", default prefix on).

Writes into crates/nlora-model/tests/fixtures/smollm2/:
  config.json       transformers' LlamaConfig values for the file
  tokenizer.json    token ids of 50 benchmark prompts and a few tricky strings
  logits.safetensors  last-position logits (full vocabulary, f32) of 3 prompts, plus
                    q_proj/k_proj row blocks (un-permuted by transformers)
  generation.json   20-token greedy continuations of 3 prompts, and the logits prompts
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import pre_tokenizers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "crates/nlora-model/tests/fixtures/smollm2"

# (task type, dataset folder) in the order of the benchmark's 15 tasks.
TASKS = [
    ("NLI", "MNLI"), ("NLI", "CB"), ("NLI", "RTE"), ("QQP", "QQP"), ("SC", "amazon"),
    ("SC", "yelp"), ("SC", "IMDB"), ("SC", "SST-2"), ("TC", "agnews"), ("TC", "dbpedia"),
    ("TC", "yahoo"), ("BoolQA", "BoolQA"), ("MultiRC", "MultiRC"), ("WiC", "WiC"), ("COPA", "COPA"),
]
N_BENCHMARK_PROMPTS = 50

TRICKY = [
    "Hello world! What is the topic?",
    "In 2023, 12345 apples cost $1,000.50 (or 3.14e-2 each); call 555-0199.",
    "a  1   22    333\tb",
    "Multiple   spaces\n\nand\r\nnewlines\n",
    "   leading and trailing   ",
    "Unicode: café naïve résumé, 日本語のテキスト, Ελληνικά, emoji 🙂🚀, math ∑∫√.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\u00a0non-breaking\u2009spaces, zero\u200bwidth",
    "",
    "Answer:",
]

# Prompts written for these fixtures (no benchmark text), for logits and generation.
LOGITS_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Task:TC\nDataset:agnews\nWhat is the topic of the following paragraph? Choose one from the option.\n"
    "Option: World, Sports, Business, Science or Technology \n"
    "Title: Local team wins the regional cup\nText: The home side scored twice in the second half "
    "to lift the trophy on Sunday.\n\nAnswer:",
]
GENERATION_PROMPTS = LOGITS_PROMPTS
GENERATION_TOKENS = 20


def build_prompt(data: Path, ttype: str, name: str, record: dict, instructions: dict) -> str:
    """REFERENCE.md "Prompts": prefix + instruction + options + sentence + "\\nAnswer:"."""
    prefix = f"Task:{ttype}\nDataset:{name}\n"
    if ttype == "COPA":
        return prefix + record["sentence"] + "\nAnswer:"
    labels = json.loads((task_dir(data, ttype, name) / "labels.json").read_text())
    instruction = instructions[ttype][0]["instruction"]
    return prefix + instruction + "Option: " + ", ".join(labels) + " \n" + record["sentence"] + "\nAnswer:"


def task_dir(data: Path, ttype: str, name: str) -> Path:
    return data / ttype / name


def benchmark_prompts(data: Path):
    instructions = json.loads((data / "instruction_config.json").read_text())
    rng = random.Random(20240613)
    per_task = [N_BENCHMARK_PROMPTS // len(TASKS)] * len(TASKS)
    for i in range(N_BENCHMARK_PROMPTS - sum(per_task)):
        per_task[i] += 1
    out = []
    for (ttype, name), count in zip(TASKS, per_task):
        records = json.loads((task_dir(data, ttype, name) / "test.json").read_text())
        # Record 0 always, the rest spread at random over the file.
        picks = [0] + sorted(rng.sample(range(1, len(records)), count - 1))
        for index in picks:
            text = build_prompt(data, ttype, name, records[index], instructions)
            out.append({"task": f"{ttype}/{name}", "file": "test.json", "index": index, "text": text})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/nlora/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=str(REPO.parent / "shared/cl_benchmark"))
    args = ap.parse_args()
    model_path = Path(args.model).resolve()
    data = Path(args.data)

    # transformers wants (folder, file name); keep the cache untouched with a symlink.
    tmp = Path(tempfile.mkdtemp())
    try:
        (tmp / model_path.name).symlink_to(model_path)
        run(tmp, model_path.name, data)
    finally:
        shutil.rmtree(tmp)


def run(folder: Path, gguf_name: str, data: Path):
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    stock = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    hello = tok("Hello world! What is the topic?", add_special_tokens=True).input_ids
    assert hello == [19556, 905, 17, 1812, 314, 260, 4234, 47], hello

    def ids(text):
        return tok(text, add_special_tokens=True).input_ids

    bench = benchmark_prompts(data)
    tokenizer_fixture = {
        "reference": "transformers GGUF tokenizer with SmolLM2's Digits+ByteLevel pre-tokenizer",
        "add_bos": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "benchmark": [],
        "tricky": [],
    }
    differs = 0
    for p in bench:
        i = ids(p["text"])
        d = i != stock(p["text"]).input_ids
        differs += d
        tokenizer_fixture["benchmark"].append({
            "task": p["task"], "file": p["file"], "index": p["index"],
            "utf8_len": len(p["text"].encode("utf-8")), "ids": i, "stock_transformers_differs": d,
        })
    for t in TRICKY:
        i = ids(t)
        d = i != stock(t).input_ids
        differs += d
        tokenizer_fixture["tricky"].append({"text": t, "ids": i, "decoded": tok.decode(i),
                                            "stock_transformers_differs": d})
    print(f"stock transformers GGUF tokenizer differs on {differs} of {len(bench) + len(TRICKY)} texts",
          file=sys.stderr)

    cfg = AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
    config_fixture = {k: getattr(cfg, k) for k in [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id"]}
    rope = getattr(cfg, "rope_parameters", None) or {}
    config_fixture["rope_theta"] = rope.get("rope_theta", getattr(cfg, "rope_theta", None))

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    model.eval()
    tensors = {}
    sd = model.state_dict()
    # One head's rows (and a few columns) of q and k: checks the un-permute directly.
    tensors["model.layers.0.self_attn.q_proj.weight[:128,:16]"] = sd["model.layers.0.self_attn.q_proj.weight"][:128, :16].contiguous()
    tensors["model.layers.0.self_attn.k_proj.weight[:128,:16]"] = sd["model.layers.0.self_attn.k_proj.weight"][:128, :16].contiguous()
    tensors["model.layers.29.self_attn.k_proj.weight[64:192,:16]"] = sd["model.layers.29.self_attn.k_proj.weight"][64:192, :16].contiguous()
    tensors["model.layers.0.self_attn.v_proj.weight[:64,:16]"] = sd["model.layers.0.self_attn.v_proj.weight"][:64, :16].contiguous()
    tensors["model.embed_tokens.weight[:4,:16]"] = sd["model.embed_tokens.weight"][:4, :16].contiguous()

    with torch.no_grad():
        for n, p in enumerate(LOGITS_PROMPTS):
            x = torch.tensor([ids(p)])
            logits = model(x).logits[0, -1].float()
            tensors[f"last_logits_{n}"] = logits.contiguous()
        gens = []
        for p in GENERATION_PROMPTS:
            x = torch.tensor([ids(p)])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=GENERATION_TOKENS,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = out[0, x.shape[1]:].tolist()
            gens.append({"prompt": p, "prompt_ids": ids(p), "new_ids": new, "text": tok.decode(new),
                         "stopped_at_eos": bool(new and new[-1] == tok.eos_token_id)})

    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "tokenizer.json", tokenizer_fixture)
    write_json(OUT / "config.json", config_fixture)
    write_json(OUT / "generation.json", {
        "max_new_tokens": GENERATION_TOKENS,
        "logits_prompts": [{"prompt": p, "ids": ids(p)} for p in LOGITS_PROMPTS],
        "generations": gens,
    })
    tmp = OUT / "logits.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"source": "transformers GGUF loader, float32"})
    os.chmod(tmp, 0o644)  # safetensors writes 0600
    tmp.replace(OUT / "logits.safetensors")
    for g in gens:
        print(repr(g["prompt"][-40:]), "->", repr(g["text"]), file=sys.stderr)


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
