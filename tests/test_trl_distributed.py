"""TRL's fused LM head on fastloss (issue #21) under the setups the transformers patch supports: DDP and FSDP2
(``fully_shard``; the head in the root group, in its own group, with the final norm, bf16 mixed precision), and a
PEFT LoRA model built the way TRL builds it (the fused head added to the base model, then ``get_peft_model``),
gloo on 2 CPU processes. Against TRL's own fused head under the same sharding: the loss (log-probs and entropy) of
each of two SGD steps, every gradient after the second, the parameters after it; fastloss's ops seen running."""

import copy
import os

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from _gloo import spawn  # noqa: E402

pytestmark = [pytest.mark.stacks,
              pytest.mark.skipif(os.environ.get("FASTLOSS_STACKS") != "1",
                                 reason="training-stack test: set FASTLOSS_STACKS=1 (make test-stacks)"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

V, B, T = 311, 2, 12
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
CASES = ("ddp", "fsdp_root", "fsdp_head", "fsdp_norm_head", "fsdp_head_bf16", "lora_ddp", "lora_fsdp_root")


def _model(lora):
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    add_fused_lm_head(model, temperature=0.9, outputs=OUTPUTS)  # before PEFT, as TRL's trainers do
    if lora:
        import peft

        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    return model


def _shard(model, case):
    if case.endswith("ddp"):
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
        if case.endswith("bf16") else {}
    inner = model.base_model.model if case.startswith("lora_") else model
    for layer in inner.model.layers:
        fully_shard(layer, **kw)
    if "norm_head" in case:
        fully_shard([inner.model.norm, inner.lm_head], **kw)
    elif "head" in case:
        fully_shard(inner.lm_head, **kw)
    fully_shard(model, **kw)
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, rank):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, ran = [], 0
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(100 * rank + step)
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            # a GRPO-like objective: the log-probs' loss plus an entropy bonus (both outputs carry gradients)
            loss = out.loss - 0.01 * out.entropy.sum() / out.label_mask.sum()
            loss.backward()
        ran += sum(1 for e in prof.events() if e.name.startswith("fastloss::"))
        stats = torch.stack([out.log_sum_sq_probs.sum(), out.mean_logits.sum(), out.is_top1.sum().float()])
        losses.append(torch.cat([loss.detach().float().reshape(1), stats.detach().float()]))
        grads = {n: _full(p.grad).float() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    params = {n: _full(p.detach()).float() for n, p in model.named_parameters()}
    return losses, grads, params, ran


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_case(rank, case):
    from fastloss.integrations.trl import use_fastloss

    base = _model(case.startswith("lora_"))
    ref, fl = _shard(copy.deepcopy(base), case), _shard(copy.deepcopy(base), case)
    losses_r, grads_r, params_r, ran_r = _train(ref, rank)
    with use_fastloss():
        losses_f, grads_f, params_f, ran_f = _train(fl, rank)
    assert ran_r == 0 and ran_f > 0, (case, ran_r, ran_f)
    # bf16 parameters: TRL's CPU tiles round the logits to bf16, fastloss's CPU chunks compute in float32
    tol = 2 ** -7 if case.endswith("bf16") else 1e-5
    for step, (a, b) in enumerate(zip(losses_f, losses_r)):
        assert _rel(a, b) <= tol, (case, step, a, b)
    assert grads_f.keys() == grads_r.keys() and grads_r, case
    for n in grads_r:
        assert _rel(grads_f[n], grads_r[n]) <= 20 * tol, (case, n, _rel(grads_f[n], grads_r[n]))
    for n in params_r:
        assert _rel(params_f[n], params_r[n]) <= 20 * tol, (case, n)


def _worker(rank, world):
    for case in CASES:
        if case.startswith("lora_"):
            try:
                import peft  # noqa: F401
            except ImportError:
                continue
        _run_case(rank, case)


def test_trl_fused_head_on_fastloss_under_ddp_fsdp2_and_peft():
    spawn(_worker, 2)
