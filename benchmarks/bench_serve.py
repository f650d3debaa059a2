"""`encdec serve` under concurrent clients: requests per second with and without dynamic batching.

Starts the server in this process (the bundled model by default, or --engine-dir), then N client
threads each send R requests of one input (number-spelling prompts, greedy) as fast as answers
come back; reports requests/s, mean and p90 latency, and the server's batch count, for each
--max-batch-delay-ms. Delay 0 still batches what is already queued; "sequential" sends the same
requests from one client, one at a time.

    python benchmarks/bench_serve.py [--engine-dir E] [--device cpu] [--clients 16] [--requests 4]
                                     [--delays "0;5;20"] [--max-new-tokens 32]
                                     [--num-beams 1] [--cuda-graph [--warmup]]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        k = (i * 7919) % 100000
        out.append(f"spell: {k}" if i % 2 == 0 else f"digits: {_spell(k % 1000)}")
    return out


def _spell(n: int) -> str:
    ones = "zero one two three four five six seven eight nine".split()
    if n < 10:
        return ones[n]
    return " ".join(ones[int(c)] for c in str(n))  # not the model's wording, still a valid prompt


def run(engine, delays, clients: int, per_client: int, max_new: int, runner=None, num_beams: int = 1) -> list[dict]:
    from encdec_core.serve import Server

    prompts = _prompts(clients * per_client)
    rows = []
    for delay in ["sequential", *delays]:
        srv = Server(engine, "127.0.0.1", 0, runner=runner,
                     max_delay=(0.0 if delay == "sequential" else delay / 1000.0)).start()
        host, port = srv.address
        url = f"http://{host}:{port}/v1/generate"
        params = {"max_new_tokens": max_new, "num_beams": num_beams}
        _post(url, {"inputs": prompts[0], "parameters": params})  # warm-up
        lat: list[float] = []
        lock = threading.Lock()

        def client(c, n_clients):
            for r in range(per_client * (clients if n_clients == 1 else 1)):
                i = c * per_client + r
                t0 = time.perf_counter()
                _post(url, {"inputs": prompts[i % len(prompts)], "parameters": params})
                with lock:
                    lat.append(time.perf_counter() - t0)

        n_clients = 1 if delay == "sequential" else clients
        b0 = srv.scheduler.batches
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c, n_clients)) for c in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        batches = srv.scheduler.batches - b0
        srv.close()
        lat.sort()
        rows.append({"delay_ms": delay, "clients": n_clients, "requests": len(lat), "wall_s": round(wall, 3),
                     "req_per_s": round(len(lat) / wall, 2), "mean_ms": round(1000 * statistics.mean(lat), 1),
                     "p90_ms": round(1000 * lat[int(0.9 * (len(lat) - 1))], 1), "batches": batches})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", default=None, help="default: the bundled model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--delays", default="0;5;20", help='";"-separated --max-batch-delay-ms values')
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-beams", type=int, default=1, help="beam search per request, made the engine's "
                    "default too (so --warmup captures the beam graphs, one per bucket of rows)")
    ap.add_argument("--cuda-graph", action="store_true", help="serve through the CUDA-graph runner (sized by "
                    "the engine's build limits), as encdec serve --cuda-graph does")
    ap.add_argument("--warmup", action="store_true", help="with --cuda-graph: capture the graphs first, as encdec "
                    "serve does by default (serve.warm_up; the time is printed)")
    ap.add_argument("--warmup-batch-sizes", default=None)
    ap.add_argument("--warmup-input-lens", default=None)
    args = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import ensure_families

    ensure_families()  # run from the tree (PYTHONPATH) the entry points are missing
    from encdec_core.cli import default_engine
    from encdec_core.engine import Engine

    eng = Path(args.engine_dir) if args.engine_dir else default_engine()
    engine = Engine.load(eng, device=args.device)
    if args.num_beams > 1:
        # as a translation model's generation_config.json would: the defaults decode with these beams,
        # so --warmup captures their beam graphs (serve.warm_up warms the default options only)
        engine.meta["generation_config"] = {**engine.generation_defaults, "num_beams": args.num_beams,
                                            "max_new_tokens": args.max_new_tokens}
    runner = None
    if args.cuda_graph:
        from encdec_core.runtime.cuda.runner import CudaGraphRunner

        runner = CudaGraphRunner.for_engine(engine)
        if args.warmup:
            from encdec_core.benchmark import parse_batch_sizes
            from encdec_core.serve import warm_up

            lists = [None if v is None else parse_batch_sizes(v) for v in (args.warmup_batch_sizes,
                                                                           args.warmup_input_lens)]
            secs = warm_up(runner, engine.limits, *lists, log=lambda m: print(f"# {m}", flush=True),
                           engine=engine)
            print(json.dumps({"warmup_s": round(secs, 2)}), flush=True)
    print(f"# {eng} on {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"runner {type(runner).__name__ if runner is not None else 'eager'}", flush=True)
    delays = [float(x) for x in args.delays.split(";") if x.strip()]
    run(engine, delays, args.clients, args.requests, args.max_new_tokens, runner, args.num_beams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
