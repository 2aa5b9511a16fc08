#!/usr/bin/env python3
"""PyTorch + transformers + PEFT LoRA training step at a paper's shapes, random weights.

The PyTorch side of `nlora bench --random-shape NAME --json` (scripts/gpu-check.sh
runs both): a LoRA training step (q and v projections, r 8, alpha 32, dropout
0.1, AdamW on the adapters) on random token ids, tokens per second after a
warm-up, with a device synchronisation ending each timing. Shapes:
  llama-7b      LLaMA-2-7B (hidden 4096, MLP 11008, 32 heads, vocab 32000)
  smollm2-135m  SmolLM2-135M (hidden 576, 30 layers, 9 heads / 3 kv, vocab 49152)
  t5-large      T5-large v1.1 (d_model 1024, 24 + 24 layers, gated-GELU d_ff 2816);
                --seq source tokens, --target-len target tokens per row
--layers N keeps the first N layers (of each stack for T5). Prints one JSON object.
"""
import argparse
import json
import sys
import time


def build(shape, layers, dtype):
    import transformers as tf

    if shape == "llama-7b":
        cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, rms_norm_eps=1e-5)
    elif shape == "smollm2-135m":
        cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                             tie_word_embeddings=True)
    elif shape == "t5-large":
        cfg = tf.T5Config(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                          num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, decoder_start_token_id=0,
                          pad_token_id=0, eos_token_id=1)
    else:
        sys.exit(f"unknown shape {shape}: llama-7b, smollm2-135m or t5-large")
    if layers:
        if shape == "t5-large":
            cfg.num_layers = cfg.num_decoder_layers = layers
        else:
            cfg.num_hidden_layers = layers
    cls = tf.T5ForConditionalGeneration if shape == "t5-large" else tf.LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.to(dtype), cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--target-len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("pytorch_shapes.py: --device cuda but torch sees no GPU")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.time()
    model, cfg = build(args.shape, args.layers, dtype)
    model = model.to(args.device)
    t5 = args.shape == "t5-large"
    targets = ["q", "v"] if t5 else ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                                             target_modules=targets))
    # adapters in f32 on a bf16 base, as nlora does
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    load_s = time.time() - t0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    g = torch.Generator(device="cpu").manual_seed(1)
    b, s = args.batch, args.seq
    ids = torch.randint(10, cfg.vocab_size, (b, s), generator=g).to(args.device)
    if t5:
        labels = torch.randint(10, cfg.vocab_size, (b, args.target_len), generator=g).to(args.device)
        tokens = b * (s + args.target_len)
    else:
        labels = ids
        tokens = b * s

    def step():
        with torch.autocast(args.device, dtype=dtype, enabled=args.dtype == "bf16"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t = time.time()
    for _ in range(args.steps):
        step()
    sync()
    secs = (time.time() - t) / args.steps
    out = {
        "framework": "pytorch", "shape": args.shape,
        "layers": cfg.num_layers if t5 else cfg.num_hidden_layers,
        "batch": b, "seq": s, "target_len": args.target_len if t5 else None,
        "dtype": args.dtype, "device": args.device, "load_s": load_s,
        "train_tokens_per_s": tokens / secs, "step_s": secs,
        "torch": torch.__version__,
    }
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out))


if __name__ == "__main__":
    main()
