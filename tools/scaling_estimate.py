"""Paper estimate of data-parallel scaling for this project's AlexNet (docs/SCALING.md).

The gradient size is counted from the model itself; the single-GPU step times are inputs
(--fwd-ms/--bwd-ms/--update-ms, default: the H100 figures in the project's speed anchors, bf16,
channels_last, fused SGD, eager, batch 128). Communication follows the usual alpha-beta model of
NCCL's ring all-reduce: inside a node over NVLink, across nodes hierarchically (reduce-scatter
in the node, one ring per GPU rail between nodes, all-gather in the node).

    python tools/scaling_estimate.py                 # the tables in docs/SCALING.md
    python tools/scaling_estimate.py --bwd-ms 2.92   # with torch.compile's backward
"""

from __future__ import annotations

import argparse

from alexnet_pipe.model.alexnet import AlexNet, AlexNetConfig

GPUS_PER_NODE = 8
NVLINK_BUS_GBPS = 360.0  # GB/s NCCL all-reduce bus bandwidth on 8 H100 SXM (NVSwitch), large messages
ALPHA_US = 8.0  # per-hop latency, inter-node (InfiniBand/RoCE), microseconds


def allreduce_ms(nbytes: float, gpus: int, nic_gbit: float, nics: int = GPUS_PER_NODE) -> float:
    """Time of one all-reduce of ``nbytes`` over ``gpus`` GPUs, 8 per node, ``nics`` NICs of
    ``nic_gbit`` each per node (8: one per GPU, as in a DGX; 1: a typical cloud node)."""
    intra = min(gpus, GPUS_PER_NODE)
    t = 2 * (intra - 1) / intra * nbytes / (NVLINK_BUS_GBPS * 1e9) if intra > 1 else 0.0
    nodes = max(1, gpus // GPUS_PER_NODE)
    if nodes > 1:  # each of the node's NICs carries its share of the buffer in a ring over the nodes
        shard = nbytes / nics
        t += 2 * (nodes - 1) / nodes * shard / (nic_gbit / 8 * 1e9) + 2 * (nodes - 1) * ALPHA_US * 1e-6
    return t * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fwd-ms", type=float, default=3.17)
    ap.add_argument("--bwd-ms", type=float, default=4.10)
    ap.add_argument("--update-ms", type=float, default=0.37)
    ap.add_argument("--batch", type=int, default=128, help="per-GPU batch the times were measured at")
    args = ap.parse_args()

    params = sum(p.numel() for p in AlexNet(AlexNetConfig(num_classes=1000, crop=224)).parameters())
    print(f"parameters: {params:,} (fp32 gradients {params * 4 / 1e6:.0f} MB, bf16 {params * 2 / 1e6:.0f} MB)")
    print(f"step at batch {args.batch}: fwd {args.fwd_ms} + bwd {args.bwd_ms} + update {args.update_ms} ms\n")

    print("| link | GPUs | all-reduce fp32 ms | bf16 ms | per-GPU batch that hides bf16 | efficiency fp32 | bf16 |")
    print("|---|---|---|---|---|---|---|")
    step = args.fwd_ms + args.bwd_ms + args.update_ms
    cases = [(8, 100, 8)] + [(g, nic, nics) for nics in (8, 1) for nic in (100, 200, 400) for g in (16, 64, 512)]
    for gpus, nic, nics in cases:
        row = []
        for nbytes in (params * 4, params * 2):
            comm = allreduce_ms(nbytes, gpus, nic, nics)
            exposed = max(0.0, comm - args.bwd_ms)  # DDP overlaps buckets with the backward pass
            row.append((comm, step / (step + exposed)))
        hide = args.batch * allreduce_ms(params * 2, gpus, nic, nics) / args.bwd_ms
        link = "NVLink, one node" if gpus == 8 else f"{nic} Gb/s x {nics} per node"
        print(f"| {link} | {gpus} | {row[0][0]:.2f} | {row[1][0]:.2f} | {max(1, round(hide))} "
              f"| {row[0][1]:.0%} | {row[1][1]:.0%} |")


if __name__ == "__main__":
    main()
