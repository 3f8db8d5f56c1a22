"""The trainer against an independent plain-PyTorch DPO (a transformers model, each sequence forwarded alone,
torch's AdamW and gradient clipping) for a few steps of full fine-tuning on real hh-rlhf pairs: the same
losses, gradient norms and weights step for step, so schedules, clipping, Adam and masks stay right. Each
step's 8 pairs are packed into at least 3 micro-batches holding different numbers of pairs, so gradient
accumulation over uneven micro-batches is part of what is checked."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the trajectory test needs torch (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers")

from prefopt_jax import data  # noqa: E402
from prefopt_jax.config import load_config  # noqa: E402
from prefopt_jax.train.loop import train  # noqa: E402

STEPS, LR, CLIP, DECAY, BETA = 4, 2e-3, 0.005, 0.01, 0.1


def seq_logp(model, prompt, completion):
    """Summed log-prob of the completion after the prompt, from a forward of the two alone."""
    ids = torch.tensor(np.concatenate([prompt, completion]), dtype=torch.long)[None]
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logp[rows, torch.tensor(completion, dtype=torch.long)].sum()


@pytest.mark.integration
def test_full_finetuning_follows_a_plain_pytorch_dpo(tmp_path, shared_file, smollm2_tokenizer):
    tok = smollm2_tokenizer
    hf_cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(str(tmp_path / "model"))
    rows = [json.loads(line) for line in shared_file("hh_rlhf_test.jsonl").read_text().splitlines()[2303:2311]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # 8 helpful-base pairs

    cfg = load_config(None, [
        f"model.source={tmp_path / 'model'}", f"data.source={tmp_path / 'pairs.jsonl'}", "data.eval_fraction=0.0",
        "data.max_length=256", "data.max_prompt_length=128", f"train.steps={STEPS}", "train.batch_size=8",
        f"train.learning_rate={LR}", "train.schedule=constant", "train.warmup_steps=0", f"train.max_grad_norm={CLIP}",
        f"train.weight_decay={DECAY}", "train.lora_rank=0", "train.reference=frozen", "mesh.fsdp=1",
        "eval.generate=false", f"output.dir={tmp_path / 'run'}", "output.tensorboard=false", "loss.name=dpo",
        f"loss.beta={BETA}", "data.min_pack_length=0",  # rows as long as the longest pair: uneven micro-batches
    ])  # fmt: skip
    state, history = train(cfg)
    # uneven: 8 pairs in 3 to 7 micro-batches cannot all hold the same number
    assert all(3 <= h["micro_batches"] < 8 and h["micro_batches"] != 4 for h in history), history
    assert all(h["num_groups"] == 8 for h in history)  # the device trained exactly the step's 8 pairs

    examples = data.prepare(tmp_path / "pairs.jsonl", tok, max_length=256, max_prompt_length=128).train
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=DECAY)
    want = []
    for _ in range(STEPS):
        terms = []
        for e in examples:
            with torch.no_grad():
                ref_margin = seq_logp(reference, e.prompt, e.chosen) - seq_logp(reference, e.prompt, e.rejected)
            margin = seq_logp(policy, e.prompt, e.chosen) - seq_logp(policy, e.prompt, e.rejected)
            terms.append(-torch.nn.functional.logsigmoid(BETA * (margin - ref_margin)))
        loss = torch.stack(terms).mean()
        opt.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)
        opt.step()
        want.append((float(loss), float(norm)))

    assert want[1][0] < want[0][0]  # the first update already moves (no zero learning rate at step 0)
    assert min(n for _, n in want) > CLIP  # clipping engaged at every step
    np.testing.assert_allclose([h["loss"] for h in history], [w[0] for w in want], rtol=1e-4)
    np.testing.assert_allclose([h["grad_norm"] for h in history], [w[1] for w in want], rtol=1e-4)
    embed = policy.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(state["trainable"]["embed"]), embed, rtol=1e-3, atol=1e-5)
    down = policy.model.layers[1].mlp.down_proj.weight.detach().numpy()  # [D, F] in torch, [F, D] here
    np.testing.assert_allclose(np.asarray(state["trainable"]["layers"]["down"][1]), down.T, rtol=1e-3, atol=1e-5)
