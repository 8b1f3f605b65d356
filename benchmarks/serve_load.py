"""Serving load: N concurrent clients against the Serve app on 127.0.0.1, with request batching on and off.

One replica serves a freshly built policy (random weights: every answer runs to ``max_tokens``, so every
request generates the same number of tokens). The default shape is ``small`` (~20M parameters): like a real
model, and unlike the 1.8M-parameter ``tiny`` one that fits in a CPU's cache, its decode step costs a pass
over the weights, which batching shares between requests. ``--shape tiny`` shows the other extreme, where the
per-request HTTP and Serve overhead of a 2-core machine outweighs decoding. For each mode
(``serve.max_batch_size`` 16, then 1: requests join the replica's running decode batch, or wait for the one
ahead of them) and each concurrency level, N client threads send a bounded number of non-streaming chat requests;
at 8 batched clients the same load runs again beside 2 hostile clients in their own processes (oversized bodies,
huge seeds, malformed JSON, streams dropped mid-answer), first at ``--hostile-rate`` requests/s each (the hostile-mix
row, goal: the well-formed clients keep at least 0.8x their calm tokens/s), then as fast as they can (the flood row:
on a 2-core machine that measures CPU starvation more than isolation); every hostile answer must be a 4xx. Reported per
row: requests/s, generated tokens/s, p50/p99 latency, and the time to first token of a streaming probe request sent
while the clients load the server. The summary line is batching's tokens/s ratio at 8 clients (goal: at least 2x).

    python benchmarks/serve_load.py [--shape small|tiny] [--clients 1 4 8 16] [--requests 4] [--max-tokens 32]
                                    [--hostile-rate 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from _world import bench_world, write_result

REPO = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "What is the capital of Peru?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_request(base: str, body: dict[str, Any]) -> urllib.request.Request:
    return urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({"model": "bench", **body}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )


def chat(base: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """One non-streaming request: (latency in s, completion tokens)."""
    req = chat_request(
        base, {"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return time.perf_counter() - start, int(out["usage"]["completion_tokens"])


def first_token(base: str, max_tokens: int) -> float:
    """Seconds until a streaming request's first content chunk."""
    req = chat_request(base, {"messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "seed": 1})
    start = time.perf_counter()
    ttft: float | None = None
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:  # read to the end: the request is part of the load
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content") and ttft is None:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the streaming probe got no content")
    return ttft


def hostile(base: str, rate: float, stop: Any, out: Any) -> None:
    """One hostile client, in its own process, until ``stop`` is set: a body over the limit, a seed past what generators
    take, malformed JSON, and a stream dropped after its first event, in turn, ``rate`` requests a second (0: as fast
    as it can). Puts each kind's HTTP statuses (0: the connection was dropped) on the ``out`` queue at the end."""
    import urllib.error

    huge = json.dumps({"messages": MESSAGES, "pad": "x" * (2 << 20)}).encode()
    kinds = {
        "oversized": huge,
        "huge_seed": json.dumps({"messages": MESSAGES, "seed": 2**64, "max_tokens": 8}).encode(),
        "malformed": b'{"messages": [{"role": "user", "content": "hi"',
    }
    codes: dict[str, list[int]] = {}
    start = time.perf_counter()
    sent = 0

    def pace() -> bool:
        nonlocal sent
        sent += 1
        if rate > 0:
            time.sleep(max(0.0, start + sent / rate - time.perf_counter()))
        return not stop.is_set()

    while True:
        for kind, data in kinds.items():
            req = urllib.request.Request(
                f"{base}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except OSError:  # the server may close on an oversized body before reading it all
                code = 0
            codes.setdefault(kind, []).append(code)
            if not pace():
                out.put(codes)
                return
        req = chat_request(base, {"messages": MESSAGES, "max_tokens": 64, "stream": True, "seed": 3})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.readline()  # the first event, then hang up mid-answer
        codes.setdefault("dropped_stream", []).append(0)
        if not pace():
            out.put(codes)
            return


def beside_hostile(
    base: str, clients: int, requests: int, max_tokens: int, rate: float, calm: float
) -> dict[str, Any]:
    """The well-formed load again, beside 2 hostile clients in their own processes (so that they share no
    interpreter lock with the well-formed clients): the well-formed tokens/s against the calm run's."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    bad = [ctx.Process(target=hostile, args=(base, rate, stop, out), daemon=True) for _ in range(2)]
    for p in bad:
        p.start()
    time.sleep(2.0)  # the hostile clients are up and sending before the measured load starts
    try:
        mixed = load(base, clients, requests, max_tokens)
    finally:
        stop.set()
    codes: dict[str, list[int]] = {}
    for _ in bad:
        for k, v in out.get(timeout=120).items():
            codes.setdefault(k, []).extend(v)
    for p in bad:
        p.join()
    expected = {"oversized": {413, 0}, "huge_seed": {400}, "malformed": {400}, "dropped_stream": {0}}
    wrong = {k: sorted(set(v) - expected[k]) for k, v in codes.items() if set(v) - expected[k]}
    if wrong:
        raise RuntimeError(f"hostile requests got answers other than their 4xx: {wrong}")
    return mixed | {
        "hostile_clients": 2,
        "hostile_rate_per_s": rate,
        "hostile_codes": {k: sorted(set(v)) for k, v in codes.items()},
        "hostile_requests": sum(len(v) for v in codes.values()),
        "tokens_per_s_vs_calm": mixed["tokens_per_s"] / calm,
    }


def load(base: str, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        nonlocal tokens
        for k in range(requests):
            try:
                seconds, n = chat(base, max_tokens, seed=c * 1000 + k)
            except BaseException as exc:  # reported below: a benchmark with failed requests is not a result
                errors.append(exc)
                return
            with lock:
                latencies.append(seconds)
                tokens += n

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(0.05)
    ttft = first_token(base, max_tokens)  # a streaming probe while the clients load the server
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at {clients} clients: {errors[0]!r}")
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "ttft_s": ttft,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--shape", default="small", choices=["tiny", "small"], help="paddock.models shape")
    ap.add_argument("--batch-wait", type=float, default=0.02, help="serve.batch_wait_timeout_s")
    ap.add_argument(
        "--hostile-rate",
        type=float,
        default=4.0,
        help="requests/s of each of the 2 hostile clients in the hostile-mix row (the flood row sends as fast as it can)",
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    home, _, tok_dir, _ = bench_world("paddock-bench-serve-", pretrain_mb=0.1, rl_prompts=20, vocab_size=1000)
    from paddock.cluster import connect
    from paddock.models import build_causal_lm
    from paddock.serving.app import build_app
    from paddock.tokenizer import load_tokenizer
    from ray import serve

    tok = load_tokenizer(tok_dir)
    policy = home / "models" / "bench"
    build_causal_lm(args.shape, vocab_size=len(tok), max_seq_len=256, seed=0).save_pretrained(policy)
    tok.save_pretrained(policy)
    connect()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"

    rows = []
    for mode, batch in (("batched", 16), ("unbatched", 1)):
        app = build_app(
            {
                "model": {"name": "bench", "version": "1", "path": str(policy)},
                "serve": {
                    "port": port,
                    "max_batch_size": batch,
                    "batch_wait_timeout_s": args.batch_wait,
                    "default_max_tokens": args.max_tokens,
                    "min_replicas": 1,
                    "max_replicas": 1,
                    "max_ongoing_requests": 64,
                },
            }
        )
        serve.run(app, name="bench", route_prefix="/", blocking=False)
        chat(base, args.max_tokens, seed=0)  # warm the replica
        for clients in args.clients:
            row = {"mode": mode, "max_batch_size": batch} | load(
                base, clients, args.requests, args.max_tokens
            )
            rows.append(row)
            print(
                f"{mode:<10} {clients:>3} clients: {row['requests_per_s']:6.2f} req/s {row['tokens_per_s']:8.1f} tok/s "
                f"p50 {row['latency_p50_s']:.2f}s p99 {row['latency_p99_s']:.2f}s ttft {row['ttft_s']:.2f}s",
                flush=True,
            )
            if mode == "batched" and clients == 8:
                # The same 8 well-formed clients beside 2 hostile ones: at a request rate, then flooding.
                for label, rate in (("batched+hostile", args.hostile_rate), ("batched+flood", 0.0)):
                    mixed = beside_hostile(
                        base, clients, args.requests, args.max_tokens, rate, row["tokens_per_s"]
                    )
                    rows.append({"mode": label, "max_batch_size": batch} | mixed)
                    pace = f"{rate:g} requests/s each" if rate else "as fast as they can"
                    print(
                        f"{label} (2 hostile clients, {pace}) at 8 clients: {mixed['tokens_per_s']:.1f} tok/s, "
                        f"{mixed['tokens_per_s_vs_calm']:.2f}x the calm run; "
                        f"{mixed['hostile_requests']} hostile requests answered {mixed['hostile_codes']}",
                        flush=True,
                    )
        serve.delete("bench")
    serve.shutdown()

    by = {(r["mode"], r["clients"]): r for r in rows}
    for r in rows:
        off = by.get(("unbatched", r["clients"]))
        r["tokens_per_s_vs_unbatched"] = r["tokens_per_s"] / off["tokens_per_s"] if off else float("nan")
    meta = {
        "model": f"{args.shape} (random weights)",
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests,
        "replicas": 1,
    }
    write_result(args.out, "serve_load", meta, rows)
    print(
        f"\nServing load ({args.shape} model, {args.max_tokens} tokens per answer, 1 replica, {os.cpu_count()} CPUs)"
    )
    print(
        f"{'mode':<10} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 s':>6} {'p99 s':>6} {'ttft s':>7} {'vs off':>7}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['clients']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
            f"{r['latency_p50_s']:>6.2f} {r['latency_p99_s']:>6.2f} {r['ttft_s']:>7.2f} "
            f"{r['tokens_per_s_vs_unbatched']:>7.2f}"
        )
    for label in ("batched+hostile", "batched+flood"):
        mixed = by.get((label, 8))
        if mixed:
            rate = mixed["hostile_rate_per_s"]
            print(
                f"{label}: the 8 well-formed clients keep {mixed['tokens_per_s_vs_calm']:.2f}x their calm tokens/s "
                f"beside 2 hostile clients at {f'{rate:g} requests/s each' if rate else 'full speed'}"
                f"{' (goal >= 0.8)' if rate else ''}; hostile requests answered {mixed['hostile_codes']}"
            )
    at8 = by.get(("batched", 8))
    if at8:
        print(
            f"\nbatching at 8 clients: {at8['tokens_per_s_vs_unbatched']:.2f}x the tokens/s of unbatched (goal >= 2x)"
        )


if __name__ == "__main__":
    main()
