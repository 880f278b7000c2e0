"""The transformers side of the Hugging Face interop proof (run by interop/run).

    interop.py fixtures DEST        writes DEST/hf_{tiny,small,gqa}: transformers-made
                                    MixtralForCausalLM directories plus expected.safetensors
                                    (fixed ids and the logits transformers computes for them)
    interop.py logits HFDIR BATCH DUMP
                                    loads HFDIR with from_pretrained and compares its logits
                                    for BATCH's ids with `moe dump`'s logits in DUMP
    interop.py tokens HFDIR TEXT IDS
                                    checks that AutoTokenizer encodes TEXT to IDS (JSON list)

Each check prints one PASS/FAIL line; the exit status is the number of failures.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging

logging.disable_progress_bar()

TOLERANCE = 1e-4

# Three shapes: tiny-like (MQA, one tokenizer), small-like (d = 64, θ = 10000) and GQA.
# Kept small so the committed fixtures stay small; rms_norm_eps is transformers' 1e-5.
FIXTURES = {
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=64),
    "small": dict(vocab_size=128, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=64, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gqa": dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                num_experts_per_tok=2, max_position_embeddings=32),
}

TOKENIZER_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 4


def rescale(model, seed):
    """Weights of order one (transformers initialises with std 0.02, which would make
    every logit nearly 0 and a 1e-4 comparison meaningless): matrices ~ N(0, 2/fan_in),
    norm gains ~ 1 + N(0, 0.1²) so that a swapped norm would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (2 / p.shape[-1]) ** 0.5)


def byte_level_tokenizer(vocab_size):
    """A byte-level BPE like `moe train`'s, trained by the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def hf_logits(directory, ids):
    model = MixtralForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits


def fixtures(dest):
    dest = Path(dest)
    for i, (name, fields) in enumerate(FIXTURES.items()):
        directory = dest / f"hf_{name}"
        torch.manual_seed(i)
        model = MixtralForCausalLM(MixtralConfig(**fields)).eval()
        rescale(model, seed=100 + i)
        model.save_pretrained(directory)
        if name == "tiny":
            byte_level_tokenizer(fields["vocab_size"]).save_pretrained(directory)
        gen = torch.Generator().manual_seed(200 + i)
        ids = torch.randint(0, fields["vocab_size"], (2, 12), generator=gen)
        logits = hf_logits(directory, ids)
        save_file({"ids": ids.to(torch.int32), "logits": logits.contiguous()},
                  directory / "expected.safetensors")
        print(f"wrote {directory}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.3f}")
    return 0


def report(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return 0 if ok else 1


def compare_logits(directory, batch, dump):
    ids = json.loads(Path(batch).read_text())["ids"]
    theirs = hf_logits(directory, ids)
    ours = load_file(dump)["logits"]
    if theirs.shape != ours.shape:
        return report(f"logits {directory}", False, f"shapes {tuple(theirs.shape)} vs {tuple(ours.shape)}")
    diff = (theirs - ours).abs().max().item()
    detail = f"max |transformers − moe| = {diff:.2e} (max |logit| {theirs.abs().max():.2f})"
    return report(f"logits {directory}", diff <= TOLERANCE, detail)


def compare_tokens(directory, text, ids):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = json.loads(ids)
    same = theirs == ours and tokenizer.decode(theirs) == text
    return report(f"tokenizer {directory}", same, f"{len(theirs)} tokens, {'equal' if same else f'{theirs} vs {ours}'}")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    failures = {"fixtures": fixtures, "logits": compare_logits, "tokens": compare_tokens}[command](*args)
    sys.exit(failures)
