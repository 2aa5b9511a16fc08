#!/usr/bin/env python3
"""Writes the LLaMA parity fixtures of crates/nlora-model/tests/llama_parity.rs.

Run once by hand (not by CI), with the project's reference venv:
    /root/mlvenv/bin/python scripts/gen_llama_fixtures.py

For two tiny random models (LLaMA with tied embeddings; Qwen2 with q/k/v
biases and an untied lm_head) it writes, under
crates/nlora-model/tests/fixtures/<name>/:
  model/      config.json + model.safetensors (transformers save_pretrained)
  adapter/    a PEFT LoRA on q_proj/v_proj (r=4, alpha=8, random non-zero B)
  train.safetensors
              input_ids, attention_mask, position_ids, labels (-100 = no loss),
              logits (PEFT model, f32), loss (masked mean CE),
              grad.<module>.lora_A / grad.<module>.lora_B (d loss / d param)
  generate.safetensors
              prompt_ids/prompt_mask (left-padded), generated (greedy, 10 new
              tokens, PEFT model), score_prompt, score_candidates (padded with
              -1), scores (sum log-likelihood of each candidate)
Nothing is downloaded: the models are built from random weights.
"""
import json
import os

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "nlora-model", "tests", "fixtures")

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

VARIANTS = {
    "llama_tiny": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama_qwen2_tiny": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False),
    ),
}


class NearTie(Exception):
    pass


def randomise(model, gen):
    """Weights with std 0.15 (not the 0.02 init) so logits are spread and argmax margins clear;
    norm weights and biases perturbed so their use is tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def positions(mask):
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def build(name, cfg_cls, model_cls, extra, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cfg = cfg_cls(**COMMON, **extra)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).float().eval()
    randomise(model, gen)
    out_dir = os.path.join(OUT, name)
    model.save_pretrained(os.path.join(out_dir, "model"), safe_serialization=True)

    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_A" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(os.path.join(out_dir, "adapter"))
    os.remove(os.path.join(out_dir, "adapter", "README.md"))  # PEFT's model-card boilerplate
    peft_model.eval()  # dropout 0 anyway; eval for determinism

    # --- training batch: full, right-padded and left-padded rows
    b, s = 3, 12
    ids = torch.randint(3, 256, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    ids[mask == 0] = 0
    labels = torch.full((b, s), -100, dtype=torch.long)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 3:9] = ids[1, 3:9]
    labels[2, 7:] = ids[2, 7:]
    pos = positions(mask)
    peft_model.zero_grad()
    out = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    out.loss.backward()
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "labels": labels,
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(1),
    }
    prefix = "base_model.model."
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
            module = n[len(prefix):].split(".lora_")[0]
            which = "lora_A" if ".lora_A." in n else "lora_B"
            tensors[f"grad.{module}.{which}"] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(out_dir, "train.safetensors"))

    # --- greedy generation on left-padded prompts, with the adapter
    prompts = [torch.randint(3, 256, (5,), generator=gen), torch.randint(3, 256, (8,), generator=gen)]
    width = max(len(p) for p in prompts)
    p_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    p_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        p_ids[i, width - len(p):] = p
        p_mask[i, width - len(p):] = 1
    with torch.no_grad():
        res = peft_model.generate(input_ids=p_ids, attention_mask=p_mask, max_new_tokens=10,
                                  do_sample=False, pad_token_id=0, eos_token_id=2,
                                  output_scores=True, return_dict_in_generate=True)
    generated = res.sequences[:, width:]
    # A near-tie at any step would make the parity test depend on rounding.
    for step, sc in enumerate(res.scores):
        top = sc.topk(2, dim=-1).values
        margin = (top[:, 0] - top[:, 1]).min().item()
        if margin < 1e-3:
            raise NearTie(f"{name}: argmax margin {margin:.2e} at step {step}")

    # --- rank-classification scores of candidate continuations
    prompt = torch.randint(3, 256, (6,), generator=gen)
    cands = [torch.randint(3, 256, (n,), generator=gen) for n in (1, 3, 2)]
    scores = []
    with torch.no_grad():
        for c in cands:
            seq = torch.cat([prompt, c]).unsqueeze(0)
            logp = peft_model(input_ids=seq).logits.float().log_softmax(-1)[0]
            s_ = sum(logp[len(prompt) - 1 + j, c[j]].item() for j in range(len(c)))
            scores.append(s_)
    cand_pad = torch.full((len(cands), 3), -1, dtype=torch.long)
    for i, c in enumerate(cands):
        cand_pad[i, : len(c)] = c
    save_file({
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "generated": generated.contiguous(),
        "score_prompt": prompt,
        "score_candidates": cand_pad,
        "scores": torch.tensor(scores, dtype=torch.float64),
    }, os.path.join(out_dir, "generate.safetensors"))
    print(name, "loss", out.loss.item(), "generated", generated.tolist(), "scores", scores)


def main():
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(VARIANTS.items()):
        # the first seed whose greedy decoding has no near-tie (parity must not hinge on rounding)
        for seed in range(1234 + 100 * i, 1234 + 100 * i + 50):
            try:
                build(name, cfg_cls, model_cls, extra, seed)
                break
            except NearTie as e:
                print("seed", seed, e, "- trying the next seed")
        else:
            raise SystemExit(f"{name}: no seed without a near-tie")


if __name__ == "__main__":
    main()
