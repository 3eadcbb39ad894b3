"""Benchmark: cost of optimizer-state policies and of the weights sidecar on resume.

Builds a transformer-shaped set of fp32 parameters with real AdamW state (one step taken), then
measures, best of ``--repeat`` runs:

* memcpy of the same bytes (``torch.Tensor.copy_`` into a preallocated buffer): the physical limit;
* fingerprinting every parameter (the sidecar on save, the comparison on resume);
* attenuate on every parameter: ``apply_policy`` vs a hand-written loop of ``mul_`` per moment;
  both read and write every moment byte once, like a copy, so memcpy of the moment bytes is the limit;
* reset on every parameter: ``apply_policy`` vs a hand-written ``del optimizer.state[p]`` loop;
* ``apply_on_resume`` end to end with 1% of the parameters changed.

Run by hand: ``python bench/bench_opt_policy.py [--layers 8 --dim 1024 --repeat 3 --threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hotweights_trainer import SyncConfig  # noqa: E402
from hotweights_trainer.optim import (apply_on_resume, apply_policy, model_fingerprints,  # noqa: E402
                                     write_sidecar)


def build(layers: int, dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 4 * dim),
                   torch.nn.Linear(4 * dim, dim), torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)]
    return torch.nn.Sequential(*blocks)


def with_state(model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    for p in model.parameters():
        p.grad = None
    return opt


def best(fn, repeat: int, setup=None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a loaded small VM, threads that wait on a "
                         "descheduled peer make every operation, memcpy included, several times slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = build(args.layers, args.dim)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = with_state(model)
    moments = [v for p in params for k, v in opt.state[p].items() if k != "step"]
    moment_bytes = sum(t.numel() * t.element_size() for t in moments)
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(params)} parameters, {sum(p.numel() for p in params) / 1e6:.1f} M elements, "
          f"weights {weight_bytes / 1e6:.0f} MB, AdamW moments {moment_bytes / 1e6:.0f} MB")

    rows = []
    w_dst = [torch.zeros_like(p) for p in params]  # pre-faulted: first touch runs at a fraction of memcpy
    w_copy = best(lambda: [d.copy_(p.detach()) for d, p in zip(w_dst, params)], args.repeat)
    rows.append(("memcpy weights (limit)", w_copy, weight_bytes, w_copy, None))
    fp = best(lambda: model_fingerprints(model), args.repeat)
    rows.append(("fingerprint weights (xxh3)", fp, weight_bytes, w_copy, None))
    with tempfile.TemporaryDirectory() as tmp:
        sc = best(lambda: write_sidecar(tmp, model, step=1), args.repeat)
        rows.append(("write sidecar (fingerprint + JSON)", sc, weight_bytes, w_copy, None))

        m_dst = [torch.zeros_like(t) for t in moments]
        m_copy = best(lambda: [d.copy_(t) for d, t in zip(m_dst, moments)], args.repeat)
        rows.append(("memcpy moments (limit)", m_copy, moment_bytes, m_copy, None))

        def baseline_attenuate():
            for p in params:
                st = opt.state[p]
                st["exp_avg"].mul_(0.999)
                st["exp_avg_sq"].mul_(0.999)

        base = best(baseline_attenuate, args.repeat)
        rows.append(("attenuate: hand-written mul_ loop", base, moment_bytes, m_copy, base))
        att = best(lambda: apply_policy(opt, params, policy="attenuate", attenuation=0.999), args.repeat)
        rows.append(("attenuate: apply_policy", att, moment_bytes, m_copy, base))

        saved = {p: dict(opt.state[p]) for p in params}

        def restore():
            for p, st in saved.items():
                opt.state[p] = dict(st)

        def baseline_reset():
            for p in params:
                del opt.state[p]

        rb = best(baseline_reset, args.repeat, setup=restore)
        rows.append(("reset: hand-written del loop", rb, None, None, rb))
        rp = best(lambda: apply_policy(opt, params, policy="reset"), args.repeat, setup=restore)
        rows.append(("reset: apply_policy", rp, None, None, rb))
        restore()

        write_sidecar(tmp, model, step=1)
        changed = params[: max(1, len(params) // 100)]
        with torch.no_grad():
            for p in changed:
                p.add_(1e-3)
        cfg = SyncConfig()
        e2e = best(lambda: apply_on_resume(model, opt, tmp, policy="attenuate", attenuation=0.999,
                                           config=cfg), args.repeat)
        rows.append((f"apply_on_resume ({len(changed)} of {len(params)} changed)", e2e, weight_bytes, w_copy,
                     None))

    print(f"| {'operation':<44} | {'ms':>9} | {'GB/s':>7} | {'vs memcpy':>9} | {'vs hand-written':>15} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 9}|{'-' * 11}|{'-' * 17}|")
    for name, seconds, nbytes, limit, baseline in rows:
        gbs = f"{nbytes / seconds / 1e9:7.2f}" if nbytes else f"{'-':>7}"
        vs_limit = f"{limit / seconds:9.2f}" if limit else f"{'-':>9}"
        vs_base = f"{baseline / seconds:15.2f}" if baseline else f"{'-':>15}"
        print(f"| {name:<44} | {seconds * 1e3:9.2f} | {gbs} | {vs_limit} | {vs_base} |")
    print("# ratios are time of the reference / time of this row: above 1 is faster than the reference.")
    print("# in-place attenuation reads and writes each moment byte once; memcpy reads one buffer and writes")
    print("# another, so attenuation can beat memcpy. Absolute numbers on shared machines are noisy.")


if __name__ == "__main__":
    main()
