"""TP=2 scenario for the vLLM backend, in its own process (the multi-process engine spawns workers).

Publishes three versions back to back, then asks the engine for version 1: both ranks must load the
same, newest committed version (3). Prints one JSON line with what each rank holds.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    from tiny_llama import load_hf, make_tiny_llama
    from vllm import LLM
    from vllm.config import WeightTransferConfig

    from hotweights_trainer import WeightPublisher

    tmp = Path(tempfile.mkdtemp(prefix="hwt-tp-"))
    folder = make_tiny_llama(tmp / "model", seed=0, kv_heads=2)
    llm = LLM(str(folder), dtype="float32", tensor_parallel_size=2, kv_cache_memory_bytes=16 << 20,
              max_model_len=128, enforce_eager=True,
              worker_extension_cls="hotweights_trainer.integrations.vllm.worker_ext.HotweightsWorkerExtension",
              weight_transfer_config=WeightTransferConfig(backend="hotweights"))

    def checksums() -> dict:
        out: dict = {}
        for worker in llm.llm_engine.collective_rpc("compute_weight_checksums"):
            out.update(worker)
        return out

    endpoint = f"shm://vllm-tp-{tmp.name}"
    model = load_hf(folder)
    versions = []
    with WeightPublisher(endpoint) as pub:
        llm.init_weight_transfer_engine({"init_info": {"endpoint": endpoint, "timeout_s": 60}})
        connected = pub.wait_for_receivers(2, timeout=120)
        for seed in (1, 2, 3):
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            versions.append(pub.publish(model, step=seed).version)
        llm.start_weight_update()
        llm.update_weights({"update_info": {"version": 1, "timeout_s": 60}})
        ranks = llm.collective_rpc("get_hotweights_version")
        llm.finish_weight_update(str(versions[-1]))
        synced = checksums()
    model.save_pretrained(tmp / "final")
    llm.llm_engine.collective_rpc("reload_weights", kwargs={"weights_path": str(tmp / "final"),
                                                            "is_checkpoint_format": True})
    reference = checksums()
    sys.stdout.write(json.dumps({"connected": connected, "versions": versions,
                                 "weight_version": llm.get_weight_version(), "ranks": ranks,
                                 "tensors": len(synced), "equal": synced == reference}) + "\n")
    sys.stdout.flush()
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
