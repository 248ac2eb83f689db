"""One decode step of the gated delta rule, for the T == 1 case that dominates decoding.

Same recurrence as :func:`flare.ops.gated_delta.naive.gated_delta_naive` (its ground truth), written with as few
tensor ops as possible: per-op overhead, not arithmetic, is what a decode step costs. Grouped heads are broadcast
rather than repeated.
"""

from __future__ import annotations

import torch

from flare.ops.precision import accum_dtype, cast, constant, no_autocast


@no_autocast
def gated_delta_step(
    q_BHkK: torch.Tensor,
    k_BHkK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    state_BHKV: torch.Tensor | None,
    scale: float,
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B, H, Dv] in v's dtype, new state [B, H, Dk, Dv] in the accumulation dtype).

    q, k have Hk heads, H % Hk == 0; value head h reads q/k head h // (H / Hk). ``in_place``: the new state is
    written over ``state`` (when it is a contiguous tensor of the accumulation dtype) and returned: a cache's
    state is then never re-allocated (a fresh state-sized tensor per layer and step costs page faults on the CPU).

    With a = e^g and delta = beta (v - a k^T S): S' = a S + k delta^T and o = scale q^T S' =
    a (scale q)^T S + (scale q . k) delta, so the old state is read once, by one product with [k; scale q].
    """
    B, Hk, Dk = q_BHkK.shape
    H, Dv = v_BHV.shape[1:]
    r = H // Hk
    acc = accum_dtype(v_BHV.dtype)
    if state_BHKV is None:
        state_BHKV = torch.zeros(B, H, Dk, Dv, dtype=acc, device=v_BHV.device)
    S = cast(state_BHKV, acc).view(B, Hk, r, Dk, Dv)
    k = cast(k_BHkK, acc)
    q = cast(q_BHkK, acc) * constant(scale, acc, S.device)
    kq = torch.stack([k, q], dim=2).view(B, Hk, 1, 2, Dk)
    a = cast(g_BH, acc).exp().view(B, Hk, r, 1, 1)
    kS, qS = (_read(kq, S) * a).unbind(-2)  # [B, Hk, r, Dv] each
    delta = cast(beta_BH, acc).view(B, Hk, r, 1) * (cast(v_BHV, acc).view(B, Hk, r, Dv) - kS)
    o = torch.addcmul(qS, (q * k).sum(-1).view(B, Hk, 1, 1), delta)
    own = in_place and state_BHKV.dtype == acc and state_BHKV.is_contiguous()
    S = S.mul_(a) if own else S * a
    S.addcmul_(k.view(B, Hk, 1, Dk, 1), delta.unsqueeze(-2))  # one pass over the state instead of two
    return cast(o.view(B, H, Dv), v_BHV.dtype), S.view(B, H, Dk, Dv)


# States up to this many entries per head are read with a product and a sum: fewer dispatches than a broadcast
# matmul's (expand, copy, bmm, views), a quarter of a small decode step's GDN time on CPU. Larger states read
# with the matmul, which does not write a state-sized temporary.
SMALL_STATE = 1024


def _read(x_BHk1RK: torch.Tensor, S_BHkrKV: torch.Tensor) -> torch.Tensor:
    """x^T S per value head for R rows: [B, Hk, 1, R, Dk] against [B, Hk, r, Dk, Dv] -> [B, Hk, r, R, Dv]."""
    if S_BHkrKV.shape[-1] * S_BHkrKV.shape[-2] <= SMALL_STATE:
        return (x_BHk1RK.unsqueeze(-1) * S_BHkrKV.unsqueeze(-3)).sum(-2)
    return x_BHk1RK @ S_BHkrKV


@no_autocast
def read_state(q_BTHkK: torch.Tensor, state_BHKV: torch.Tensor, scale: float) -> torch.Tensor:
    """o_t = scale * S^T q_t for every row t against ONE state per sequence: how a noisy block reads its
    block-end state. Returns [B, T, H, Dv] in the state's dtype; q has Hk heads, H % Hk == 0."""
    B, T, Hk, Dk = q_BTHkK.shape
    H, Dv = state_BHKV.shape[1], state_BHKV.shape[-1]
    S = state_BHKV.view(B, Hk, H // Hk, Dk, Dv)
    q = q_BTHkK.to(state_BHKV.dtype).permute(0, 2, 1, 3)[:, :, None]  # [B, Hk, 1, T, Dk]
    o = (q * scale) @ S  # [B, Hk, r, T, Dv]
    return o.reshape(B, H, T, Dv).transpose(1, 2)
