"""Batched test-time scaling against a plain llama-cpp-python loop, side by side (issue 5).

For Ind-1, Ind-4, Ind-8, Ind-16, Ind-8/Pro-4 and Ind-16/Pro-8 on the same HH pairs:
  batched  one `Engine.generate` call per pair holding every sample: Ind-m is m seeds on
           the user's prompt, Pro-n one sample on each of n prompts built with another
           (pseudo-)user's history in place of the user's;
  loop     `llama_cpp.Llama.create_completion`, one call per sample, the same prompts in the
           same order, so llama-cpp-python's implicit prefix reuse evaluates a repeated
           prompt once.
Both sides get the same prompt tokens, output grammar, max_tokens, temperature 1.0 (no
top-k/top-p/min-p) and threads. Each (repeat, configuration, engine) runs in a fresh child
process, which reports its own peak RSS; wall times are medians over the repeats.
Neighbours are other pseudo-users of the HH file (`load_hh(users_per_objective=...)`), so
the benchmark does not depend on a prototype index. Every sample uses one candidate
order; the real Scorer splits its samples over both orders (see benchmarks/latency.py).

    python benchmarks/scaling.py                       # default bundle's SmolLM2, minutes
    python benchmarks/scaling.py --gguf FILE --pairs 1 --repeats 1
    python benchmarks/scaling.py --tiny TINY.gguf      # seconds: what the test runs

On a busy machine (load above the core count) llama.cpp's spinning OpenMP threads slow both
sides down many times over; `--omp-wait-policy passive` avoids that but adds a fixed cost per
decode step when the machine is idle, which flatters batching. Quote the load with the numbers.

Writes benchmarks/out/scaling.json and scaling.png (or --out-dir).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _common import (CONFIGS, DEFAULT_DATA, OUT_DIR, QUICK_CONFIGS, add_omp_option, apply_omp_policy,
                     decode_step_ms, fmt, in_child, int_pair, load_line, machine, median, new_figure, peak_rss_mb,
                     resolve_bundle, save_figure, table, write_json)

# "split": the batched engine with a KV stream per sequence instead of one shared pool
ENGINES = ("batched", "split", "loop")
# (target, configuration, "ratio" to batched Ind-1 or "speedup" over the loop, limit)
TARGETS = [("batched Ind-8 <= 3.0x batched Ind-1", "Ind-8", "ratio", 3.0),
           ("batched Ind-16/Pro-8 <= 7x batched Ind-1", "Ind-16/Pro-8", "ratio", 7.0),
           ("batched Ind-8 >= 1.35x faster than the loop", "Ind-8", "speedup", 1.35)]
TINY = dict(max_tokens=400, analysis_chars=(10, 120), max_criteria=2, max_field_chars=200, history_pairs=1,
            threads=1)  # a model this small gains nothing from a second thread
FIT_STEPS = (None, 2000, 1000, 500, 250)  # shorten texts until a prompt fits the model's window


# -- workload (parent) --------------------------------------------------------------------------

def model_path(args) -> Path:
    if args.gguf is not None:
        return args.gguf
    from pgenrm_lite.bundle import Bundle

    return Bundle.open(resolve_bundle(args.bundle), verify="size").llm_path


def render(user, row, seed: int, args, budget: int, engine) -> tuple[int, ...]:
    """Prompt tokens for judging `row` with `user`'s history (a seeded selection), fitted to `budget`."""
    from pgenrm_lite import protocol

    shown = protocol.select_history(user.history, args.history_pairs,
                                    protocol.derive_seed(seed, "history", user.user_id))
    for max_chars in ((args.max_field_chars,) + FIT_STEPS[1:]):
        msgs = protocol.render_messages(user, row.prompt, row.chosen, row.rejected, history=shown,
                                        max_field_chars=max_chars)
        tokens = engine.chat_tokens(msgs)
        if len(tokens) <= budget:
            return tokens
    raise SystemExit(f"a prompt for {user.user_id} takes {len(tokens)} tokens even shortened; "
                     f"the budget is {budget}: lower --history-pairs or --max-tokens")


