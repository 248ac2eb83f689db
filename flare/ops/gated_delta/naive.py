"""Reference (token-by-token) implementation of the gated delta rule.

Per batch ``b`` and head ``h`` the state ``S`` ([Dk, Dv], fp32) evolves as::

    S_t = exp(g_t) * S_{t-1} + beta_t * k_t (v_t - exp(g_t) * S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t

with ``S_{-1} = initial_state`` (zeros when ``None``).
"""

from __future__ import annotations

import torch

from flare.ops.precision import accum_dtype, no_autocast

__all__ = ["gated_delta_naive"]


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int]:
    """Check the shared tensor contract and return ``(B, T, H, Dk, Dv)``.

    Raises ``ValueError`` naming the offending tensor on any mismatch.
    """
    for name, x, ndim in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("beta", beta, 3)):
        if x.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    B, T, Hk, Dk = q.shape
    H, Dv = v.shape[2], v.shape[-1]
    if tuple(k.shape) != (B, T, Hk, Dk):
        raise ValueError(f"k must have shape {(B, T, Hk, Dk)} like q, got {tuple(k.shape)}")
    if tuple(v.shape[:2]) != (B, T) or H % Hk:
        raise ValueError(f"v must have shape (B, T, H, Dv) = ({B}, {T}, a multiple of {Hk}, Dv), got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name} must have shape {(B, T, H)}, got {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dk, Dv):
        raise ValueError(
            f"initial_state must have shape {(B, H, Dk, Dv)}, got {tuple(initial_state.shape)}"
        )
    return B, T, H, Dk, Dv


def expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., Hk, D] -> [..., heads, D] (heads on dim -2): each q/k head serves heads/Hk consecutive value heads.
    (An expand and one copy: ``repeat_interleave`` costs several more op dispatches per call.)"""
    Hk = x.shape[-2]
    if Hk == heads:
        return x
    return x.unsqueeze(-2).expand(*x.shape[:-1], heads // Hk, x.shape[-1]).reshape(*x.shape[:-2], heads, x.shape[-1])


@no_autocast
def gated_delta_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    return_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequential gated delta rule, literal to the recurrence (all math in fp32, under autocast too).

    Args:
        q, k: ``[B, T, Hk, Dk]``, ``H % Hk == 0`` (already L2-normalised; no normalisation here).
        v: ``[B, T, H, Dv]``.
        g: ``[B, T, H]`` log decay (``<= 0``).
        beta: ``[B, T, H]`` write strength in ``(0, 1)``.
        initial_state: ``[B, H, Dk, Dv]`` or ``None`` (zeros).
        scale: output scale, defaults to ``Dk ** -0.5``.
        return_all_states: also return the state after every position.

    Returns:
        ``o`` ``[B, T, H, Dv]`` in ``v.dtype``; ``final_state`` ``[B, H, Dk, Dv]`` fp32;
        and, if ``return_all_states``, ``all_states`` ``[B, T, H, Dk, Dv]`` fp32 with
        ``all_states[:, -1] == final_state``.
    """
    B, T, H, Dk, Dv = validate_inputs(q, k, v, g, beta, initial_state)
    if scale is None:
        scale = Dk**-0.5
    f32 = accum_dtype(v.dtype)
    q, k = expand_heads(q, H), expand_heads(k, H)
    qf, kf, vf, gf, bf = (x.to(f32) for x in (q, k, v, g, beta))
    if initial_state is None:
        state = torch.zeros(B, H, Dk, Dv, dtype=f32, device=v.device)
    else:
        # copy=True: never alias the caller's tensor (matters when T == 0).
        state = initial_state.to(dtype=f32, device=v.device, copy=True)

    outs: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    for t in range(T):
        k_t, v_t = kf[:, t], vf[:, t]  # [B, H, Dk], [B, H, Dv]
        decayed = gf[:, t].exp()[..., None, None] * state  # exp(g_t) S_{t-1}
        # Batched [1, Dk] @ [Dk, Dv] products: on CPU far cheaper per decode step than einsum.
        pred = (k_t[..., None, :] @ decayed).squeeze(-2)  # exp(g_t) S_{t-1}^T k_t
        delta = bf[:, t][..., None] * (v_t - pred)  # beta_t (v_t - pred)
        state = decayed + k_t[..., :, None] * delta[..., None, :]
        outs.append(scale * (qf[:, t, :, None, :] @ state).squeeze(-2))
        if return_all_states:
            states.append(state)

    if T == 0:
        o = torch.zeros(B, 0, H, Dv, dtype=f32, device=v.device)
        all_states = torch.zeros(B, 0, H, Dk, Dv, dtype=f32, device=v.device)
    else:
        o = torch.stack(outs, dim=1)
        all_states = torch.stack(states, dim=1) if return_all_states else None
    o = o.to(v.dtype)
    if return_all_states:
        return o, state, all_states
    return o, state
