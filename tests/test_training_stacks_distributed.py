"""The transformers patch under FSDP2 (``fully_shard``) and DDP, gloo on the CPU: every grouping of the output head
(in the root group, alone, with the final norm), ``reshard_after_forward`` True / False / an int, a
``MixedPrecisionPolicy`` (bf16 parameters, float32 reduction), a PEFT LoRA adapter on the head, against the same
model unpatched under the same sharding: the loss of each of two SGD steps, every gradient after the second, the
parameters after it, and the number of all-gathers and reduce-scatters per step (the same: nothing gathered twice,
gradients reduced once).
A policy with ``output_dtype`` falls back to the model's own head, with the warning.

Tensor parallelism, the torchtitan way (``ColwiseParallel`` on the head, a DTensor weight sharded over the
vocabulary): DTensor logits (``output_layouts=Shard(-1), use_local_output=False``) and gathered ones
(``Replicate()``) run fastloss's vocabulary-parallel loss and match the unpatched model under ``loss_parallel``,
also when the patched model trains without it (fastloss does not need it), under FSDP2 on a second mesh dimension,
and with the model's end sequence-parallel (the head's input a Shard(1) DTensor); local logits
(``use_local_output=True``: the model's loss would cover each rank's slice only), other styles
(``RowwiseParallel``, ``SequenceParallel``, a subclass with its own transforms, other output layouts) and
``filter_eps`` fall back, warned; ``return_logits=True`` gives the model's own DTensor logits."""

import copy
import warnings

import pytest
import torch
import torch.distributed as dist

transformers = pytest.importorskip("transformers")

from _gloo import spawn  # noqa: E402

pytestmark = [pytest.mark.stacks,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

V, B, T = 311, 2, 12


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return dict(input_ids=ids, labels=labels)


def _mp(output_dtype=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=output_dtype)


# name -> (where the head is sharded: "root" | "head" | "norm_head" | "ddp", reshard_after_forward,
#          mixed precision policy or None, fallback warning text or None, world sizes)
CASES = {
    "root": ("root", True, None, None, (2,)),
    "root_keep": ("root", False, None, None, (2,)),
    "head": ("head", True, None, None, (2,)),
    "head_keep": ("head", False, None, None, (2,)),
    "norm_head": ("norm_head", True, None, None, (2,)),
    "norm_head_keep": ("norm_head", False, None, None, (2,)),
    "root_mp": ("root", True, "bf16", None, (2,)),
    "head_mp": ("head", True, "bf16", None, (2,)),
    "norm_head_mp": ("norm_head", True, "bf16", None, (2,)),
    "head_mp_output_dtype": ("head", True, "bf16+output", "MixedPrecisionPolicy(output_dtype=", (2,)),
    "head_int": ("head", 2, None, None, (4,)),  # reshard to groups of 2 after forward: needs 4 processes
    "norm_head_int": ("norm_head", 2, None, None, (4,)),
    "ddp": ("ddp", None, None, None, (2,)),
    # PEFT LoRA on the head (dropout 0.1) and FSDP2 together, every grouping of the head
    "lora_root": ("lora_root", True, None, None, (2,)),
    "lora_head": ("lora_head", True, None, None, (2,)),
    "lora_norm_head": ("lora_norm_head", True, None, None, (2,)),
    # tensor parallel, the torchtitan way: where "tp[_variant]" (TP_HEADS: the head's ColwiseParallel, whether each
    # model trains under loss_parallel), on fastloss's vocabulary-parallel kernels
    "tp_head": ("tp", None, None, None, (2,)),
    "tp_head_no_loss_parallel": ("tp_nolp", None, None, None, (2,)),
    "tp_head_replicate": ("tp_replicate", None, None, None, (2,)),
    "tp_head_fsdp": ("tp_fsdp", True, None, None, (2, 4)),  # 4: FSDP2 over 2 ranks x TP over 2
    # torchtitan's end of the model: the final norm sequence-parallel, the head all-gathering its Shard(1) input
    "tp_head_sequence_parallel": ("tp_sp", None, None, None, (2,)),
    # the model's own loss would be over each rank's local slice of the vocabulary: not reproduced
    "tp_head_local_output": ("tp_local", None, None, "use_local_output=True", (2,)),
    # other tensor-parallel styles on the head: plan_head's reasons; return_logits on a ColwiseParallel head
    "tp_head_other": ("tp_other", None, None, None, (2,)),
}

# where -> (ColwiseParallel(output_layouts=..., use_local_output=...) arguments, reference under loss_parallel,
#           patched model under loss_parallel)
TP_HEADS = {
    "tp": (("shard", False), True, True),
    "tp_nolp": (("shard", False), True, False),
    "tp_replicate": (("replicate", True), False, False),
    "tp_fsdp": (("shard", False), True, True),
    "tp_sp": (("shard", False), True, True),
    "tp_local": (("shard", True), True, True),
}


def _shard(model, where, reshard, policy):
    if where == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if where in TP_HEADS:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, SequenceParallel,
                                                       parallelize_module)

        (layout, local), _, _ = TP_HEADS[where]
        head = ColwiseParallel(input_layouts=Shard(1) if where == "tp_sp" else None,
                               output_layouts=Shard(-1) if layout == "shard" else Replicate(), use_local_output=local)
        plan = {"lm_head": head}
        if where == "tp_sp":  # the last layer's output resharded along the sequence, the norm sequence-parallel
            plan[f"model.layers.{len(model.model.layers) - 1}"] = PrepareModuleOutput(
                output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False)
            plan["model.norm"] = SequenceParallel()
        if where != "tp_fsdp":
            return parallelize_module(model, init_device_mesh("cpu", (dist.get_world_size(),)), plan)
        from torch.distributed.fsdp import fully_shard

        # 2-D: FSDP2 over "dp" (on 2 processes one rank: its hooks and DTensor parameters, no data split), TP over
        # 2 ranks of "tp"
        mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"lm_head": head})
        fully_shard(model.lm_head, mesh=mesh["dp"], reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh["dp"], reshard_after_forward=reshard)
        return model
    from torch.distributed.fsdp import fully_shard

    kw = {} if policy is None else {"mp_policy": _mp(torch.float32 if policy == "bf16+output" else None)}
    inner = model
    if where.startswith("lora_"):  # a PeftModel: shard the transformers model inside it
        inner, where = model.base_model.model, where[len("lora_"):]
    for layer in inner.model.layers:
        fully_shard(layer, reshard_after_forward=reshard, **kw)
    if where == "head":
        fully_shard(inner.lm_head, reshard_after_forward=reshard, **kw)
    elif where == "norm_head":  # the grouping torch's fully_shard documentation gives for chunked-loss training
        fully_shard([inner.model.norm, inner.lm_head], reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=reshard, **kw)
    return model


