#!/usr/bin/env python3
"""The PyTorch + transformers + PEFT side of `nlora bench`.

Same model file (transformers reads the GGUF and dequantises it to f32), same
workloads, same keys in --json:
  (a) LoRA training step (q_proj, v_proj, r 8, alpha 32, dropout 0.1, AdamW)
      with the causal-LM loss over all B x L positions, tokens/s;
  (b) the same step plus N-LoRA's l1 on each site's update s*B@A;
  (c) an inference forward (logits at every position), tokens/s;
  (d) greedy generation of --gen-tokens new tokens for B prompts of
      --gen-prompt tokens, new tokens/s;
  (e) peak RSS (ru_maxrss), after the training phases and at the end;
  (f) GEMM throughput at the MLP's shape.
Random token ids, fixed seed. Run it alone on the machine; bench/compare.sh
alternates it with `nlora bench`.
"""
import argparse
import json
import os
import resource
import sys
import time


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux (VmHWM).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_model_path():
    if os.environ.get("NLORA_MODEL"):
        return os.environ["NLORA_MODEL"]
    cache = os.environ.get("NLORA_CACHE")
    if not cache:
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = os.path.join(xdg, "nlora") if xdg else os.path.expanduser("~/.cache/nlora")
    return os.path.join(cache, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model_path())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps / forwards")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-prompt", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=8)
    ap.add_argument("--lambda", dest="lam", type=float, default=1e-4,
                    help="N-LoRA lambda (its value does not change the cost)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        sys.exit(f"error: model {args.model} is missing: run scripts/fetch-model.sh")
    for name in ("batch", "seq", "threads", "steps", "gen_prompt", "gen_tokens"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")

    import torch
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, file = os.path.split(os.path.abspath(args.model))
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1,
                     target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    vocab = base.config.vocab_size
    b, s = args.batch, args.seq
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (b, s), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]

    def nlora_l1():
        total = 0.0
        for m in lora_layers:
            a = m.lora_A["default"].weight
            bm = m.lora_B["default"].weight
            total = total + (m.scaling["default"] * (bm @ a)).abs().sum()
        return args.lam * total

    def train_step(penalty):
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        if penalty:
            loss = loss + nlora_l1()
        loss.backward()
        opt.step()
        return loss.item()

    def timed(f, n):
        for _ in range(args.warmup):
            f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n

    tokens = b * s
    t_train = timed(lambda: train_step(False), args.steps)
    t_nlora = timed(lambda: train_step(True), args.steps)
    train_rss = peak_rss_mib()

    model.eval()

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids).logits.sum().item()

    t_fwd = timed(forward, args.steps)

    prompts = torch.randint(10, vocab, (b, args.gen_prompt), generator=gen)

    def generate():
        with torch.inference_mode():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == args.gen_prompt + args.gen_tokens, out.shape
        return out

    t_gen = timed(generate, max(1, args.steps - 1))

    # (f) GEMM throughput at the MLP's shape, as nlora measures it
    mm, mk, mn = b * s, base.config.hidden_size, base.config.intermediate_size
    x = torch.randn(mm, mk)
    w = torch.randn(mn, mk) * 0.02

    def matmul():
        with torch.inference_mode():
            return torch.nn.functional.linear(x, w)

    for _ in range(2):
        matmul()
    t0 = time.perf_counter()
    for _ in range(20):
        matmul()
    t_mm = (time.perf_counter() - t0) / 20

    result = {
        "framework": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": b,
        "seq": s,
        "dtype": "f32",
        "train_tokens_per_s": tokens / t_train,
        "train_nlora_tokens_per_s": tokens / t_nlora,
        "nlora_penalty_overhead_pct": (t_nlora / t_train - 1.0) * 100.0,
        "forward_tokens_per_s": tokens / t_fwd,
        "generate_new_tokens_per_s": b * args.gen_tokens / t_gen,
        "matmul_gflops": 2 * mm * mk * mn / t_mm / 1e9,
        "train_peak_rss_mib": train_rss,
        "peak_rss_mib": peak_rss_mib(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28} {v:.1f}" if isinstance(v, float) else f"{k:28} {v}")


if __name__ == "__main__":
    main()
