"""Serving benchmark: a Poisson stream of requests over HTTP to Ray Serve replicas of the digits model, or of a
tiny text-to-image pipeline.

    python bench/serve.py                                  # 64 requests, 3 rounds; writes bench/results/serve.{json,md}
    python bench/serve.py --requests 64 --rate 30 --rounds 3 --workloads uniform mixed
    python bench/serve.py --model text --rate 4 --rounds 2 --workloads mixed   # writes bench/results/serve_text.*

Four ways to serve, each one replica (1 torch thread, the other core runs Ray's HTTP proxy and this client),
all on the same dynamic eager pair of the digits model, deployed side by side and taking turns within each
round (so machine noise hits them alike):

- `one at a time`: `batching="none"`, generations run first come first served;
- `serve.batch generations`: `batching="generation"`, Ray Serve's `@serve.batch` groups waiting requests and
  runs each group with equal size/steps/schedule as one batched generation;
- `step-level`: `batching="step"`, continuous step-level batching (`StepBatcher`);
- `step-level, no DeepCache`: the same replica asked for interval 1 (every step full), what DeepCache adds.

Workloads: `uniform` (16 px, 20 steps, 1:5, batch 1: a service with one setting) and `mixed` (sizes 12/16/20
px, 10/20/30 steps: clients with different settings). `--model text` serves the tiny Stable Diffusion pipeline of
`eval.tiny_pipelines` (CLIP encoder, U-Net, VAE; random weights) instead: requests carry a prompt of random letters,
guidance 5 (two rows each), `uniform` 48 px and 20 steps, `mixed` 32/48 px, 10/20/30 steps and guidance 5/7.5
(`--sizes` for others, multiples of 16 from 32: the larger the latents, the more of a U-Net call is arithmetic
that batching does not share).
Requests arrive as a Poisson stream of `--rate` per second (seeded gaps, the same stream for every way). Per
stream: throughput = requests / (last response - first send), and p50/p95 of per-request latency (send to full
response); medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"
WAYS = {  # name: (app, interval override)
    "one at a time": ("none", None),
    "serve.batch generations": ("generation", None),
    "step-level": ("step", None),
    "step-level, no DeepCache": ("step", 1),
}


def workload(kind: str, n: int, rate: float, seed: int, sizes: list[int], text: bool = False
             ) -> list[tuple[float, dict]]:
    """`n` (arrival second, request body) pairs: Poisson arrivals, the request settings of `kind` (`uniform`: the
    middle one of `sizes`, 20 steps; `mixed`: any of `sizes`, 10/20/30 steps)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)) - 1 / rate
    bodies = []
    for i in range(n):
        size, steps = (sizes[len(sizes) // 2], 20) if kind == "uniform" else (int(rng.choice(sizes)),
                                                                              int(rng.choice([10, 20, 30])))
        body = dict(seed=i, height=size, width=size, steps=steps, interval=5, format="npy")
        if text:
            words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(2, 6))))
                     for _ in range(int(rng.integers(1, 4)))]
            guidance = 5.0 if kind == "uniform" else float(rng.choice([5.0, 7.5]))
            body |= dict(prompt=" ".join(words), guidance_scale=guidance)
        bodies.append(body)
    return list(zip(arrivals.tolist(), bodies))


async def stream(url: str, requests: list[tuple[float, dict]], interval: int | None) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()

        async def one(at: float, body: dict) -> tuple[float, float]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter()
            body = body | ({"interval": interval} if interval else {})
            async with session.post(f"{url}/generate", json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
            return sent, time.perf_counter()

        times = await asyncio.gather(*(one(at, body) for at, body in requests))
    first = min(s for s, _ in times)
    latencies = sorted(e - s for s, e in times)
    return {"throughput": len(times) / (max(e for _, e in times) - first),
            "p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=30.0, help="mean arrivals per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["uniform", "mixed"], choices=["uniform", "mixed"])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--sizes", type=int, nargs="+", help="image sizes of the requests, pixels a side (default: "
                        "12 16 20 for digits, 32 48 for text)")
    parser.add_argument("--out", help="report path without suffix (default: bench/results/serve or serve_text)")
    parser.add_argument("--model", choices=["digits", "text"], default="digits",
                        help="the shipped digits DDPM, or the tiny text-to-image pipeline (eval.tiny_pipelines)")
    args = parser.parse_args()
    sizes = args.sizes or ([32, 48] if args.model == "text" else [12, 16, 20])

    import ray
    from ray import serve

    from deepcache_compile.eval.report import machine, write_report
    from deepcache_compile.eval.tiny_pipelines import save_tiny_pipeline
    from deepcache_compile.serve.app import DeepCacheDeployment
    from deepcache_compile.serve.service import ServeOptions

    text = args.model == "text"
    model = str(save_tiny_pipeline(Path(tempfile.mkdtemp(prefix="sd-tiny")))) if text else "digits"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for app in sorted({app for app, _ in WAYS.values()}):
            sized = dict(min_size=min(sizes), max_size=max(sizes)) if text else {}  # the pair covers every size
            options = ServeOptions(model=model, batching=app, max_batch=args.max_batch, threads=1, **sized)
            # three replicas on two logical CPUs: only one is busy at a time (the ways take turns)
            serve.run(DeepCacheDeployment.options(ray_actor_options={"num_cpus": 0.5}).bind(options),
                      name=app, route_prefix=f"/{app}")
            print(f"deployed {app}", flush=True)
        for kind in args.workloads:
            stream_ = workload(kind, args.requests, args.rate, seed=0, sizes=sizes, text=text)
            for name, (app, interval) in WAYS.items():  # warm-up: every size and step count once
                asyncio.run(stream(f"http://127.0.0.1:{port}/{app}", stream_[:4], interval))
            for r in range(args.rounds):
                for name, (app, interval) in WAYS.items():
                    result = asyncio.run(stream(f"http://127.0.0.1:{port}/{app}", stream_, interval))
                    results.setdefault((kind, name), []).append(result)
                    print(f"{kind} round {r}: {name}: {result['throughput']:.1f} req/s, p50 {result['p50']:.2f} s, "
                          f"p95 {result['p95']:.2f} s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = []
    for (kind, name), runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in ("throughput", "p50", "p95")}
        base = statistics.median(run["throughput"] for run in results[kind, "one at a time"])
        rows.append(dict(workload=kind, way=name, **med, vs_one_at_a_time=med["throughput"] / base, runs=runs))
    settings = {"ray": ray.__version__, "model": args.model, "requests": args.requests, "rate": args.rate,
                "rounds": args.rounds, "max_batch": args.max_batch, "sizes": sizes}
    lines = ["| workload | way | throughput (req/s) | vs one at a time | p50 latency (s) | p95 latency (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['way']} | {r['throughput']:.1f} | {r['vs_one_at_a_time']:.2f}x | "
              f"{r['p50']:.2f} | {r['p95']:.2f} |" for r in rows]
    write_report(Path(args.out) if args.out else OUT / ("serve_text" if text else "serve"), {"machine": machine(), **settings, "rows": rows}, lines)


if __name__ == "__main__":
    main()
