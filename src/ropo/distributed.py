"""Several processes, one run: the plumbing `train.py` needs under torchrun (FSDP2, gloo or NCCL).

Sits just before checkpoint.py, step.py and the run modules after them (training_run.py,
policy.py, saving.py, run_setup.py, train.py), which alone import it. In one process (no
torchrun, or WORLD_SIZE=1) every helper is the identity or the single-process call.

Under `torchrun --nproc_per_node W -m ropo train ...` every rank reads the same pairs and builds
the same step order. The policy is sharded with FSDP2 (`fully_shard` per block, then the root).
Rank r trains on pairs r, r+W, ... of each micro-batch; each loss is divided by the step's pair
count over all ranks and FSDP sums (not averages) the gradients, so W processes compute the
gradient one process computes on the same pairs. Scores for the filter are computed W ways and
gathered by pair id, so every rank makes the same drop decision. Rank 0 alone writes files.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ropo.config import RunConfig
from ropo.data import TokenizedPair
from ropo.logps import PairLogps
from ropo.logps_fused import score_pairs
from ropo.models import Transformer, load_model
from ropo.ref_cache import RefLogps, reference_logps
from ropo.ref_cache_files import cache_location, read_cache, write_cache
from ropo.resources import pick_device

# Rank 0 alone writes checkpoints (tens of GB for a 7B model) while the others wait in the next
# collective; NCCL's default of 10 minutes can be too short for that.
TIMEOUT = timedelta(minutes=30)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init(cfg: RunConfig) -> torch.device:
    """This process's device; first joins torchrun's process group when WORLD_SIZE > 1.

    Under torchrun the GPU is cuda:LOCAL_RANK (NCCL), or the CPU (gloo) with device=cpu.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return pick_device(cfg.model.device)
    if cfg.filter.rejection_sampling:
        raise ValueError(
            "rejection_sampling=true is not supported under torchrun: sampling from an "
            "FSDP-sharded policy is not implemented. Run it in one process."
        )
    if cfg.model.device.startswith("cuda:"):
        raise ValueError(
            f"config key 'device' = {cfg.model.device!r}: under torchrun each process takes "
            f"cuda:LOCAL_RANK; use device=auto or device=cuda"
        )
    device = pick_device(cfg.model.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # binding the GPU up front lets NCCL set up eagerly
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def teardown() -> None:
    """Leave the process group once every rank is done (rank 0 writes last)."""
    if dist.is_initialized():
        # A rank that tears down while another still talks to it can abort in gloo's threads.
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (picklable objects)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: Transformer) -> Transformer:
    """Shard `model` across the ranks with FSDP2, in place: each block is one unit, the root
    (embeddings, final norm, head) another. Returns `model`; unchanged in one process."""
    if world_size() == 1:
        return model
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    # The log-prob code calls hidden_states(), not forward(): let FSDP gather the root around it.
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Losses are already divided by the step's pair count over all ranks: sum, not mean.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def rank_share(micro_batches: list[list[TokenizedPair]]) -> list[tuple[list[TokenizedPair], int]]:
    """This rank's pairs of each micro-batch (r, r+W, ...) and how many of them count.

    A rank whose share of a short last micro-batch is empty gets that micro-batch's first pair
    with count 0: under FSDP every rank must run the same forward and backward passes.
    """
    W, r = world_size(), rank()
    shares = []
    for pairs in micro_batches:
        mine = pairs[r::W]
        shares.append((mine, len(mine)) if mine else (pairs[:1], 0))
    return shares


def sum_over_ranks(values: Tensor) -> Tensor:
    """Element-wise sum of `values` over the ranks (a new tensor); `values` in one process."""
    if world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


