"""The distributed benchmark: saving an FSDP2 model from gloo ranks on CPU to
tmpfs, ours (two ways) against three common ways of saving FSDP2 models.

  python benchmarks/distributed_bench.py [--dir /dev/shm] [--rounds 3] [--ranks 2] [--layers 8]
      [--json results-distributed.json]

Methods (each round, each method in fresh rank processes):
  ours            save_model_streaming: each rank writes its share of the
                  shards (max 100MB each), receiving from the other ranks
                  (point to point) the pieces of the parameters it writes.
  ours_rank0      the same with writer_ranks=[0] (no shared filesystem):
                  rank 0 writes every file, the others only send.
  trinity         Trinity-RFT's pattern: every rank gathers every parameter
                  (full_tensor()), rank 0 streams them into one file with
                  save_safetensors_streaming.
  full_state_dict get_model_state_dict(full_state_dict=True, cpu_offload=True),
                  then safetensors.torch.save_file on rank 0.
  dcp_hf          dcp.save with HuggingFaceStorageWriter(save_distributed=True,
                  enable_consolidation=True): sharded files, then consolidated.

The model is Llama-shaped (hidden 1024, vocab 32000, untied, bf16; 8 decoder
layers, 297 MiB, or --layers), built on the meta device and sharded with fully_shard per
layer and at the root, so that no rank ever holds it whole before the save.
Per rank: the time of the save (the table shows the slowest rank), and the
growth of peak RSS during it (VmHWM, reset with /proc/self/clear_refs just
before). Bytes written: every byte the method wrote into its folder,
counting files it wrote and then removed (dcp's sharded files).

This is a stand-alone driver rather than a scenario of bench.py: its
methods start ranks, build a sharded model, and are compared on the
slowest rank, which bench.py's single-process measuring does not model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

from peak_memory import memory_baseline, peak_kib  # beside this script

# The ways ours is compared with (the targets below).
BASELINES = ("trinity", "full_state_dict", "dcp_hf")
METHODS = ("ours", "ours_rank0", *BASELINES)
MIB = 1 << 20


def _folder_bytes(folder: str) -> int:
    total = 0
    for parent, _, names in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(parent, name)) for name in names)
    return total


def _model(mesh, layers: int):
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    with torch.no_grad():
        for parameter in model.parameters():
            local = parameter.to_local()
            local.copy_(torch.randn(local.shape, generator=generator))
    return model


def _save(method: str, model, folder: str) -> int:
    """Saves; returns the bytes it wrote and removed again."""
    import torch.distributed as dist

    rank = dist.get_rank()
    if method in ("ours", "ours_rank0"):
        from trinity_stream_saver import save_model_streaming

        save_model_streaming(model, folder, max_shard_size="100MB",
                             writer_ranks=[0] if method == "ours_rank0" else None)
    elif method == "trinity":
        from trinity_stream_saver import save_safetensors_streaming

        state = model.state_dict(keep_vars=True)
        meta = [(name, tensor.dtype, list(tensor.shape)) for name, tensor in state.items()]

        def gathered():
            for name, tensor in state.items():
                full = tensor.full_tensor()
                yield name, full
                del full

        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            save_safetensors_streaming(gathered(), os.path.join(folder, "model.safetensors"), meta)
        else:
            for _ in gathered():
                pass
    elif method == "full_state_dict":
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
            save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        del state
    elif method == "dcp_hf":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        written = []
        real_remove, real_rmtree = os.remove, shutil.rmtree

        # Bytes dcp writes and removes again (its sharded files) count too.
        def counting_remove(path, *args, **kwargs):
            if os.path.isfile(path):
                written.append(os.path.getsize(path))
            return real_remove(path, *args, **kwargs)

        def counting_rmtree(path, *args, **kwargs):
            written.append(_folder_bytes(path))
            return real_rmtree(path, *args, **kwargs)

        os.remove, shutil.rmtree = counting_remove, counting_rmtree
        try:
            dcp.save(model.state_dict(), storage_writer=HuggingFaceStorageWriter(
                folder, save_distributed=True, enable_consolidation=True))
        finally:
            os.remove, shutil.rmtree = real_remove, real_rmtree
        return sum(written)
    dist.barrier()
    return 0


def _rank(rank: int, world: int, method: str, root: str, folder: str, layers: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-{method}", rank=rank,
                            world_size=world)
    model = _model(init_device_mesh("cpu", (world,)), layers)
    dist.barrier()
    before, _ = memory_baseline()
    start = time.perf_counter()
    removed = _save(method, model, folder) or 0
    seconds = time.perf_counter() - start
    growth = (peak_kib() - before) / 1024
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / MIB
    total = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    with open(os.path.join(root, f"{method}-rank{rank}.json"), "w") as file:
        json.dump({"seconds": seconds, "rss_growth_mib": growth, "removed_bytes": removed,
                   "largest_mib": largest, "model_mib": total}, file)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's teardown can abort at interpreter exit


def spawn_ranks(target, world: int, method: str, root: str, *args) -> list[dict]:
    """Runs target(rank, world, method, root, *args) in `world` fresh
    processes; returns what each wrote to <root>/<method>-rank<N>.json."""
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=target, args=(r, world, method, root, *args))
             for r in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(900)
    if any(process.exitcode != 0 for process in ranks):
        raise RuntimeError(f"{method}: ranks exited with {[p.exitcode for p in ranks]}")
    per_rank = []
    for rank in range(world):
        with open(os.path.join(root, f"{method}-rank{rank}.json")) as file:
            per_rank.append(json.load(file))
    return per_rank


def run(method: str, world: int, directory: str, layers: int = 8) -> dict:
    root = tempfile.mkdtemp(prefix=f"tss-dist-{method}-", dir=directory)
    folder = os.path.join(root, "checkpoint")
    try:
        per_rank = spawn_ranks(_rank, world, method, root, folder, layers)
        return {
            "seconds": max(r["seconds"] for r in per_rank),
            "rank_seconds": [r["seconds"] for r in per_rank],
            "rank_rss_growth_mib": [r["rss_growth_mib"] for r in per_rank],
            "bytes_written": _folder_bytes(folder) + sum(r["removed_bytes"] for r in per_rank),
            "largest_mib": per_rank[0]["largest_mib"],
            "model_mib": per_rank[0]["model_mib"],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8,
                        help="decoder layers of the model (8: 297 MiB; each adds 43 MiB)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json")
    args = parser.parse_args()
    methods = args.methods.split(",")
    results = {method: [] for method in methods}
    for round_index in range(args.rounds):
        for method in methods:  # interleaved, so that drift hits every method alike
            result = run(method, args.ranks, args.dir, args.layers)
            results[method].append(result)
            print(f"round {round_index + 1} {method}: {result['seconds']:.2f} s, rank growth "
                  f"{[round(g) for g in result['rank_rss_growth_mib']]} MiB", flush=True)
    first = results[methods[0]][0]
    print(f"\nmodel {first['model_mib']:.0f} MiB bf16, largest parameter {first['largest_mib']:.1f} MiB, "
          f"{args.ranks} gloo ranks, {args.dir}, median of {args.rounds} rounds\n")
    print("| method | time, slowest rank (s) | peak RSS growth per rank (MiB) | bytes written (MiB) |")
    print("|---|---|---|---|")
    summary = {}
    for method in methods:
        runs = results[method]
        seconds = statistics.median(r["seconds"] for r in runs)
        growth = [statistics.median(r["rank_rss_growth_mib"][k] for r in runs) for k in range(args.ranks)]
        written = statistics.median(r["bytes_written"] for r in runs) / MIB
        summary[method] = {"median_s": seconds, "rank_rss_growth_mib": growth, "written_mib": written}
        print(f"| {method} | {seconds:.2f} | {' / '.join(f'{g:.0f}' for g in growth)} | {written:.0f} |")
    targets = _targets(summary, first["largest_mib"])
    for line in targets:
        print(line)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"argv": sys.argv, "runs": results, "summary": summary, "targets": targets},
                      file, indent=1)


def _targets(summary: dict, largest_mib: float) -> list[str]:
    """The targets: ours faster than every baseline, and its rank-0 peak growth
    at most the largest parameter + 64 MiB; judged on the medians of this run."""
    lines = []
    if "ours" not in summary:
        return lines
    ours = summary["ours"]
    baselines = [method for method in BASELINES if method in summary]
    if baselines:
        fastest = min(baselines, key=lambda method: summary[method]["median_s"])
        passed = ours["median_s"] < summary[fastest]["median_s"]
        lines.append(f"target: ours is faster than {', '.join(baselines)}: "
                     f"{'PASS' if passed else 'FAIL'} ({ours['median_s']:.2f} s; the fastest of "
                     f"them, {fastest}: {summary[fastest]['median_s']:.2f} s)")
    bound = largest_mib + 64
    growth = ours["rank_rss_growth_mib"][0]
    lines.append(f"target: ours' rank-0 peak growth <= largest parameter + 64 MiB = {bound:.1f} MiB: "
                 f"{'PASS' if growth <= bound else 'FAIL'} ({growth:.0f} MiB)")
    return lines


if __name__ == "__main__":
    main()
