"""TRL's trainers on fastloss's kernels: ``fastloss.integrations.trl.use_fastloss()`` puts fastloss behind TRL's fused
LM head (``trl.trainer.utils._ChunkedLogProbFunction``: SFT, DPO, GRPO, KTO, RLOO) and its chunked divergence
(``trl.trainer.distillation_trainer.ChunkedDivergenceFunction``: DistillationTrainer).

Each trainer runs three optimizer steps on a tiny random Llama (built here from a fixed seed, float32, CPU) and a
tiny in-memory dataset twice: with TRL's own kernels (the reference) and inside ``use_fastloss()``, from the same
fresh copy of the model and the same seeds. The logged losses and head metrics and the trained parameters must
agree; fastloss's ops must have run in the second run only (profiler), and TRL's own head / divergence in the
first only; the reference must be finite and must have moved the parameters.

Needs trl (``make test-stacks``); marked ``stacks`` (FASTLOSS_STACKS=1). Nothing is downloaded: the tokenizer is a
word-level ``tokenizers`` vocabulary built in memory (tests/_trl_tiny.py); GRPO / RLOO build their reference model
"from the policy's path", which is the initial model saved under tmp_path.
"""

import contextlib
import copy
import functools
import math

import pytest
import torch
from conftest import rel_err

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

import _trl_tiny as tiny  # noqa: E402
import transformers  # noqa: E402
from fastloss.integrations.trl import use_fastloss as fastloss_context  # noqa: E402
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

pytestmark = pytest.mark.stacks

STEPS = 3

# Tolerances (float32 everywhere). The two backends compute the same float32 math in a different order (TRL: one
# GEMM tile over the vocabulary, then torch ops for the online log-sum-exp; fastloss: its own chunked GEMM and row
# kernel), so per-token log-probabilities differ by a few ulps and nothing more. A logged metric is a sum / mean of
# those, and at steps 2-3 also depends on parameters that already differ by that much:
# |fastloss - trl| <= METRIC_RTOL * |trl| + METRIC_ATOL. Measured (trl 1.16.0, fastloss at 6ff1f4b): every logged
# value within 1.2e-7 relative once 1e-6 absolute is allowed -- the largest, 1-2 ulps of a sequence log-probability
# (~-20, ulp 1.9e-6) or of a grad norm (~56, 7.6e-6). METRIC_ATOL covers quantities that are differences of such
# sums and so ~0 up to their rounding: KL to a reference equal to the policy at step 1, GRPO / RLOO's on-policy loss
# (sum(advantage) * ratio = 0 at the first step), KTO's rewards (beta * (logp - ref_logp)). An entropy or
# log-probability off by 1e-5 relative fails.
METRIC_RTOL = 1e-6
METRIC_ATOL = 2e-6
# Gradients and parameters. Each optimizer step's gradients (after clipping, as the optimizer sees them) are
# recorded and compared per tensor: relative error norm <= GRAD_REL. The optimizer is plain SGD (optim="sgd") so
# that the trained parameters differ by lr * (gradient differences) plus the float32 rounding of each update
# (ulp(1.0) = 1.2e-7 on the norm weights): max abs difference <= PARAM_ABS. AdamW would not do: its first steps
# move every weight by ~lr * sign(g) whatever |g|, so a weight whose gradient is a near-cancelling sum (|g| ~ 1e-8,
# rounding error ~1e-10) gets an update that differs by ~1e-2 * lr between two correct backends (measured: 2.3e-5
# max abs on a down_proj weight after 3 AdamW steps at lr 1e-3, with a 2.5e-6 relative error norm).
GRAD_REL = 1e-5
PARAM_ABS = 1e-6
LR = 0.05

# Logged keys that are wall-clock times, not computations.
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _common(tmp_path, tag, **kw):
    return dict(output_dir=str(tmp_path / tag), report_to="none", max_steps=STEPS, per_device_train_batch_size=4,
                logging_steps=1, save_strategy="no", eval_strategy="no", bf16=False, fp16=False, use_cpu=True,
                dataloader_num_workers=0, seed=0, data_seed=0, learning_rate=LR, optim="sgd", **kw)


