"""Speed and memory of the two-stream gated delta op: efficient form vs the loop reference (CPU or CUDA).

What it measures, all in one run on one set of seeded inputs (fp32, clean_readout="token"):

* forward time (and, with ``--backward``, forward + backward time) of ``gated_delta_two_stream`` vs
  ``gated_delta_two_stream_reference`` (literal per-segment / per-block / per-view loops). The ratio printed is
  reference / efficient time (goal: >= 20x). Medians of ``--repeats`` timed runs after a warm-up run (the
  reference, being slow, runs ``--ref-repeats`` times).
* a third row, "batched naive": the same schedule with the noisy blocks run as one batch of ``bs``-step
  sequential recurrences (``gated_delta_naive`` seeded by the clean block states) instead of the closed form
  the efficient op uses. It shows what the closed form saves.
* memory: the clean block states the op keeps (``S * ceil(T / bs) * H * Dk * Dv`` floats) vs per-token states
  (``S * T * H * Dk * Dv``, what the reference materialises), from shapes; and, measured, the bytes autograd
  saves for backward (unique storages seen by a saved-tensors hook) per form.
* a correctness line: max |efficient - reference| over both outputs.

Run:  python benchmarks/bench_two_stream.py [--T 2048] [--bs 4] [--S 1] [--V 2] [--Hk 2] [--H 4] [--dk 64]
                                           [--dv 64] [--repeats 5] [--ref-repeats 1] [--backward] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from flare.ops.gated_delta import (
    gated_delta_chunk,
    gated_delta_naive,
    gated_delta_two_stream,
    gated_delta_two_stream_reference,
)


def make_inputs(S, V, T, Hk, H, dk, dv, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    xs = []
    for lead in ((S,), (S, V)):
        xs += [
            F.normalize(rn(*lead, T, Hk, dk), dim=-1),
            F.normalize(rn(*lead, T, Hk, dk), dim=-1),
            rn(*lead, T, H, dv),
            -F.softplus(rn(*lead, T, H)),
            torch.sigmoid(rn(*lead, T, H)),
        ]
    return xs


def batched_naive_two_stream(q_c, k_c, v_c, g_c, beta_c, q_n, k_n, v_n, g_n, beta_n, bs):
    """The same op with the noisy blocks as one batch of bs-step sequential recurrences (token readout)."""
    S, V, T, Hk, Dk = q_n.shape
    H, Dv = v_n.shape[3], v_n.shape[4]
    nb, pad = -(-T // bs), (-T) % bs
    o_c, _, blk = gated_delta_chunk(q_c, k_c, v_c, g_c, beta_c, None, None, block_states=bs)
    s0 = torch.cat([torch.zeros_like(blk[:, :1]), blk[:, :-1]], dim=1)  # [S, nb, H, Dk, Dv]
    s0 = s0[:, None].expand(S, V, nb, H, Dk, Dv).reshape(S * V * nb, H, Dk, Dv)

    def rows(x):  # [S, V, T, ...] -> [S * V * nb, bs, ...], zero-padded (g = beta = 0)
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
        return x.reshape(S * V * nb, bs, *x.shape[3:])

    q, k, v, g, beta = (rows(x) for x in (q_n, k_n, v_n, g_n, beta_n))
    _, s_end = gated_delta_naive(q, k, v, g, beta, s0)  # [S * V * nb, H, Dk, Dv]
    qh = q.repeat_interleave(H // Hk, dim=2).transpose(1, 2) * Dk**-0.5  # [rows, H, bs, Dk]
    o_n = (qh @ s_end).transpose(1, 2).reshape(S, V, nb * bs, H, Dv)[:, :, :T]
    return o_c, o_n


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, xs, bs, repeats, backward, device):
    def once():
        ys = [x.detach().requires_grad_(backward) for x in xs]
        sync(device)
        t0 = time.perf_counter()
        o_c, o_n = fn(*ys, bs)
        if backward:
            (o_c.sum() + o_n.sum()).backward()
        sync(device)
        return time.perf_counter() - t0, (o_c.detach(), o_n.detach())

    _, out = once()  # warm-up
    return statistics.median(once()[0] for _ in range(repeats)), out


def saved_bytes(fn, xs, bs):
    """Bytes autograd keeps for backward (unique storages, inputs excluded)."""
    ys = [x.detach().requires_grad_(True) for x in xs]
    inputs = {y.untyped_storage().data_ptr() for y in ys}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in inputs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*ys, bs)
    return sum(seen.values())


def mib(n):
    return f"{n / 2**20:9.1f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--S", type=int, default=1)
    ap.add_argument("--V", type=int, default=2)
    ap.add_argument("--Hk", type=int, default=2)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=1)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) loop reference")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    xs = make_inputs(a.S, a.V, a.T, a.Hk, a.H, a.dk, a.dv, device)
    nb = -(-a.T // a.bs)
    print(f"S={a.S} V={a.V} T={a.T} bs={a.bs} Hk={a.Hk} H={a.H} Dk={a.dk} Dv={a.dv} device={device} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"{'forward+backward' if a.backward else 'forward'}")

    t_eff, out_eff = timed(gated_delta_two_stream, xs, a.bs, a.repeats, a.backward, device)
    t_bn, out_bn = timed(batched_naive_two_stream, xs, a.bs, a.repeats, a.backward, device)
    print(f"efficient (chunk + closed-form blocks): {t_eff * 1e3:10.2f} ms")
    print(f"batched naive noisy blocks:             {t_bn * 1e3:10.2f} ms   ({t_bn / t_eff:.2f}x efficient)")
    if not a.no_reference:
        t_ref, out_ref = timed(gated_delta_two_stream_reference, xs, a.bs, a.ref_repeats, a.backward, device)
        print(f"reference (loops):                      {t_ref * 1e3:10.2f} ms")
        print(f"speed-up efficient vs reference: {t_ref / t_eff:.1f}x   (goal >= 20x)")
        err = max((e - r).abs().max().item() for e, r in zip(out_eff, out_ref))
        print(f"max |efficient - reference| = {err:.2e}")
    err_bn = max((e - r).abs().max().item() for e, r in zip(out_eff, out_bn))
    print(f"max |efficient - batched naive| = {err_bn:.2e}")

    state = a.H * a.dk * a.dv * 4  # one fp32 state, all heads
    print(f"block states kept (S*ceil(T/bs) states): {mib(a.S * nb * state)}")
    print(f"per-token clean states (S*T states):     {mib(a.S * a.T * state)}   ({a.T / nb:.1f}x)")
    print(f"per-token states, clean + V views:       {mib(a.S * (1 + a.V) * a.T * state)}")
    for name, fn in (("efficient", gated_delta_two_stream), ("batched naive", batched_naive_two_stream)):
        print(f"saved for backward, {name:14s}: {mib(saved_bytes(fn, xs, a.bs))}")


if __name__ == "__main__":
    main()
