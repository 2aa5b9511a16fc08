#!/usr/bin/env python3
"""Writes the T5 reference fixtures the nlora-model T5 tests compare against.

Run once by a developer (not by CI), with the transformers venv:

    HF_HUB_OFFLINE=1 /root/mlvenv/bin/python scripts/gen_t5_fixtures.py

Nothing is downloaded: the tokenizer is trained here on a few made-up sentences
(a Unigram vocabulary from the `tokenizers` library, wrapped by transformers'
T5Tokenizer so that it has T5's pre-tokenizer, decoder and the post-processor
that appends </s>), and the two models are tiny random T5s built in code:

- t5_v10: T5 v1.0 (ReLU DenseReluDense wi/wo, tied embeddings, decoder output
  rescaled by d_model^-0.5 before the lm_head). config.json is written the way
  the original t5-large's is (no feed_forward_proj, no tie_word_embeddings, so
  both take their defaults) and the checkpoint carries the legacy copies
  encoder/decoder.embed_tokens.weight and the unused
  decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight.
- t5_v11: T5 v1.1 / Flan-T5 (gated-GELU wi_0/wi_1 with gelu_new, untied
  lm_head, no rescale), config.json written like flan-t5-large's.

Both: d_model 32, d_kv 8, 4 heads, 2 encoder + 2 decoder blocks, d_ff 64,
vocabulary 128, 8 relative-attention buckets, max distance 20.

Writes under crates/nlora-model/tests/fixtures/:
  t5_tokenizer/tokenizer.json, tokenizer_config.json
                         the tokenizer (also copied into each model folder)
  t5_tokenizer/cases.json  texts, their ids (transformers and `tokenizers`
                         agree, asserted here) and decoded texts
  t5_buckets.json        relative-position buckets of transformers'
                         T5Attention._relative_position_bucket for two configs
  t5_v10/, t5_v11/       each:
    model/               the Hugging Face folder (config.json,
                         model.safetensors f32, generation_config.json,
                         tokenizer.json, tokenizer_config.json)
    adapter/             a PEFT LoRA adapter (r 4, alpha 8, q and v of every
                         self- and cross-attention) with non-zero lora_B
    expected.safetensors the batch (input_ids, attention_mask, labels, with
                         padding) and, computed in float64 with the adapter:
                         logits, loss, and the gradient of the masked loss
                         w.r.t. every lora_A / lora_B (`<module>.lora_A`);
                         float64 throughout, T5LayerNorm's variance included
                         (stock transformers takes it in float32)
    expected.json        greedy generations (10 new tokens, transformers'
                         generate, f32) with and without the adapter, the
                         smallest top-1/top-2 logit gap seen on the way, and
                         rank-classification scores (sum log-likelihood, f64)
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the Unigram trainer is only reproducible single-threaded
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention, T5LayerNorm  # noqa: E402
from transformers.models.t5.tokenization_t5 import T5Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "crates/nlora-model/tests/fixtures"

VOCAB = 128
TRAINED_PIECES = 100  # the rest of the 128 ids are <extra_id_*> sentinels

CORPUS = [
    "The cat sat on the mat.",
    "A dog runs in the park every morning.",
    "What is the topic of this news article?",
    "The answer is positive.",
    "The answer is negative.",
    "Sports, business, science and world news.",
    "Is the second sentence implied by the first one?",
    "The movie was great and the actors were good.",
    "The food was bad and the service was slow.",
    "Choose the best option: yes, no or maybe.",
    "Task: classify the review. Answer: positive",
    "Dataset: agnews. Option: World, Sports, Business, Sci/Tech",
]

TOKENIZER_CASES = [
    "The cat sat on the mat.",
    "What is the topic of this news article?",
    "  leading and   trailing spaces  ",
    "Answer: positive\nnext line",
    "unknown letters: zzq xj",
    "Unicode: café 日本 🙂",
    "sentinels <extra_id_0> and <extra_id_3> inside",
    "",
]

# The parity batch: sources of different lengths (one longer than the 20-token
# max distance) and targets of different lengths, padded like transformers does.
SOURCES = [
    "What is the topic of this news article? Sports, business, science and world news. "
    "The cat sat on the mat.",
    "The movie was great.",
    "Is the second sentence implied by the first one? yes, no or maybe",
]
TARGETS = ["positive", "The answer is negative.", "maybe"]
SCORE_CANDIDATES = ["positive", "negative", "The answer is positive.", "maybe"]

COMMON = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    initializer_factor=1.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

# config.json as the published checkpoints write it (transformers 4 era).
CONFIG_V10 = {  # like t5-large: defaults for feed_forward_proj, tie_word_embeddings, ...
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 64,
    "d_kv": 8,
    "d_model": 32,
    "decoder_start_token_id": 0,
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "num_heads": 4,
    "num_layers": 2,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
    "vocab_size": VOCAB,
}
CONFIG_V11 = {  # like flan-t5-large
    "architectures": ["T5ForConditionalGeneration"],
    "d_ff": 64,
    "d_kv": 8,
    "d_model": 32,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "n_positions": 512,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "num_layers": 2,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 20,
    "relative_attention_num_buckets": 8,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": VOCAB,
}


def build_tokenizer(out: Path):
    """A Unigram vocabulary trained with `tokenizers`, in transformers' T5Tokenizer."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=TRAINED_PIECES,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
    )
    tok.train_from_iterator(CORPUS, trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    assert [v[0] for v in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    # The trainer's scores differ in the last bits from run to run, and it
    # staggers the single characters it must keep in hash order: round, give
    # every single character one score below the rest, and sort, so that the
    # ids are reproducible.
    floor = round(min(s for _, s in vocab[3:]), 3) - 1.0
    pieces = sorted(
        ((p, floor if len(p) == 1 else round(s, 3)) for p, s in vocab[3:]),
        key=lambda v: (-v[1], v[0]),
    )
    vocab = [list(v) for v in vocab[:3]] + [list(v) for v in pieces]
    extra = VOCAB - len(vocab)
    assert extra > 0, f"trained {len(vocab)} pieces, more than the model vocabulary {VOCAB}"
    t5tok = T5Tokenizer(vocab=[tuple(v) for v in vocab], extra_ids=extra)
    out.mkdir(parents=True, exist_ok=True)
    t5tok.save_pretrained(out)
    assert len(t5tok) == VOCAB, len(t5tok)

    hf = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    cases = []
    for text in TOKENIZER_CASES:
        ids = hf(text).input_ids
        assert ids == raw.encode(text).ids, text
        assert ids[-1] == hf.eos_token_id, "the post-processor appends </s>"
        cases.append(
            {
                "text": text,
                "ids": ids,
                "tokens": hf.convert_ids_to_tokens(ids),
                "plain_ids": raw.encode(text, add_special_tokens=False).ids,
                "decoded": hf.decode(ids, skip_special_tokens=True),
                "decoded_with_special": hf.decode(ids, skip_special_tokens=False),
            }
        )
    meta = {
        "vocab_size": len(t5tok),
        "pad_token_id": hf.pad_token_id,
        "eos_token_id": hf.eos_token_id,
        "unk_token_id": hf.unk_token_id,
        "extra_id_0": hf.convert_tokens_to_ids("<extra_id_0>"),
        "cases": cases,
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return hf


def buckets():
    rel = torch.arange(-300, 301)
    out = []
    for nb, md in [(8, 20), (32, 128)]:
        for bidirectional in [True, False]:
            b = T5Attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md
            )
            out.append(
                {
                    "num_buckets": nb,
                    "max_distance": md,
                    "bidirectional": bidirectional,
                    "relative_positions": rel.tolist(),
                    "buckets": b.tolist(),
                }
            )
    (FIXTURES / "t5_buckets.json").write_text(json.dumps(out) + "\n")


def random_state(variant: str, seed: int):
    """A random T5 state dict; layer norms and relative biases perturbed so they matter."""
    torch.manual_seed(seed)
    if variant == "v10":
        cfg = T5Config(**COMMON, feed_forward_proj="relu")
    else:
        cfg = T5Config(**COMMON, num_decoder_layers=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for k in list(sd):
        if "layer_norm" in k:
            sd[k] = 1.0 + 0.3 * torch.randn_like(sd[k])
        elif "relative_attention_bias" in k:
            sd[k] = 2.0 * torch.randn_like(sd[k])
        elif k.endswith((".o.weight", ".wo.weight")):
            # sublayer outputs comparable to the embeddings: with tied embeddings
            # a random model otherwise just repeats its input token
            sd[k] = 8.0 * sd[k]
    out = {"shared.weight": sd["shared.weight"]}
    for k, v in sd.items():
        if k.startswith(("encoder.block", "decoder.block", "encoder.final", "decoder.final")):
            out[k] = v
    if variant == "v10":
        # legacy copies in old checkpoints, equal to shared.weight
        out["encoder.embed_tokens.weight"] = out["shared.weight"].clone()
        out["decoder.embed_tokens.weight"] = out["shared.weight"].clone()
        out["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.randn(8, 4)
    else:
        out["lm_head.weight"] = torch.randn(VOCAB, 32)
    return {k: v.float().contiguous() for k, v in out.items()}


def write_model_folder(variant: str, folder: Path, tok_dir: Path, seed: int):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(random_state(variant, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = CONFIG_V10 if variant == "v10" else CONFIG_V11
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}, indent=2) + "\n"
    )
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tok_dir / f, folder / f)


def load(folder: Path, dtype):
    model, info = T5ForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def check_variant_semantics(variant: str, model, folder: Path):
    sd = load_file(str(folder / "model.safetensors"))
    if variant == "v10":
        assert model.config.scale_decoder_outputs
        assert model.config.feed_forward_proj == "relu"
        assert model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    else:
        assert not model.config.scale_decoder_outputs
        assert model.config.dense_act_fn == "gelu_new" and model.config.is_gated_act
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
        assert torch.equal(model.lm_head.weight.float(), sd["lm_head.weight"])


def batch(tok):
    src = tok(SOURCES, padding=True, return_tensors="pt")
    tgt = tok(TARGETS, padding=True, return_tensors="pt")
    labels = tgt.input_ids.clone()
    labels[tgt.attention_mask == 0] = -100
    assert tok.padding_side == "right"
    assert src.attention_mask.min() == 0 and (labels == -100).any(), "the batch must hold padding"
    assert src.attention_mask.sum(1).max() > 20, "one source longer than the max distance"
    return src.input_ids, src.attention_mask, labels


def make_adapter(variant: str, folder: Path, adapter_dir: Path, seed: int):
    torch.manual_seed(seed + 1)
    model = load(folder, torch.float32)
    cfg = LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"]
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
    n_sites = sum(1 for n, _ in pm.named_parameters() if "lora_A" in n)
    assert n_sites == 2 * 2 + 2 * 2 * 2, n_sites  # enc self q,v x2 blocks; dec self+cross q,v x2
    pm.save_pretrained(adapter_dir)
    # no machine-specific path in the fixture; a stable order
    cfg_path = adapter_dir / "adapter_config.json"
    saved = json.loads(cfg_path.read_text())
    saved["base_model_name_or_path"] = f"random-t5-{variant}"
    saved["target_modules"] = sorted(saved["target_modules"])
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def t5_layer_norm_in_input_dtype(self, hidden_states):
    """T5LayerNorm.forward with the variance in the input's dtype.

    transformers computes the variance in float32 whatever the input dtype,
    which would cap a float64 reference at float32 accuracy (~1e-7); for
    float32 inputs this is the same computation as transformers'."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def expected(variant: str, folder: Path, adapter_dir: Path, out: Path, tok):
    input_ids, attention_mask, labels = batch(tok)
    stock_layer_norm = T5LayerNorm.forward
    T5LayerNorm.forward = t5_layer_norm_in_input_dtype

    # float64 reference: logits, loss, gradients of the masked loss
    base64 = load(folder, torch.float64)
    check_variant_semantics(variant, base64, folder)
    pm64 = PeftModel.from_pretrained(base64, adapter_dir, is_trainable=True).eval()
    res = pm64(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    res.loss.backward()
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "logits": res.logits.detach(),
        "loss": res.loss.detach().reshape(1),
    }
    prefix = "base_model.model."
    for name, p in pm64.named_parameters():
        if "lora_" not in name:
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name
        module, kind = name[len(prefix):].split(".lora_")
        tensors[f"{module}.lora_{kind.split('.')[0]}"] = p.grad.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "expected.safetensors"))

    # rank classification: sum log-likelihood of each candidate target given source 0
    n0 = int(attention_mask[0].sum())
    prompt = input_ids[0, :n0].tolist()
    scores = []
    with torch.no_grad():
        for cand in SCORE_CANDIDATES:
            c = tok(cand).input_ids
            o = pm64(input_ids=torch.tensor([prompt]), labels=torch.tensor([c]))
            lp = torch.log_softmax(o.logits[0], -1)
            scores.append(float(lp[torch.arange(len(c)), torch.tensor(c)].sum()))

    # greedy generation in float32, as transformers runs it
    T5LayerNorm.forward = stock_layer_norm
    base32 = load(folder, torch.float32)
    pm32 = PeftModel.from_pretrained(base32, adapter_dir).eval()
    gen_kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=10,
        do_sample=False,
        num_beams=1,
        output_scores=True,
        return_dict_in_generate=True,
    )

    def run_stop(m, kwargs, stop_id):
        with torch.no_grad():
            g = m.generate(**kwargs)
        seqs = g.sequences[:, 1:].tolist()
        assert any(stop_id in r for r in seqs) and not all(stop_id in r for r in seqs)
        return seqs

    def run(m):
        with torch.no_grad():
            g = m.generate(**gen_kwargs)
        seqs = g.sequences
        assert (seqs[:, 0] == 0).all(), "generation starts from decoder_start_token_id = pad = 0"
        gap = float("inf")
        done = torch.zeros(seqs.shape[0], dtype=torch.bool)
        for step, s in enumerate(g.scores):
            top = s.topk(2, -1).values
            gaps = (top[:, 0] - top[:, 1])[~done]
            if len(gaps):
                gap = min(gap, float(gaps.min()))
            done |= seqs[:, step + 1] == 1
        return seqs[:, 1:].tolist(), gap

    with_adapter, gap_a = run(pm32)
    # a second run that stops on a token the first run produced mid-row, so
    # that finished rows (padded by transformers) and EOS handling are compared
    stop_id = next(t for t in with_adapter[0][1:7] if any(t not in r for r in with_adapter[1:]))
    gen_kwargs["eos_token_id"] = stop_id
    with_stop = run_stop(pm32, gen_kwargs, stop_id)
    del gen_kwargs["eos_token_id"]
    with pm32.disable_adapter():
        without_adapter, gap_b = run(pm32)
    assert with_adapter != without_adapter, "the adapter must change the generation"
    prompts = [input_ids[i, : int(attention_mask[i].sum())].tolist() for i in range(len(SOURCES))]
    meta = {
        "variant": variant,
        "sources": SOURCES,
        "targets": TARGETS,
        "prompts": prompts,
        "max_new_tokens": 10,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "generated_with_adapter": with_adapter,
        "generated_without_adapter": without_adapter,
        "stop_token_id": stop_id,
        "generated_with_adapter_stopping": with_stop,
        "decoded_without_adapter": tok.batch_decode(without_adapter, skip_special_tokens=True),
        "min_top2_logit_gap": min(gap_a, gap_b),
        "score_prompt": prompt,
        "score_candidates": [tok(c).input_ids for c in SCORE_CANDIDATES],
        "scores": scores,
        "loss": float(res.loss.detach()),
    }
    (out / "expected.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(variant, "loss", meta["loss"], "min top-2 gap", meta["min_top2_logit_gap"])
    print("  with adapter   ", with_adapter)
    print("  without adapter", without_adapter)


def main():
    torch.set_grad_enabled(True)
    tok_dir = FIXTURES / "t5_tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tok = build_tokenizer(tok_dir)
    buckets()
    for variant, seed in [("v10", 13), ("v11", 11)]:
        out = FIXTURES / f"t5_{variant}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_model_folder(variant, out / "model", tok_dir, seed)
        with tempfile.TemporaryDirectory() as tmp:
            make_adapter(variant, out / "model", Path(tmp), seed)
            (Path(tmp) / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
            shutil.copytree(tmp, out / "adapter")
        expected(variant, out / "model", out / "adapter", out, tok)
    for p in sorted(FIXTURES.glob("t5*/**/*")):
        if p.is_file():
            assert p.stat().st_size < 400_000, p
            print(f"{p.stat().st_size:8d}  {p.relative_to(REPO)}")


if __name__ == "__main__":
    main()
