"""vLLM benchmark: trainer step end -> first token generated from the new weights, for a ~280 MB Llama.

A real vLLM engine (CPU build, multi-process: main -> engine core -> worker) serves a Llama made
locally (fp32, 8 layers of 768, about 280 MB). After each simulated optimizer step the trainer
process makes the new weights live by one of three routes, then asks for one token:

* **hotweights** -- ``publish`` over ``shm://`` (the worker's receiver stages and verifies the
  version in the background), then one ``start/update/finish_weight_update`` round and a prefix-cache
  reset;
* **disk** -- what users do without a sync library: ``save_pretrained`` (safetensors), then the
  worker's ``reload_weights(weights_path=...)``;
* **per tensor** -- one ``collective_rpc`` per tensor into the worker's layerwise reload, the shape
  of hand-written per-parameter sync (RPC arguments travel as msgpack, so the tensor goes as a list).

"pause" is the part during which the engine cannot generate (the update/reload calls); the rest
(publishing, saving) can overlap serving. Compared in the same run against one memcpy of the model's
bytes. Run: ``python bench/bench_vllm.py [--rounds 3] [--quick]``. Read the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "recipes"))


class PerTensorLoad:
    """Worker extension for the per-tensor route: layerwise reload fed one tensor per RPC."""

    def bench_begin(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def bench_load(self, name: str, values: list, shape: list, dtype: str) -> None:
        from vllm.config import set_current_vllm_config

        tensor = torch.tensor(values, dtype=getattr(torch, dtype)).view(shape)
        with set_current_vllm_config(self.vllm_config), torch.no_grad():
            self.model_runner.get_model().load_weights([(name, tensor)])

    def bench_finish(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)


def memcpy_seconds(nbytes: int) -> float:
    from bench_core import memcpy_gbps  # one memcpy reference for every benchmark

    return nbytes / (memcpy_gbps(nbytes) * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--changed", type=float, default=1.0,
                    help="share of elements each step changes (RL-sized bf16 updates change ~0.0075); "
                         "below 1, hotweights sends deltas")
    ap.add_argument("--quick", action="store_true", help="a small model, one round (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.hidden, args.layers, args.vocab = 1, 128, 2, 512
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])

    from tiny_llama import load_hf, make_tiny_llama
    from vllm import LLM, SamplingParams
    from vllm.config import WeightTransferConfig

    from hotweights_trainer import SyncConfig, WeightPublisher

    work = Path(tempfile.mkdtemp(prefix="hwt-bench-vllm-"))
    folder = make_tiny_llama(work / "model", hidden=args.hidden, layers=args.layers, heads=args.hidden // 64,
                             kv_heads=args.hidden // 64, intermediate=args.hidden * 8 // 3, vocab=args.vocab,
                             dtype=args.dtype)
    model = load_hf(folder)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    llm = LLM(str(folder), dtype=args.dtype, kv_cache_memory_bytes=32 << 20, max_model_len=128,
              enforce_eager=True, worker_extension_cls="bench_vllm.PerTensorLoad",
              weight_transfer_config=WeightTransferConfig(backend="hotweights"))
    greedy = SamplingParams(max_tokens=1, temperature=0)

    def first_token() -> None:
        llm.generate(["the quick brown fox"], greedy, use_tqdm=False)

    def new_weights(seed: int) -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                step = torch.randn_like(p) * 1e-2 * p.abs().mean()
                if args.changed < 1:
                    step *= torch.rand(p.shape) < args.changed
                p.add_(step)

    endpoint = f"shm://bench-vllm-{os.getpid()}"
    delta = "auto" if args.changed < 1 else "off"
    pub = WeightPublisher(endpoint, config=SyncConfig.from_env(delta=delta))
    llm.init_weight_transfer_engine({"init_info": {"endpoint": endpoint, "delta": delta}})
    pub.wait_for_receivers(1, timeout=120)

    pub_bytes: list[int] = []

    def hotweights() -> float:
        result = pub.publish(model)
        version = result.version
        pub_bytes.append(result.bytes_sent)
        t = time.perf_counter()
        llm.start_weight_update()
        llm.update_weights({"update_info": {"version": version}})
        llm.finish_weight_update(str(version))
        llm.reset_prefix_cache()
        return time.perf_counter() - t

    def disk() -> float:
        target = work / "ckpt"
        model.save_pretrained(target)
        t = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(target), "is_checkpoint_format": True})
        llm.reset_prefix_cache()
        return time.perf_counter() - t

    def per_tensor() -> float:
        t = time.perf_counter()
        llm.collective_rpc("bench_begin")
        for name, tensor in model.state_dict().items():
            # collective_rpc arguments travel as msgpack, where a tensor arrives as a nested list
            llm.collective_rpc("bench_load", args=(name, tensor.flatten().tolist(), list(tensor.shape),
                                                   str(tensor.dtype).removeprefix("torch.")))
        llm.collective_rpc("bench_finish")
        llm.reset_prefix_cache()
        return time.perf_counter() - t

    routes = {f"hotweights (shm, {'delta' if delta == 'auto' else 'dense'})": hotweights, "disk: save_pretrained + reload": disk,
              "per tensor collective_rpc": per_tensor}
    first_token()
    if delta == "auto":
        hotweights()  # the first version is always dense; deltas follow
    rows: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in routes}
    seed = 0
    for _ in range(args.rounds):
        for name, route in routes.items():  # interleaved, so load changes hit every route alike
            seed += 1
            new_weights(seed)
            t0 = time.perf_counter()
            pause = route()
            first_token()
            rows[name][0].append(time.perf_counter() - t0)
            rows[name][1].append(pause)
    copy_s = memcpy_seconds(nbytes)
    pub.close()
    llm.llm_engine.engine_core.shutdown()

    base = statistics.median(rows["disk: save_pretrained + reload"][0])
    print(f"\nvLLM update, {nbytes / 1e6:.0f} MB {args.dtype} Llama ({args.layers} layers x {args.hidden}), "
          f"{args.changed:.2%} of elements changed per step, multi-process engine, median of {args.rounds}; "
          f"memcpy of the model {copy_s * 1e3:.0f} ms; hotweights sent {pub_bytes[-1] / 1e6:.1f} MB last")
    print(f"| route | step end -> first token (s) | generation pause (s) | pause / memcpy | speed-up vs disk |")
    print("|---|---|---|---|---|")
    for name, (total, pause) in rows.items():
        t, p = statistics.median(total), statistics.median(pause)
        print(f"| {name} | {t:.3f} | {p:.3f} | {p / copy_s:.1f}x | {base / t:.1f}x |")


if __name__ == "__main__":
    main()