def plain_tensor(value: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (e.g. a gradient norm under FSDP); others unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def score_everywhere(
    model: Transformer, pairs: list[TokenizedPair], batch_size: int, pad_id: int, desc: str
) -> PairLogps:
    """`score_pairs` of every pair, the work split across ranks; every rank gets all results.

    Rank r scores pairs r, r+W, ...; the results are gathered by pair id. Short shares are
    padded with copies of the first pair, so that every rank runs as many batches (FSDP).
    """
    if world_size() == 1:
        return score_pairs(model, pairs, batch_size, pad_id, desc=desc)
    mine = pairs[rank() :: world_size()]
    padded = mine + [pairs[0]] * (math.ceil(len(pairs) / world_size()) - len(mine))
    logps = score_pairs(model, padded, batch_size, pad_id, desc=desc, progress=is_main())
    columns = (logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens)
    rows = torch.stack(columns, dim=1)[: len(mine)].tolist()  # (n_mine, 4), exact as floats
    parts: list[dict[str, list[float]]] = [{} for _ in range(world_size())]
    dist.all_gather_object(parts, {pair.id: row for pair, row in zip(mine, rows, strict=True)})
    by_id = {pair_id: row for part in parts for pair_id, row in part.items()}
    table = torch.tensor([by_id[pair.id] for pair in pairs], dtype=torch.float32)  # (N, 4)
    return PairLogps(*table.unbind(dim=1))


def shared_reference_logps(
    model_dir: Path,
    pairs: list[TokenizedPair],
    cache_dir: Path,
    batch_size: int,
    pad_id: int,
    dtype: torch.dtype,
    device: torch.device,
) -> RefLogps:
    """`reference_logps` for every rank: rank 0 looks up the cache; on a miss every rank loads
    the reference model whole, scores its share of the pairs, and rank 0 writes the cache."""
    if world_size() == 1:
        return reference_logps(model_dir, pairs, cache_dir, batch_size, pad_id, dtype, device)
    ids = [pair.id for pair in pairs]
    found = None
    if is_main():  # one rank hashes the weights and reads the cache (it may be on its disk only)
        path, fingerprint = cache_location(model_dir, pairs, cache_dir, dtype, device)
        found = (path, fingerprint, read_cache(path, fingerprint, ids))
    path, fingerprint, cached = broadcast_object(found)
    if cached is not None:
        return RefLogps(ids, cached, fingerprint)
    reference = load_model(model_dir, dtype=dtype, device=device)
    logps = score_everywhere(reference, pairs, batch_size, pad_id, "reference log-probs")
    del reference
    if is_main():
        write_cache(path, fingerprint, ids, logps)
    return RefLogps(ids, logps, fingerprint)


def gather_weights(model: Transformer, trainable_only: bool = False) -> dict[str, Tensor]:
    """The model's whole parameters by name (ours): under FSDP gathered to rank 0's CPU (every
    rank must call; the others get {}), in one process the live tensors, detached."""
    if world_size() == 1:
        return {
            name: p.detach()
            for name, p in model.named_parameters()
            if p.requires_grad or not trainable_only
        }
    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    return get_model_state_dict(model, options=options)


def gather_optimizer_state(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` as one process has it: whole tensors, parameters numbered in
    the optimizer's order. So a checkpoint from any number of processes resumes in any other.
    Under FSDP every rank must call; ranks other than 0 get {}."""
    if world_size() == 1:
        return optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by name
    if not is_main():
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[k]: v for k, v in full["state"].items()}, "param_groups": groups}


def load_optimizer_state(
    model: Transformer, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Restore a state from `gather_optimizer_state` (any world size) into `optimizer`.

    Under FSDP only rank 0 needs `saved` (the others pass {}): it sends each rank its shards, so
    a node does not hold one whole copy of the AdamW state per process.
    """
    if world_size() == 1:
        optimizer.load_state_dict(saved)
        return
    full = {}
    if is_main():
        names = _param_names(model, optimizer)
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]
        full = {"state": {names[i]: v for i, v in saved["state"].items()}, "param_groups": groups}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, full, options=options)


def _param_names(model: Transformer, optimizer: torch.optim.Optimizer) -> list[str]:
    # The name of each parameter in optimizer order, the order state_dict() numbers them in.
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
