"""The PyTorch peer of `cargo xtask gpu`: a decode step's matrix-vector products for a model's shapes,
in f16 on the card (cuBLAS), eager and replayed as a CUDA graph. No attention, norms or sampling: the
floor of what reading the weights costs in PyTorch, a token at a time.

    python3 matvec_chain.py DIM LAYERS HEADS KV_HEADS HEAD_DIM FFN VOCAB

Prints one JSON line: tokens/s eager and with a CUDA graph, and the weights' bytes a token reads.
"""

import json
import sys
import time

import torch


def main() -> None:
    dim, layers, heads, kv_heads, head_dim, ffn, vocab = (int(value) for value in sys.argv[1:8])
    device = torch.device("cuda")
    torch.manual_seed(0)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device, dtype=torch.float16) * 0.02).contiguous()

    stack = [
        (weight(q_dim + 2 * kv_dim, dim), weight(dim, q_dim), weight(2 * ffn, dim), weight(dim, ffn))
        for _ in range(layers)
    ]
    output = weight(vocab, dim)
    bytes_per_token = sum(w.numel() * 2 for layer in stack for w in layer) + output.numel() * 2
    x = torch.randn(dim, 1, device=device, dtype=torch.float16)

    def step() -> torch.Tensor:
        h = x
        for qkv, wo, w13, w2 in stack:
            a = qkv @ h
            h = h + wo @ a[:q_dim]
            g = w13 @ h
            h = h + w2 @ (torch.nn.functional.silu(g[:ffn]) * g[ffn:])
        return output @ h

    def rate(run) -> float:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
        turns = 50
        start = time.perf_counter()
        for _ in range(turns):
            run()
        torch.cuda.synchronize()
        return turns / (time.perf_counter() - start)

    eager = rate(step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graphed = rate(graph.replay)
    print(json.dumps({"eager_tokens_per_second": eager, "graph_tokens_per_second": graphed,
                      "bytes_per_token": bytes_per_token}))


if __name__ == "__main__":
    main()