def build_pairs(args, configs, engine) -> list[dict]:
    """Per pair: the user's prompt tokens, the neighbours' prompt tokens and every sample's seed."""
    from pgenrm_lite import protocol
    from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows
    from pgenrm_lite.evaluation import interleave_by_user

    max_m = max(m for _, m, _ in configs)
    max_n = max(n for _, _, n in configs)
    rows = load_hh(args.data, users_per_objective=args.pseudo_users, seed=args.seed)
    users = users_from_rows(rows)
    tests = interleave_by_user(rows_of_split(rows))[: args.pairs]
    # The model's trained window; at least 4096 so tiny test models (512) still take real prompts.
    budget = max(engine.n_ctx_train, 4096) - args.max_tokens
    pairs = []
    for i, row in enumerate(tests):
        others = sorted(uid for uid in users if uid != row.user_id)
        if len(others) < max_n:
            raise SystemExit(f"Pro-{max_n} needs {max_n} other pseudo-users; raise --pseudo-users")
        others = others[i % len(others):] + others[: i % len(others)]  # vary neighbours across pairs
        seed = protocol.derive_seed(args.seed, "pair", i)
        pairs.append({
            "user_id": row.user_id,
            "self": render(users[row.user_id], row, seed, args, budget, engine),
            "neighbors": [render(users[uid], row, seed, args, budget, engine) for uid in others[:max_n]],
            "self_seeds": [protocol.derive_seed(seed, "self", k) for k in range(max_m)],
            "neighbor_seeds": [protocol.derive_seed(seed, "neighbor", w) for w in range(max_n)],
        })
    return pairs


def calls_of(pair: dict, m: int, n: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """(prompt tokens, seeds) in running order: the user's m samples, then one per neighbour."""
    calls = [(pair["self"], pair["self_seeds"][:m])]
    calls += [(pair["neighbors"][w], [pair["neighbor_seeds"][w]]) for w in range(n)]
    return calls


def round_up(n: int, step: int = 256) -> int:
    return (n + step - 1) // step * step


# -- children -----------------------------------------------------------------------------------

def _parsed(text: str) -> bool:
    from pgenrm_lite import protocol
    from pgenrm_lite.errors import ChainParseError

    try:
        protocol.parse_chain(text)
        return True
    except ChainParseError:
        return False


def run_batched(model: str, pairs: list[dict], m: int, n: int, job: dict) -> dict:
    """One Engine.generate call per pair with all of its samples."""
    from pgenrm_lite.engine import Engine, Request, SamplingParams

    t0 = time.perf_counter()
    split = job.get("kv") == "split"
    n_seq = max(1, m + n)
    # Split KV: every sequence gets its own stream holding the longest prompt plus its chain.
    engine = Engine(model, n_ctx=n_seq * job["loop_n_ctx"] if split else job["n_ctx"], n_threads=job["threads"],
                    device="cpu", n_seq_max=n_seq, kv_unified=not split)
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=1.0, grammar=job["grammar"])
    engine.generate([Request(pairs[0]["self"][:8], (0,))], SamplingParams(max_tokens=1))  # warm-up
    out = {"per_pair_s": [], "tokens": 0, "samples": 0, "parsed": 0, "hit_max_tokens": 0, "prompt_s": 0.0,
           "decode_s": 0.0, "n_prompt_tokens": 0, "n_groups": 0, "load_s": load_s}
    for pair in pairs:
        requests = [Request(tuple(tokens), tuple(seeds)) for tokens, seeds in calls_of(pair, m, n)]
        start = time.perf_counter()
        completions, stats = engine.generate(requests, params)
        out["per_pair_s"].append(time.perf_counter() - start)
        for c in (c for row in completions for c in row):
            out["samples"] += 1
            out["parsed"] += _parsed(c.text)
            out["hit_max_tokens"] += c.finish_reason == "length"
        out["tokens"] += stats.n_generated_tokens
        out["prompt_s"] += stats.prompt_s
        out["decode_s"] += stats.decode_s
        out["n_prompt_tokens"] += stats.n_prompt_tokens
        out["n_groups"] += stats.n_groups
    engine.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


