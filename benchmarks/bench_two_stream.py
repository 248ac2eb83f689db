"""Speed and memory of the two-stream gated delta op: efficient form vs the loop reference (CPU or CUDA).

What it measures, all in one run on one set of seeded inputs (fp32, clean_readout="token"):

* forward time (and, with ``--backward``, forward + backward time) of ``gated_delta_two_stream`` vs
  ``gated_delta_two_stream_reference`` (literal per-segment / per-block / per-view loops). The ratio printed is
  reference / efficient time (goal: >= 20x): after a warm-up, ``--rounds`` interleaved rounds, each timing the
  fast forms ``--repeats`` times (median) and the slow reference once; the median ratio over rounds is printed,
  for wall-clock time and for process CPU time (the latter is less distorted when other processes share the
  machine; ``--threads 1`` reduces that distortion further).
* a third row, "batched naive": the straightforward efficient design, with materialised clean block states
  (``gated_delta_chunk(block_states=bs)``) seeding one batch of ``bs``-step sequential recurrences
  (``gated_delta_naive``), instead of the op's closed form read from chunk-start states. It shows what that saves.
* memory, from shapes: the clean states each design keeps (chunk-start states ``S * ceil(T / C)``, block states
  ``S * ceil(T / bs)``, per-token states ``S * T`` as the reference materialises; times ``H * Dk * Dv`` fp32);
  and, measured, the bytes autograd saves for backward (unique storages seen by a saved-tensors hook).
* a correctness line: max |efficient - reference| over both outputs.

Run:  python benchmarks/bench_two_stream.py [--T 2048] [--bs 4] [--S 1] [--V 2] [--Hk 2] [--H 4] [--dk 64]
             [--dv 64] [--repeats 5] [--rounds 3] [--backward] [--no-reference] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _models import add_device_args, resolve

from flare.device import describe
from flare.ops.gated_delta import (
    gated_delta_chunk,
    gated_delta_naive,
    gated_delta_two_stream,
    gated_delta_two_stream_reference,
)
from flare.ops.gated_delta.two_stream import CHUNK


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


def run_once(fn, xs, bs, backward, device):
    """One call: ``((wall seconds, process CPU seconds), outputs)``."""
    ys = [x.detach().requires_grad_(backward) for x in xs]
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    o_c, o_n = fn(*ys, bs)
    if backward:
        (o_c.sum() + o_n.sum()).backward()
    sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0), (o_c.detach(), o_n.detach())


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
    ap.add_argument("--repeats", type=int, default=5, help="runs of the fast forms per round (median)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the reference runs once per round")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) loop reference")
    ap.add_argument("--threads", type=int, default=None)
    add_device_args(ap, dtype=False)  # fp32 inputs: the op's own precision contract
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, _ = resolve(a)
    xs = make_inputs(a.S, a.V, a.T, a.Hk, a.H, a.dk, a.dv, device)
    nb = -(-a.T // a.bs)
    print(f"S={a.S} V={a.V} T={a.T} bs={a.bs} Hk={a.Hk} H={a.H} Dk={a.dk} Dv={a.dv} {describe(device, torch.float32)} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"{'forward+backward' if a.backward else 'forward'}")

    # Interleaved rounds (efficient x repeats, batched naive x repeats, reference x 1): each round's ratio
    # compares runs made within seconds of each other, which keeps a shared machine's load drift out of it.
    fns = {"efficient": gated_delta_two_stream, "batched naive": batched_naive_two_stream}
    if not a.no_reference:
        fns["reference"] = gated_delta_two_stream_reference
    outs = {name: run_once(fn, xs, a.bs, a.backward, device)[1] for name, fn in fns.items()}  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(a.rounds):
        for name, fn in fns.items():
            n = 1 if name == "reference" else a.repeats
            runs = [run_once(fn, xs, a.bs, a.backward, device)[0] for _ in range(n)]
            wall[name].append(statistics.median(r[0] for r in runs))
            cpu[name].append(statistics.median(r[1] for r in runs))

    def row(label, name):
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{label:38s} {w * 1e3:10.2f} ms wall {c * 1e3:10.2f} ms cpu")
        return w, c

    t_eff, c_eff = row("efficient op:", "efficient")
    t_bn, c_bn = row("batched naive (block states + naive):", "batched naive")
    print(f"{'':38s} {t_bn / t_eff:10.2f}x wall {c_bn / c_eff:10.2f}x cpu   (vs efficient)")
    if not a.no_reference:
        row("reference (loops):", "reference")
        for kind, tab in (("wall", wall), ("cpu", cpu)):
            ratios = sorted(r / e for r, e in zip(tab["reference"], tab["efficient"]))
            print(f"speed-up efficient vs reference ({kind:4s}): {statistics.median(ratios):6.1f}x median of "
                  f"{a.rounds} rounds (min {ratios[0]:.1f}x, max {ratios[-1]:.1f}x; goal >= 20x)")
        err = max((e - r).abs().max().item() for e, r in zip(outs["efficient"], outs["reference"]))
        print(f"max |efficient - reference| = {err:.2e}")
    out_eff, out_bn = outs["efficient"], outs["batched naive"]
    err_bn = max((e - r).abs().max().item() for e, r in zip(out_eff, out_bn))
    print(f"max |efficient - batched naive| = {err_bn:.2e}")

    state = a.H * a.dk * a.dv * 4  # one fp32 state, all heads
    chunk = a.bs * max(1, CHUNK // a.bs)
    n_chunks = -(-a.T // chunk)
    rows = [
        (f"chunk-start states (efficient op, C={chunk})", a.S * n_chunks * state),
        ("block states S*ceil(T/bs) (batched naive)", a.S * nb * state),
        ("per-token clean states S*T (reference)", a.S * a.T * state),
        ("per-token states, clean + V views", a.S * (1 + a.V) * a.T * state),
    ]
    for label, n in rows:
        print(f"{label:44s} {mib(n)}")
    for name, fn in (("efficient", gated_delta_two_stream), ("batched naive", batched_naive_two_stream)):
        print(f"{'saved for backward, ' + name:44s} {mib(saved_bytes(fn, xs, a.bs))}")


if __name__ == "__main__":
    main()