def _reward(completions, **kwargs):
    # Length and the number of a few words: different completions of a prompt get different rewards.
    return [0.3 * len(c.split()) + c.count("w1") + 0.5 * c.count("w7") - 0.2 * c.count("w3") for c in completions]


# ---------------------------------------------------------------- the six trainers


def _reference():
    # Another model than the initial policy: the implicit rewards log(pi / pi_ref) are O(1) from the first step,
    # not rounding noise around 0 (whose sign would decide DPO's rewards/accuracies).
    return tiny.model(seed=1)


def _completions(n, lo, hi, seed):
    # The trainers concatenate prompt + completion as strings: a leading space keeps the word boundary.
    return [" " + t for t in tiny.texts(n, lo, hi, seed)]


def _mixed(model, tok, prompts, seed):
    # Every other completion is the initial model's greedy continuation: mean_token_accuracy (is_top1) is ~0.5,
    # not the ~1 / VOCAB of random text, so a wrong argmax shows.
    greedy = tiny.greedy_completions(model, tok, prompts, 6)
    rand = _completions(len(prompts), 3, 6, seed)
    return [g if i % 2 == 0 else r for i, (g, r) in enumerate(zip(greedy, rand))]


def _sft(model, tok, tmp_path, tag):
    prompts = tiny.texts(8, 2, 5, 1)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "completion": _mixed(model, tok, prompts, 2)})
    args = trl.SFTConfig(**_common(tmp_path, tag), max_length=16)  # prompt-completion: the prompt's labels -100
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def _dpo(model, tok, tmp_path, tag):
    prompts = tiny.texts(8, 2, 5, 1)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": _mixed(model, tok, prompts, 2),
                                     "rejected": _completions(8, 2, 6, 3)})
    args = trl.DPOConfig(**_common(tmp_path, tag), max_length=16)
    return trl.DPOTrainer(model=model, ref_model=_reference(), args=args, train_dataset=ds,
                          processing_class=tok)


def _lora():
    peft = pytest.importorskip("peft")

    # init_lora_weights=False: B is random too, so the adapters change the head's input from the first step
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _sft_lora(model, tok, tmp_path, tag):
    """SFT of LoRA adapters, the trainer wrapping the model with PEFT (the fused head is added before, as TRL does)."""
    prompts = tiny.texts(8, 2, 5, 1)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "completion": _mixed(model, tok, prompts, 2)})
    args = trl.SFTConfig(**_common(tmp_path, tag), max_length=16)
    return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora())


def _dpo_lora(model, tok, tmp_path, tag):
    """DPO of LoRA adapters with no reference model: TRL's reference is the policy with its adapters disabled."""
    prompts = tiny.texts(8, 2, 5, 1)
    ds = datasets.Dataset.from_dict({"prompt": prompts, "chosen": _mixed(model, tok, prompts, 2),
                                     "rejected": _completions(8, 2, 6, 3)})
    args = trl.DPOConfig(**_common(tmp_path, tag), max_length=16)
    return trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=_lora())


def _kto(model, tok, tmp_path, tag):
    ds = datasets.Dataset.from_dict({"prompt": tiny.texts(8, 2, 5, 1), "completion": _completions(8, 2, 6, 2),
                                     "label": [True, False, False, True, True, False, True, False]})
    args = trl.KTOConfig(**_common(tmp_path, tag), max_length=16)
    return trl.KTOTrainer(model=model, ref_model=_reference(), args=args, train_dataset=ds,
                          processing_class=tok)


def _grpo(model, tok, tmp_path, tag):
    # beta > 0: a reference model (loaded from the policy's path) scored by the fused head too; num_iterations=2:
    # the old log-probabilities come from the fused head and the ratio is not 1 at the second step; temperature 0.7:
    # the head divides the logits by it.
    ds = datasets.Dataset.from_dict({"prompt": tiny.texts(8, 2, 5, 1)})
    args = trl.GRPOConfig(**_common(tmp_path, tag), max_completion_length=6, num_generations=2, beta=0.1,
                          num_iterations=2, temperature=0.7)
    return trl.GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok)


