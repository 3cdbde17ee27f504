"""InfoNCE with MaskFN (Shu et al., BMVC 2022), single-process and over the all-gathered global batch.

Notation: ``z`` holds N embeddings (rows), ``positive_index[i]`` is the row of i's positive, every other row
``k != i, positive_index[i]`` is a negative of i. ``s_ik`` is the cosine similarity of rows i and k.

* plain (``fn_mode="none"`` or no descriptors): ``L_i = -log softmax([s_ij, s_ik...] / tau)[0]``;
  the loss is the mean of ``L_i`` over the selected rows.
* MaskFN ``pick``: ``l(i)`` = the negative whose descriptor is most cosine-similar to i's descriptor (a likely
  false negative: same expression). ``L1_i`` = CE over ``[s_ij, negatives without l]``, ``L2_i`` = CE over
  ``[s_il, the same negatives]``; loss = mean L1 + fn_lambda * mean L2.
* MaskFN ``threshold``: negatives with descriptor cosine > fn_threshold are dropped, except same-group (same
  clip, i.e. same identity) hard negatives, which are kept; loss = mean L1 over what remains.

``row_indices`` restricts the anchors to some rows while the columns stay the whole batch: that is how each rank
computes only its own rows of the global similarity matrix (memory O(n x W*n) instead of O((W*n)^2)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from pretrain import distributed

FnMode = Literal["none", "pick", "threshold"]


@dataclass
class LossConfig:
    temperature: float = 0.07  # InfoNCE temperature tau
    fn_mode: FnMode = "pick"  # MaskFN variant; used only when descriptors are passed
    fn_lambda: float = 0.8  # weight of L2 (the picked false negative treated as a positive)
    fn_threshold: float = 0.5  # descriptor cosine above which a negative is dropped (threshold mode)
    gather: bool = True  # negatives from the all-gathered global batch (False: this rank's rows only)
    # With in-batch FaceSwap donors a swapped positive is, outside its pasted inner face, a copy of its donor,
    # which is also one of the anchor's negatives. True: the donor clip's rows leave the denominators of both
    # rows of that positive pair (no effect where no donor came from the batch, e.g. faceswap.donors=stream).
    drop_donor_columns: bool = False  # drop the in-batch donor clip's rows from the swapped pair's negatives

    def validate(self) -> None:

        if not self.temperature > 0:
            raise ConfigError(f"config key 'loss.temperature': must be > 0, got {self.temperature}")
        if self.fn_lambda < 0:
            raise ConfigError(f"config key 'loss.fn_lambda': must be >= 0, got {self.fn_lambda}")
        if not -1.0 <= self.fn_threshold <= 1.0:
            raise ConfigError(
                f"config key 'loss.fn_threshold': a cosine in [-1, 1] is needed, got {self.fn_threshold}"
            )


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    l1: torch.Tensor  # mean L1 (detached)
    l2: torch.Tensor  # mean L2 (detached; 0 without pick mode)
    pick_index: torch.Tensor | None  # (R,) column picked as false negative per row (pick mode)
    pick_same_group_rate: torch.Tensor | None  # share of picks that are same-clip hard negatives
    positive_top1: torch.Tensor  # share of rows whose positive beats every negative (detached)
    negatives_per_row: torch.Tensor  # mean number of negatives in the L1 denominator (detached)
    rows: int  # number of anchor rows R
    gather_seconds: float = 0.0  # wall time of the forward all-gathers (DistributedInfoNCE; 0 single-process)


_NEG_INF = float("-inf")


def _check_inputs(z: torch.Tensor, positive_index: torch.Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(f"z must be (N, D), got shape {tuple(z.shape)}")
    n = z.shape[0]
    if positive_index.shape != (n,):
        raise ValueError(f"positive_index must be ({n},), got {tuple(positive_index.shape)}")
    if n and (positive_index.min() < 0 or positive_index.max() >= n):
        raise ValueError("positive_index holds rows outside [0, N)")
    if bool((positive_index == torch.arange(n, device=positive_index.device)).any()):
        raise ValueError("a row is its own positive: positive_index[i] must differ from i")


def info_nce(
    z: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    fn_descriptors: torch.Tensor | None = None,
    fn_lambda: float = 0.8,
    fn_mode: FnMode = "pick",
    fn_threshold: float = 0.5,
    group_id: torch.Tensor | None = None,
    row_indices: torch.Tensor | None = None,
    drop_group: torch.Tensor | None = None,
) -> LossOutput:
    """InfoNCE over rows ``row_indices`` (default all) of ``z`` (N, D, unnormalised) against all N columns.

    ``drop_group`` (N,) long: for row i >= 0, every column of group ``drop_group[i]`` leaves row i's negatives
    (the in-batch FaceSwap donor of its pair, :func:`donor_linked_groups`); needs ``group_id``."""
    _check_inputs(z, positive_index)
    n = z.shape[0]
    device = z.device
    positive_index = positive_index.to(device=device, dtype=torch.long)
    rows = torch.arange(n, device=device) if row_indices is None else row_indices.to(device, torch.long)
    zn = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)  # low precision -> fp32
    logits = zn[rows] @ zn.T / temperature  # (R, N)
    r = rows.shape[0]
    ar = torch.arange(r, device=device)
    pos = positive_index[rows]
    negative = torch.ones(r, n, dtype=torch.bool, device=device)
    negative[ar, rows] = False
    negative[ar, pos] = False
    if drop_group is not None:
        if group_id is None:
            raise ValueError("drop_group needs group_id (the columns to drop are a donor clip's rows)")
        linked = drop_group.to(device=device, dtype=torch.long)[rows]
        negative &= ~((group_id.to(device)[None, :] == linked[:, None]) & (linked[:, None] >= 0))

    use_fn = fn_descriptors is not None and fn_mode != "none"
    groups = group_id.to(device) if group_id is not None else None
    pick = same_group_rate = None
    l2_rows = None
    if use_fn:
        if fn_descriptors.shape[0] != n:
            raise ValueError(f"fn_descriptors must have {n} rows, got {fn_descriptors.shape[0]}")
        dn = F.normalize(fn_descriptors.detach().float().to(device), dim=1)
        dsim = dn[rows] @ dn.T  # (R, N) descriptor cosines: no gradient, they only choose columns
        if fn_mode == "pick":
            if n < 3:
                raise ValueError("MaskFN pick needs at least one negative per row (N >= 3)")
            pick = dsim.masked_fill(~negative, _NEG_INF).argmax(dim=1)
            negative[ar, pick] = False
            if groups is not None:
                same_group_rate = (groups[pick] == groups[rows]).float().mean()
        elif fn_mode == "threshold":
            drop = negative & (dsim > fn_threshold)
            if groups is not None:
                drop &= groups[None, :] != groups[rows][:, None]  # same-clip hard negatives stay
            negative &= ~drop
        else:
            raise ValueError(f"fn_mode must be none, pick or threshold, got {fn_mode!r}")

    pos_logit = logits[ar, pos]
    keep1 = negative.clone()
    keep1[ar, pos] = True  # the positive is in its own denominator, so no row is ever empty
    l1_rows = torch.logsumexp(logits.masked_fill(~keep1, _NEG_INF), dim=1) - pos_logit
    loss = l1_rows.mean()
    if pick is not None:
        keep2 = negative.clone()
        keep2[ar, pick] = True
        pick_logit = logits[ar, pick]
        l2_rows = torch.logsumexp(logits.masked_fill(~keep2, _NEG_INF), dim=1) - pick_logit
        loss = loss + fn_lambda * l2_rows.mean()

    with torch.no_grad():
        best_negative = logits.masked_fill(~negative, _NEG_INF).max(dim=1).values
        top1 = (pos_logit > best_negative).float().mean()
        zero = torch.zeros((), device=device)
        return LossOutput(
            loss=loss,
            l1=l1_rows.detach().mean(),
            l2=l2_rows.detach().mean() if l2_rows is not None else zero,
            pick_index=pick,
            pick_same_group_rate=same_group_rate,
            positive_top1=top1,
            negatives_per_row=negative.sum(dim=1).float().mean(),
            rows=r,
        )


class DistributedInfoNCE(nn.Module):
    """InfoNCE/MaskFN with negatives from the global batch; each rank computes only its own rows.

    Inputs are this rank's block: ``z_local`` (n, D), ``positive_index_local`` and ``group_id_local`` (n,) in
    LOCAL row numbers. Embeddings are all-gathered WITH gradient; positives are shifted to global rows
    (``rank * n + local``); group ids become ``group * world + rank`` so equal local ids of different ranks
    stay different groups (ids must be >= 0). The returned loss is the mean over this rank's n rows: averaged
    over ranks by the data-parallel engine, it and its gradient equal those of the single-process loss on the
    concatenated batch (the gather's backward adds the other ranks' contributions to our rows).
    Every rank must pass the same n.
    """

    def __init__(self, cfg: LossConfig | None = None):
        super().__init__()
        self.cfg = cfg or LossConfig()

    def forward(
        self,
        z_local: torch.Tensor,
        positive_index_local: torch.Tensor,
        group_id_local: torch.Tensor | None = None,
        descriptors_local: torch.Tensor | None = None,
        donor_row_local: torch.Tensor | None = None,
    ) -> LossOutput:
        """``donor_row_local`` (n,) long: the local row whose frame was each row's in-batch FaceSwap donor, -1
        where none; used with ``loss.drop_donor_columns``."""
        cfg = self.cfg
        n = z_local.shape[0]
        world = distributed.get_world_size() if cfg.gather else 1
        rank = distributed.get_rank() if cfg.gather else 0
        positive_index_local = positive_index_local.to(z_local.device, torch.long)
        drop_local = None
        if cfg.drop_donor_columns and donor_row_local is not None and group_id_local is not None:
            drop_local = donor_linked_groups(positive_index_local, group_id_local, donor_row_local)
        gather_s = 0.0
        drop = drop_local
        if world > 1:
            t0 = _gather_clock(z_local.device)
            z = distributed.all_gather_with_grad(z_local)
            positives = distributed.all_gather_no_grad(positive_index_local + rank * n)
            groups = None
            if group_id_local is not None:
                groups = distributed.all_gather_no_grad(
                    group_id_local.to(z_local.device).long() * world + rank
                )
            descriptors = None
            if descriptors_local is not None:
                descriptors = distributed.all_gather_no_grad(descriptors_local.to(z_local.device))
            if drop_local is not None:  # local group ids -> the global ids the gathered groups use
                global_ids = torch.where(drop_local >= 0, drop_local * world + rank, drop_local)
                drop = distributed.all_gather_no_grad(global_ids.to(z_local.device))
            gather_s = _gather_clock(z_local.device) - t0
        else:
            z, positives, groups, descriptors = (
                z_local,
                positive_index_local,
                group_id_local,
                descriptors_local,
            )
        rows = torch.arange(rank * n, (rank + 1) * n, device=z_local.device)
        out = info_nce(
            z,
            positives,
            cfg.temperature,
            fn_descriptors=descriptors,
            fn_lambda=cfg.fn_lambda,
            fn_mode=cfg.fn_mode,
            fn_threshold=cfg.fn_threshold,
            group_id=groups,
            row_indices=rows,
            drop_group=drop,
        )
        out.gather_seconds = gather_s
        return out


def donor_linked_groups(
    positive_index: torch.Tensor, group_id: torch.Tensor, donor_row: torch.Tensor
) -> torch.Tensor:
    """(N,) long: the group of the in-batch donor linked to each row, -1 where none.

    A row swapped onto donor row d links itself and its positive (the anchor) to d's group: both see the donor
    clip's rows as near-copies of the swapped image. Rows of one batch only (local ids)."""
    device = group_id.device
    donor_row = donor_row.to(device=device, dtype=torch.long)
    positive_index = positive_index.to(device=device, dtype=torch.long)
    group_id = group_id.to(device).long()
    linked = torch.where(donor_row >= 0, group_id[donor_row.clamp_min(0)], torch.full_like(donor_row, -1))
    out = linked.clone()
    swapped = (linked >= 0).nonzero()[:, 0]
    out[positive_index[swapped]] = linked[swapped]  # the anchor of each swapped row
    return out


def _gather_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work: NCCL collectives are asynchronous, so the gather's time
    is only measurable between two synchronisations (one each side of the gathers; gloo on CPU is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def batch_layout(num_clips: int, layout: Literal["simclr", "sslfer"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive_index, group_id) for ``[A, P]`` (simclr, 2B rows) or ``[A, NA, P, NP]`` (sslfer, 4B rows)."""
    b = num_clips
    clip = torch.arange(b)
    if layout == "simclr":
        positive = torch.cat([clip + b, clip])
        return positive, torch.cat([clip, clip])
    if layout == "sslfer":
        # A <-> P and NA <-> NP; rows of one clip form a group of same-identity hard negatives.
        positive = torch.cat([clip + 2 * b, clip + 3 * b, clip, clip + b])
        return positive, clip.repeat(4)
    raise ValueError(f"layout must be simclr or sslfer, got {layout!r}")