class _FirstToken:
    """A stopping criterion that only notes when the first token arrived (prompt time + 1 sample)."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, logits) -> bool:
        if self.at is None:
            self.at = time.perf_counter()
        return False


def run_loop(model: str, pairs: list[dict], m: int, n: int, job: dict) -> dict:
    """One high-level create_completion call per sample, in the batched side's order."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=job["loop_n_ctx"], n_threads=job["threads"],
                          n_threads_batch=job["threads"], flash_attn=True, verbose=False)
    load_s = time.perf_counter() - t0
    grammar = llama_cpp.LlamaGrammar.from_string(job["grammar"], verbose=False)
    llm.create_completion(list(pairs[0]["self"][:8]), max_tokens=1)  # warm-up
    llm.reset()
    out = {"per_pair_s": [], "tokens": 0, "samples": 0, "parsed": 0, "hit_max_tokens": 0, "prompt_s": 0.0,
           "decode_s": 0.0, "load_s": load_s}
    for pair in pairs:
        start = time.perf_counter()
        for tokens, seeds in calls_of(pair, m, n):
            for seed in seeds:
                first = _FirstToken()
                call_start = time.perf_counter()
                res = llm.create_completion(
                    list(tokens), max_tokens=job["max_tokens"], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                    repeat_penalty=1.0, seed=seed, grammar=grammar,
                    stopping_criteria=llama_cpp.StoppingCriteriaList([first]))
                call_end = time.perf_counter()
                first_at = first.at or call_end
                out["prompt_s"] += first_at - call_start
                out["decode_s"] += call_end - first_at
                choice = res["choices"][0]
                out["samples"] += 1
                out["tokens"] += res["usage"]["completion_tokens"]
                out["parsed"] += _parsed(choice["text"])
                out["hit_max_tokens"] += choice["finish_reason"] == "length"
        out["per_pair_s"].append(time.perf_counter() - start)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def step_anatomy(model: str, prompt: list[int], job: dict, ns: tuple[int, ...] = (1, 8, 16, 24),
                 steps: int = 24) -> list[dict]:
    """Milliseconds per decode step with n sequences over the real prompt's KV and over a short one.

    The gap is the cost of attending over the prompt, which each sequence pays on its own:
    the weights are read once per step for all sequences, the attention is not shared.
    """
    from pgenrm_lite.engine import Engine

    n_ctx = round_up(max(ns) * (len(prompt) + steps + 8))
    out = [{"sequences": n} for n in ns]
    with Engine(model, n_ctx=n_ctx, n_threads=job["threads"], device="cpu", n_seq_max=max(ns)) as engine:
        for label, tokens in (("prompt", prompt), ("short", prompt[:32])):
            engine.context.clear()
            engine.context.eval_span(0, tuple(tokens))
            for row in out:
                row[f"{label}_ms"] = decode_step_ms(engine, len(tokens), tokens[-1], row["sequences"], steps)
    return out


# -- summary ------------------------------------------------------------------------------------

def summarise(name: str, m: int, n: int, engine: str, runs: list[dict]) -> dict:
    walls = [sum(r["per_pair_s"]) for r in runs]
    wall = median(walls)
    first = runs[0]
    decode = median([r["decode_s"] for r in runs])
    return {
        "config": name, "m": m, "n": n, "engine": engine, "samples_per_pair": m + n,
        "wall_s": wall, "wall_s_min": min(walls), "wall_s_runs": walls, "load_1m_runs": [r["load_1m"] for r in runs],
        "per_pair_s": wall / len(first["per_pair_s"]),
        "tokens": first["tokens"], "tokens_same_every_run": len({r["tokens"] for r in runs}) == 1,
        "tok_s": first["tokens"] / wall if wall else None,
        "prompt_s": median([r["prompt_s"] for r in runs]), "decode_s": decode,
        "decode_tok_s": first["tokens"] / decode if decode else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "load_s": median([r["load_s"] for r in runs]),
        "samples": first["samples"], "parsed": first["parsed"], "hit_max_tokens": first["hit_max_tokens"],
        "n_groups": first.get("n_groups"), "n_prompt_tokens": first.get("n_prompt_tokens"),
    }