def _rloo(model, tok, tmp_path, tag):
    ds = datasets.Dataset.from_dict({"prompt": tiny.texts(8, 2, 5, 1)})
    args = trl.RLOOConfig(**_common(tmp_path, tag), max_completion_length=6, num_generations=2, beta=0.1)
    return trl.RLOOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok)


def _distill(beta):
    def build(model, tok, tmp_path, tag):
        # A wider, sharper teacher (hidden 48, larger weights): only the vocabulary is shared.
        teacher = tiny.model(seed=7, hidden=48, init_std=0.4)
        ds = datasets.Dataset.from_dict({"prompt": tiny.texts(8, 2, 5, 1)})
        args = trl.DistillationConfig(**_common(tmp_path, tag), max_completion_length=6, beta=beta,
                                      temperature=0.9)
        return trl.DistillationTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds,
                                       processing_class=tok)
    return build


# Logged metrics computed from the fused head / divergence outputs, which each run must log (all logged values are
# compared; these must be among them).
HEAD_METRICS = {
    "sft": {"loss", "entropy", "mean_token_accuracy"},
    "dpo": {"loss", "entropy", "mean_token_accuracy", "logps/chosen", "logps/rejected", "rewards/chosen",
            "rewards/margins", "rewards/accuracies"},
    "kto": {"loss", "kl", "entropy", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"},
    "grpo": {"loss", "kl", "entropy"},
    "rloo": {"loss", "kl", "entropy"},
    "distill": {"loss", "entropy"},
}

TRAINERS = {"sft": _sft, "dpo": _dpo, "kto": _kto, "grpo": _grpo, "rloo": _rloo,
            # PEFT LoRA adapters, the trainer wrapping the model (peft_config=)
            "sft_lora": _sft_lora, "dpo_lora": _dpo_lora,
            # beta: 0 forward KL, 1 reverse KL (TRL's default), else the generalized JSD
            "distill_jsd": _distill(0.5), "distill_reverse_kl": _distill(1.0), "distill_forward_kl": _distill(0.0)}


# ---------------------------------------------------------------- running one trainer


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """The initial policy, saved so that GRPO / RLOO can build their reference model from its path offline."""
    model = tiny.model(seed=0)
    path = tmp_path_factory.mktemp("trl-tiny-llama")
    model.save_pretrained(path)
    model.config._name_or_path = str(path)
    return model


def _counting(monkeypatch, cls):
    """Counts the calls of a TRL autograd Function's forward (TRL's own kernel path)."""
    calls = [0]
    original = cls.forward

    @functools.wraps(original)  # the same signature: fastloss checks TRL's before patching
    def forward(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "forward", staticmethod(forward))
    return calls


def _train(kind, initial, tmp_path, monkeypatch, use_fastloss):
    """Trains a fresh copy of ``initial``; returns the step logs, the generated sequences, the trained and initial
    parameters, the number of fastloss:: op calls and of calls to TRL's own head / divergence."""
    tag = "fastloss" if use_fastloss else "trl"
    model = copy.deepcopy(initial)
    tok = tiny.tokenizer()
    generated = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out.detach().clone())
        return out

    model.generate = recording_generate  # the trainers call the unwrapped model's generate
    grads = []

    class RecordGrads(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    with contextlib.ExitStack() as stack:
        trl_calls = [_counting(stack.enter_context(monkeypatch.context()), cls)
                     for cls in (ChunkedLogProbFunction, ChunkedDivergenceFunction)]
        if use_fastloss:
            stack.enter_context(fastloss_context())
        torch.manual_seed(0)
        trainer = TRAINERS[kind](model, tok, tmp_path, tag)
        # after the trainer is built: with a peft_config the trainer's model is the PeftModel (adapters included)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.add_callback(RecordGrads())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train()
    # use_fastloss() gave TRL's own functions back
    assert trl.trainer.utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    assert trl.trainer.distillation_trainer.ChunkedDivergenceFunction is ChunkedDivergenceFunction
    fastloss_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("fastloss::"))
    logs = [{k: v for k, v in entry.items() if k not in TIMING}
            for entry in trainer.state.log_history if "loss" in entry]
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return dict(logs=logs, generated=generated, grads=grads, before=before, after=after, fastloss_ops=fastloss_ops,
                trl_calls=sum(c[0] for c in trl_calls))


