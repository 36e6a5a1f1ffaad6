"""A tiny Llama parallelised the torchtitan way (ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down, the head
ColwiseParallel with DTensor output: logits sharded along the vocabulary) trained with fastloss's loss equals the
same model trained with ``loss_parallel()`` + ``F.cross_entropy``: the loss of every step, the parameters after
the last; gloo on the CPU, 2 processes, float64. Also the head as a linear cross-entropy on its DTensor weight
(no logits at all), the model's end sequence-parallel (torchtitan's plan: the final norm on Shard(1) of the
sequence, the head all-gathering it), and FSDP2 + TP on a 2-D mesh (data x tensor)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fastloss  # noqa: E402
from _gloo import spawn  # noqa: E402

pytestmark = [pytest.mark.stacks,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

V, B, T, STEPS = 307, 2, 10, 3


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).double()


def _tp(model, mesh, sequence_parallel=False):
    """The torchtitan plan. ``sequence_parallel``: the model's end as torchtitan runs it, the final norm sequence-
    parallel (the last layer's output resharded to Shard(1)) and the head all-gathering its Shard(1) input."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleOutput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    plan = {"lm_head": ColwiseParallel(input_layouts=Shard(1) if sequence_parallel else None,
                                       output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        plan[f"model.layers.{len(model.model.layers) - 1}"] = PrepareModuleOutput(
            output_layouts=Replicate(), desired_output_layouts=Shard(1), use_local_output=False)
        plan["model.norm"] = SequenceParallel()
    for i in range(len(model.model.layers)):
        p = f"model.layers.{i}."
        plan.update({p + "self_attn.q_proj": ColwiseParallel(), p + "self_attn.k_proj": ColwiseParallel(),
                     p + "self_attn.v_proj": ColwiseParallel(), p + "self_attn.o_proj": RowwiseParallel(),
                     p + "mlp.gate_proj": ColwiseParallel(), p + "mlp.up_proj": ColwiseParallel(),
                     p + "mlp.down_proj": RowwiseParallel()})
    return parallelize_module(model, mesh, plan)


def _batch(step, dp_rank=0):
    g = torch.Generator().manual_seed(100 * dp_rank + step)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _loss_fastloss(model, ids, labels):
    logits = model(input_ids=ids).logits  # DTensor (B, T, V), Shard(2)
    return fastloss.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _loss_module(model, ids, labels):
    logits = model(input_ids=ids).logits
    return fastloss.nn.CrossEntropyLoss()(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _loss_torch(model, ids, labels):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def _loss_linear(model, ids, labels):
    h = model.model(input_ids=ids).last_hidden_state  # plain and replicated, or (sequence parallel) a Shard(1) DTensor
    return fastloss.linear_cross_entropy(h[:, :-1].flatten(0, 1), model.lm_head.weight, labels[:, 1:].flatten(),
                                         chunk_size=7)


def _train(model, loss_fn, parallel, dp_rank=0):
    from torch.distributed.tensor.parallel import loss_parallel
    import contextlib

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        ids, labels = _batch(step, dp_rank)
        with loss_parallel() if parallel else contextlib.nullcontext():
            loss = loss_fn(model, ids, labels)
            loss.backward()
        losses.append(_full(loss.detach()).item())
        opt.step()
    return losses, {n: _full(p.detach()) for n, p in model.named_parameters()}


def _compare(a, b, tol):
    (la, pa), (lb, pb) = a, b
    assert max(abs(x - y) / abs(y) for x, y in zip(la, lb)) <= tol, (la, lb)
    assert pa.keys() == pb.keys()
    for n in pb:
        assert ((pa[n] - pb[n]).norm() / pb[n].norm()).item() <= tol, n


def _tp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    base = _llama()
    single = _train(copy.deepcopy(base), _loss_torch, False)  # one process, no parallelism: the truth
    torch_tp = _train(_tp(copy.deepcopy(base), mesh), _loss_torch, True)
    _compare(torch_tp, single, 1e-11)
    for parallel in (False, True):  # fastloss's rule is registered once: loss_parallel() changes nothing
        _compare(_train(_tp(copy.deepcopy(base), mesh), _loss_fastloss, parallel), torch_tp, 1e-11)
    _compare(_train(_tp(copy.deepcopy(base), mesh), _loss_module, False), torch_tp, 1e-11)
    # the head as a linear cross-entropy on its vocabulary-sharded weight: no logits, the same training
    _compare(_train(_tp(copy.deepcopy(base), mesh), _loss_linear, False), torch_tp, 1e-11)
    # sequence parallel at the model's end: the head's input (and the linear version's hidden states) sharded
    # along the sequence
    from torch.distributed.tensor import DTensor, Shard

    h = _tp(copy.deepcopy(base), mesh, True).model(input_ids=_batch(0)[0]).last_hidden_state
    assert isinstance(h, DTensor) and tuple(h.placements) == (Shard(1),), h
    torch_sp = _train(_tp(copy.deepcopy(base), mesh, True), _loss_torch, True)
    _compare(torch_sp, single, 1e-11)
    for loss_fn in (_loss_fastloss, _loss_linear):
        _compare(_train(_tp(copy.deepcopy(base), mesh, True), loss_fn, False), torch_sp, 1e-11)


def _fsdp_tp_worker(rank, world, dp):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
    base = _llama()

    def build():
        model = _tp(copy.deepcopy(base), mesh["tp"])
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        return fully_shard(model, mesh=mesh["dp"])

    _compare(_train(build(), _loss_fastloss, False, dp_rank), _train(build(), _loss_torch, True, dp_rank), 1e-11)


def test_tiny_llama_tensor_parallel_trains_as_loss_parallel():
    spawn(_tp_worker, 2)


@pytest.mark.parametrize("dp,world", [(2, 4)])
def test_tiny_llama_fsdp2_tp_2d_mesh(dp, world):
    spawn(_fsdp_tp_worker, world, dp)