def _tp_other(rank):
    """Other tensor-parallel styles on the head are reasons that name the style (plan_head, not run: the model
    would compute something else or fail); ``return_logits=True`` on a ColwiseParallel head gives the model's own
    DTensor logits next to fastloss's loss."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   loss_parallel, parallelize_module)

    from fastloss.integrations._head import plan_head
    from fastloss.integrations.transformers import patch

    class OwnColwise(ColwiseParallel):  # its own output transform: not ColwiseParallel's
        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            return ColwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for style, says in ((RowwiseParallel(), "RowwiseParallel"), (SequenceParallel(), "SequenceParallel"),
                        (ColwiseParallel(output_layouts=Shard(1), use_local_output=False), "output_layouts=S"),
                        (OwnColwise(output_layouts=Shard(-1), use_local_output=False), "OwnColwise")):
        model = parallelize_module(patch(_llama()), mesh, {"lm_head": style})
        why = plan_head(model.lm_head)
        assert isinstance(why, str) and says in why and "distribute_module" in why, (style, why)
    base = _llama()
    head = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    ref = parallelize_module(copy.deepcopy(base), mesh, {"lm_head": head})
    fl = parallelize_module(patch(copy.deepcopy(base), return_logits=True), mesh, {"lm_head": head})
    with loss_parallel():
        out_r, out_f = ref(**_batch(0, 0)), fl(**_batch(0, 0))
    assert type(out_f.logits) is type(out_r.logits) and tuple(out_f.logits.placements) == tuple(out_r.logits.placements)
    assert torch.equal(out_f.logits.full_tensor(), out_r.logits.full_tensor())
    assert _rel(out_f.loss.full_tensor(), out_r.loss.full_tensor()) <= 1e-6
    # filter_eps: not in the vocabulary-parallel loss; the model's own logits and loss (under loss_parallel), warned
    from fastloss.integrations.transformers import DeferredLogitsFallbackWarning

    fl = parallelize_module(patch(copy.deepcopy(base), filter_eps=1e-6), mesh, {"lm_head": head})
    with loss_parallel(), pytest.warns(DeferredLogitsFallbackWarning, match="filter_eps"):
        out_f = fl(**_batch(0, 0))
    assert torch.equal(out_f.loss.full_tensor(), out_r.loss.full_tensor())


def _lora(model):
    import peft

    torch.manual_seed(1)  # the same adapter initialisation in both models
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], lora_dropout=0.1,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


class _Collectives:
    """Counts FSDP's all-gathers and reduce-scatters (and DDP's all-reduces) while active."""

    NAMES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
             "all_reduce")

    def __init__(self):
        self.counts = {}

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        for name, fn in self.saved.items():
            def counting(*args, _name=name, _fn=fn, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counting)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, rank, profile=False, tp=False):
    """Two SGD steps: losses, collective counts per step, the second step's gradients, final parameters, and
    whether fastloss's ops ran in the first step. ``rank`` picks the data; ``tp``: under loss_parallel
    (vocabulary-sharded logits)."""
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, counts, kinds, ran = [], [], [], None
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 * rank + step)  # dropout (LoRA cases) draws the same numbers in both models
        with _Collectives() as coll, (loss_parallel() if tp else contextlib.nullcontext()):
            if profile and step == 0:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    loss = model(**_batch(rank, step)).loss
                    loss.backward()
                ran = any(e.key.startswith("fastloss::cross_entropy") for e in prof.key_averages())
            else:
                loss = model(**_batch(rank, step)).loss
                loss.backward()
        kinds.append(type(loss).__name__)  # a DTensor where the model's own loss is one (tensor parallelism)
        losses.append(_full(loss.detach()).float())
        counts.append(dict(coll.counts))
        grads = {n: _full(p.grad).float() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    params = {n: _full(p.detach()).float() for n, p in model.named_parameters()}
    return losses, counts, grads, params, ran, kinds


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_case(rank, name):
    from fastloss.integrations.transformers import DeferredLogitsFallbackWarning, patch

    where, reshard, policy, fallback, _ = CASES[name]
    if where == "tp_other":
        return _tp_other(rank)
    base = _llama()
    wrap = _lora if where.startswith("lora_") else (lambda m: m)
    ref = _shard(wrap(copy.deepcopy(base)), where, reshard, policy)
    fl = _shard(wrap(patch(copy.deepcopy(base))), where, reshard, policy)
    _, lp_ref, lp_fl = TP_HEADS.get(where, (None, False, False))
    data = rank // 2 if where in TP_HEADS else rank  # tensor parallelism (2 ranks): each TP pair the same batch
    if where == "tp_local":
        # The model's own head hands each rank its slice of the vocabulary, which transformers' ForCausalLMLoss
        # cannot even view as (-1, V): the patched model runs that same code (after saying why) and fails alike.
        errors = []
        for model in (ref, fl):
            with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as error:
                warnings.simplefilter("always", DeferredLogitsFallbackWarning)
                model(**_batch(data, 0))
            errors.append(str(error.value))
            said = [str(w.message) for w in caught if issubclass(w.category, DeferredLogitsFallbackWarning)]
        assert errors[0] == errors[1] and said and all(fallback in s for s in said), (name, errors, said)
        return
    losses_r, counts_r, grads_r, params_r, _, kinds_r = _train(ref, data, tp=lp_ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeferredLogitsFallbackWarning)
        losses_f, counts_f, grads_f, params_f, ran, kinds_f = _train(fl, data, profile=True, tp=lp_fl)
    said = [str(w.message) for w in caught if issubclass(w.category, DeferredLogitsFallbackWarning)]
    if fallback is None:
        assert not said and ran and kinds_f == kinds_r, (name, said, ran, kinds_f, kinds_r)
    else:
        assert said and all(fallback in s for s in said) and not ran, (name, said, ran)
    # bf16 parameters: the model's head rounds its logits to bf16, fastloss does not (CPU chunks in float32)
    tol = 2 ** -7 if policy else 1e-5
    for step, (a, b) in enumerate(zip(losses_f, losses_r)):
        assert _rel(a, b) <= tol, (name, step, a, b)
    if where in TP_HEADS and fallback is None:
        # DTensor's redistributions (the model's own head and loss) go through functional collectives, not counted;
        # fastloss's vocabulary-parallel loss on 2 ranks: one all-gather of the per-token statistics forward, one
        # all-reduce of the hidden states' gradient backward. Nothing else more (FSDP's the same).
        counts_r = [{**c, "all_gather_single": c.get("all_gather_single", 0) + 1,
                     "all_reduce": c.get("all_reduce", 0) + 1} for c in counts_r]
    assert counts_f == counts_r, (name, counts_f, counts_r)
    assert grads_f.keys() == grads_r.keys() and grads_r, name
    for n in grads_r:
        assert _rel(grads_f[n], grads_r[n]) <= 20 * tol, (name, n, _rel(grads_f[n], grads_r[n]))
    for n in params_r:
        assert _rel(params_f[n], params_r[n]) <= 20 * tol, (name, n)


def _worker(rank, world, names):
    for name in names:
        _run_case(rank, name)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_and_ddp_match_the_unpatched_model(world):
    names = [n for n, case in CASES.items() if world in case[4]]
    try:
        import peft  # noqa: F401
    except ImportError:
        names = [n for n in names if not n.startswith("lora_")]
    spawn(_worker, world, names)