def add_ratios(rows: list[dict]) -> None:
    by = {(r["config"], r["engine"]): r for r in rows}
    for r in rows:
        base = by.get(("Ind-1", r["engine"]))
        r["ratio_to_ind1"] = r["wall_s"] / base["wall_s"] if base else None
        r["ratio_to_ind1_min"] = r["wall_s_min"] / base["wall_s_min"] if base else None
        r["tokens_ratio_to_ind1"] = r["tokens"] / base["tokens"] if base and base["tokens"] else None
        loop = by.get((r["config"], "loop"))
        batched = r["engine"] != "loop" and loop
        r["speedup_vs_loop"] = loop["wall_s"] / r["wall_s"] if batched else None
        r["speedup_vs_loop_min"] = loop["wall_s_min"] / r["wall_s_min"] if batched else None


def check_targets(rows: list[dict]) -> list[dict]:
    by = {(r["config"], r["engine"]): r for r in rows}
    out = []
    for text, config, kind, limit in TARGETS:
        row = by.get((config, "batched"))
        if row is None:
            out.append({"target": text, "value": None, "limit": limit, "met": None, "value_min": None,
                        "met_min": None})
            continue
        key = "ratio_to_ind1" if kind == "ratio" else "speedup_vs_loop"

        def met(value):
            if value is None:
                return None  # e.g. the loop was not run
            return bool(value <= limit if kind == "ratio" else value >= limit)
        out.append({"target": text, "value": row[key], "limit": limit, "met": met(row[key]),
                    "value_min": row[key + "_min"], "met_min": met(row[key + "_min"])})
    return out


def print_report(rows: list[dict], targets: list[dict], best: dict, settings: dict) -> None:
    print(f"\n{settings['model_name']}, {settings['threads']} thread(s) (OMP_WAIT_POLICY="
          f"{settings['omp_wait_policy'] or 'unset'}), max_tokens {settings['max_tokens']}, "
          f"{settings['pairs']} pair(s), median of {settings['repeats']}; mean prompt "
          f"{settings['mean_prompt_tokens']:.0f} tokens; {load_line()}")
    print(table(
        ["config", "engine", "wall s", "min s", "tokens", "tok/s", "peak RSS MB", "x Ind-1", "tokens x", "vs loop",
         "parsed"],
        [[r["config"], r["engine"], fmt(r["wall_s"]), fmt(r["wall_s_min"]), r["tokens"], fmt(r["tok_s"], 1),
          fmt(r["peak_rss_mb"], 0), fmt(r["ratio_to_ind1"]), fmt(r["tokens_ratio_to_ind1"]),
          fmt(r["speedup_vs_loop"], 2, "x") if r["speedup_vs_loop"] else "", f"{r['parsed']}/{r['samples']}"]
         for r in rows]))
    print("wall s: median of the repeats; min s: the best repeat (least disturbed by other load); x Ind-1 and "
          "vs loop use the medians; tokens x: generated tokens relative to Ind-1 (chains end on their own)")
    print("\nprompt and decode time (prompt includes the first sampled token; loop: time to first token)")
    print(table(["config", "engine", "prompt s", "decode s", "decode tok/s", "groups"],
                [[r["config"], r["engine"], fmt(r["prompt_s"]), fmt(r["decode_s"]), fmt(r["decode_tok_s"], 1),
                  r["n_groups"] if r["n_groups"] is not None else ""] for r in rows]))
    print(f"\ncompute-bound rate for this model here (best aggregate tok/s reached): {best['tok_s']:.1f} tok/s "
          f"({best['tok_s_at']}); best decode-only {best['decode_tok_s']:.1f} tok/s ({best['decode_tok_s_at']})")
    anatomy = settings.get("step_anatomy")
    if anatomy:
        base = anatomy[0]
        print(f"\ndecode step anatomy (median ms per step; KV holding the {settings['mean_prompt_tokens']:.0f}-token "
              "prompt vs a 32-token one, unified KV; the difference is attention over the prompt, paid per sequence)")
        print(table(["sequences", "ms/step, prompt", "ms/step, short", "attention ms/step", "x 1 sequence"],
                    [[a["sequences"], fmt(a["prompt_ms"], 1), fmt(a["short_ms"], 1),
                      fmt(a["prompt_ms"] - a["short_ms"], 1), fmt(a["prompt_ms"] / base["prompt_ms"], 2)]
                     for a in anatomy]))
    for t in targets:
        state = "n/a (not run)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        extra = "" if t["met"] is None else f" (on the best repeats: {fmt(t['value_min'])}, " \
            f"{'met' if t['met_min'] else 'NOT met'})"
        print(f"target: {t['target']}: {fmt(t['value'])} -> {state}{extra}")