def _close(got, ref):
    return abs(got - ref) <= METRIC_RTOL * abs(ref) + METRIC_ATOL


@pytest.mark.parametrize("kind", list(TRAINERS))
def test_trainer_matches_trl(kind, initial, tmp_path, monkeypatch):
    ref = _train(kind, initial, tmp_path, monkeypatch, use_fastloss=False)
    fl = _train(kind, initial, tmp_path, monkeypatch, use_fastloss=True)

    # The reference is a real run: finite losses at every step, parameters moved, TRL's own kernels and no fastloss.
    assert len(ref["logs"]) == STEPS, ref["logs"]
    missing = HEAD_METRICS[kind.split("_")[0]] - ref["logs"][0].keys()
    assert not missing, f"TRL no longer logs {missing}"
    assert all(math.isfinite(e["loss"]) for e in ref["logs"]), ref["logs"]
    moved = max((ref["after"][n] - ref["before"][n]).abs().max().item() for n in ref["before"])
    assert moved > 1e-4, moved
    assert ref["trl_calls"] > 0 and ref["fastloss_ops"] == 0, (ref["trl_calls"], ref["fastloss_ops"])
    # fastloss ran, and TRL's head / divergence never did.
    assert fl["fastloss_ops"] > 0 and fl["trl_calls"] == 0, (fl["fastloss_ops"], fl["trl_calls"])

    # The generating trainers sample from the policy with the same seeds: the completions are the same as long as
    # the policies agree to float32 rounding. A token could only flip where a cumulative probability lies within
    # ~1e-7 of the uniform draw (the run is deterministic, so that would fail every time, never intermittently).
    assert len(fl["generated"]) == len(ref["generated"])
    if kind.startswith(("grpo", "rloo", "distill")):
        assert ref["generated"], "the trainer generated nothing"
    for i, (g, r) in enumerate(zip(fl["generated"], ref["generated"])):
        assert torch.equal(g, r), f"generation {i} differs:\n{g}\n{r}"

    # Every logged metric (losses, entropy, token accuracy, rewards, log-probabilities, KL, grad norms, ...).
    assert len(fl["logs"]) == len(ref["logs"])
    worst = {}
    for step, (got, want) in enumerate(zip(fl["logs"], ref["logs"]), 1):
        assert got.keys() == want.keys(), (step, got.keys() ^ want.keys())
        for k, w in want.items():
            if isinstance(w, (int, float)):
                worst[k] = max(worst.get(k, 0.0), abs(got[k] - w) / max(abs(w), 1e-30))
                assert _close(got[k], w), f"step {step} {k}: fastloss {got[k]!r} trl {w!r}"

    # Each step's gradients, then the trained parameters.
    assert len(fl["grads"]) == len(ref["grads"]) == STEPS
    worst_grad = 0.0
    for step, (got, want) in enumerate(zip(fl["grads"], ref["grads"]), 1):
        assert got.keys() == want.keys() and want, step
        for n, w in want.items():
            rel = rel_err(got[n], w)
            worst_grad = max(worst_grad, rel)
            assert rel <= GRAD_REL, f"step {step} {n}: gradient rel err {rel:.3g} (|grad| {w.norm().item():.3g})"
    worst_param = 0.0
    for n, want in ref["after"].items():
        assert torch.equal(fl["before"][n], ref["before"][n])
        diff = (fl["after"][n] - want).abs().max().item()
        worst_param = max(worst_param, diff)
        assert diff <= PARAM_ABS, f"{n}: trained parameters differ by {diff:.3g}"
    print(f"{kind}: worst relative difference per metric {worst}; gradient rel err {worst_grad:.3g}; "
          f"parameters max abs {worst_param:.3g}")