def plot(rows: list[dict], best: dict, path: Path) -> None:
    configs = list(dict.fromkeys(r["config"] for r in rows))
    by = {(r["config"], r["engine"]): r for r in rows}
    fig, (ax_wall, ax_rate) = new_figure(2)
    x = range(len(configs))
    present = [e for e in ENGINES if (configs[0], e) in by]
    width = 0.8 / len(present)
    for k, engine in enumerate(present):
        xs = [i + (k - (len(present) - 1) / 2) * width for i in x]
        walls = [by[(c, engine)]["wall_s"] for c in configs]
        rates = [by[(c, engine)]["tok_s"] for c in configs]
        bars = ax_wall.bar(xs, walls, width=width, label=engine)
        for bar, c in zip(bars, configs):
            ax_wall.annotate(f"{by[(c, engine)]['ratio_to_ind1']:.1f}x", (bar.get_x() + bar.get_width() / 2,
                             bar.get_height()), ha="center", va="bottom", fontsize=7)
        ax_rate.bar(xs, rates, width=width, label=engine)
    ax_rate.axhline(best["tok_s"], color="grey", linestyle="--", linewidth=1, label="best reached")
    for ax, title in ((ax_wall, "wall time (s), label: ratio to Ind-1"), (ax_rate, "aggregate tok/s")):
        ax.set_xticks(list(x), configs, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--gguf", type=Path, default=None, help="a GGUF file instead of a bundle")
    p.add_argument("--tiny", type=Path, default=None, metavar="GGUF",
                   help="a tiny test GGUF: implies --quick and settings that fit its ~1 char/token vocabulary")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the two-user HH file")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--analysis-chars", type=int_pair, default=(20, 600), help="MIN,MAX (default 20,600)")
    p.add_argument("--max-criteria", type=int, default=4)
    p.add_argument("--history-pairs", type=int, default=3)
    p.add_argument("--max-field-chars", type=int, default=None, help="shorten every text field to this")
    p.add_argument("--pseudo-users", type=int, default=8, help="HH pseudo-users per objective (neighbours)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=None, help="comma-separated subset, e.g. Ind-1,Ind-8 (default: all)")
    p.add_argument("--quick", action="store_true", help="Ind-1, Ind-2, Ind-2/Pro-1 on 1 pair, 1 repeat")
    p.add_argument("--engines", default="batched,loop",
                   help="comma-separated: batched (one shared KV pool), split (the batched engine with a KV "
                        "stream per sequence), loop (llama-cpp-python calls); default batched,loop")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    add_omp_option(p)
    args = p.parse_args(argv)
    if args.tiny is not None:
        args.gguf, args.quick = args.tiny, True
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.quick:
        args.pairs, args.repeats = 1, 1
    return args


def select_configs(configs: list, names: str | None) -> list:
    if names is None:
        return configs
    wanted = names.split(",")
    unknown = set(wanted) - {name for name, _, _ in configs}
    if unknown:
        raise SystemExit(f"unknown configuration(s) {sorted(unknown)}; known: {[c[0] for c in configs]}")
    return [c for c in configs if c[0] in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omp_policy = apply_omp_policy(args.omp_wait_policy)
    from pgenrm_lite import contracts
    from pgenrm_lite.engine import Engine, Request

    configs = select_configs(QUICK_CONFIGS if args.quick else CONFIGS, args.configs)
    at_start = machine()
    model = str(model_path(args))
    grammar = contracts.structured_grammar(tuple(args.analysis_chars), args.max_criteria)
    with Engine(model, n_ctx=64, n_seq_max=1, device="cpu") as tokenizer:
        pairs = build_pairs(args, configs, tokenizer)
        needed = {name: max(tokenizer.tokens_needed([Request(tuple(t), tuple(s)) for t, s in calls_of(p, m, n)],
                                                    args.max_tokens) for p in pairs)
                  for name, m, n in configs}
    longest = max(len(t) for p in pairs for t in [p["self"], *p["neighbors"]])
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engine(s) {sorted(unknown)}; known: {list(ENGINES)}")
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    base_job = {"threads": args.threads, "max_tokens": args.max_tokens, "grammar": grammar,
                "loop_n_ctx": round_up(longest + args.max_tokens)}
    runs: dict[tuple[str, str], list[dict]] = {}
    # Repeats outermost, so drifting load on a shared machine spreads over every configuration.
    for rep in range(args.repeats):
        for name, m, n in configs:
            job = {**base_job, "n_ctx": round_up(needed[name])}
            for engine in engines:
                fn = run_loop if engine == "loop" else run_batched
                result = in_child(fn, model, pairs, m, n, {**job, "kv": "split" if engine == "split" else "unified"})
                result["load_1m"] = os.getloadavg()[0]
                runs.setdefault((name, engine), []).append(result)
                # Raw results so far, so an interrupted run on a shared machine still leaves its data.
                write_json(args.out_dir / "scaling.partial.json",
                           {"runs": [{"config": c, "engine": e, "runs": r} for (c, e), r in runs.items()]}, quiet=True)
                print(f"[{rep + 1}/{args.repeats}] {name:13} {engine:7} {sum(result['per_pair_s']):7.2f} s  "
                      f"{result['tokens']:6d} tokens  load {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
    anatomy = in_child(step_anatomy, model, list(pairs[0]["self"]), base_job,
                       (1, 2) if args.quick else (1, 8, 16, 24), 8 if args.quick else 24)
    rows = [summarise(name, m, n, engine, runs[(name, engine)]) for name, m, n in configs for engine in engines]
    add_ratios(rows)
    targets = check_targets(rows)
    top = max(rows, key=lambda r: r["tok_s"] or 0)
    top_dec = max(rows, key=lambda r: r["decode_tok_s"] or 0)
    best = {"tok_s": top["tok_s"], "tok_s_at": f"{top['config']} {top['engine']}",
            "decode_tok_s": top_dec["decode_tok_s"], "decode_tok_s_at": f"{top_dec['config']} {top_dec['engine']}"}
    settings = {"model": model, "model_name": Path(model).name, "data": str(args.data), "pairs": len(pairs),
                "repeats": args.repeats, "max_tokens": args.max_tokens, "analysis_chars": list(args.analysis_chars),
                "max_criteria": args.max_criteria, "history_pairs": args.history_pairs,
                "max_field_chars": args.max_field_chars, "pseudo_users_per_objective": args.pseudo_users,
                "threads": args.threads, "omp_wait_policy": omp_policy, "temperature": 1.0, "seed": args.seed,
                "engines": engines,
                "quick": args.quick,
                "mean_prompt_tokens": sum(len(p["self"]) for p in pairs) / len(pairs),
                "pair_users": [p["user_id"] for p in pairs],
                "n_ctx_batched": {name: round_up(v) for name, v in needed.items()},
                "n_ctx_loop": base_job["loop_n_ctx"], "step_anatomy": anatomy}
    print_report(rows, targets, best, settings)
    write_json(args.out_dir / "scaling.json", {
        "benchmark": "scaling", "machine": {**at_start, "load_average_end": machine()["load_average"]},
        "settings": settings, "results": rows, "compute_bound": best, "targets": targets})
    plot(rows, best, args.out_dir / "scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
