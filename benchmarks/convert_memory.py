"""Peak memory of `python -m export gguf` against the checkpoint's size.

Builds a random Llama checkpoint (bf16 safetensors, sharded into several files, a trained
byte-level BPE tokenizer) in a temporary folder, converts it to f16 in a child process and
has that child report its peak resident set size (VmHWM). The target is
peak RSS <= 1.5 x checkpoint size: the converter streams tensor by tensor, so its peak
should be the interpreter plus about one tensor, however big the checkpoint.

    python benchmarks/convert_memory.py            # ~300M parameters, about 0.6 GB of bf16
    python benchmarks/convert_memory.py --tiny     # seconds; what the test suite runs

Writes the result to benchmarks/out/convert_memory.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.5

# (hidden, layers, ffn, heads, kv heads, vocab): ~292M parameters, untied head
FULL = dict(hidden=1024, layers=20, ffn=2816, heads=16, kv_heads=4, vocab=32000)
TINY = dict(hidden=64, layers=2, ffn=128, heads=4, kv_heads=2, vocab=1024)


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    head_dim = c["hidden"] // c["heads"]
    kv = c["kv_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (c["vocab"], c["hidden"])}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c["hidden"],),
            p + "self_attn.q_proj.weight": (c["hidden"], c["hidden"]),
            p + "self_attn.k_proj.weight": (kv, c["hidden"]),
            p + "self_attn.v_proj.weight": (kv, c["hidden"]),
            p + "self_attn.o_proj.weight": (c["hidden"], c["hidden"]),
            p + "post_attention_layernorm.weight": (c["hidden"],),
            p + "mlp.gate_proj.weight": (c["ffn"], c["hidden"]),
            p + "mlp.up_proj.weight": (c["ffn"], c["hidden"]),
            p + "mlp.down_proj.weight": (c["hidden"], c["ffn"]),
        })
    shapes["model.norm.weight"] = (c["hidden"],)
    shapes["lm_head.weight"] = (c["vocab"], c["hidden"])
    return shapes


def write_checkpoint(out_dir: Path, c: dict, n_shards: int = 3, seed: int = 0) -> int:
    """Random bf16 weights in `n_shards` safetensors files plus an index; returns bytes written."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(c)
    total = sum(2 * _numel(s) for s in shapes.values())
    budget = total / n_shards
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size >= budget and len(names) < n_shards:
            names.append([])
            _flush(out_dir, shard, len(names) - 1)
            shard, size = {}, 0
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        t = (1.0 + 0.1 * t) if len(shape) == 1 else 0.02 * t
        shard[name] = t.to(torch.bfloat16)
        names[-1].append(name)
        size += 2 * _numel(shape)
    _flush(out_dir, shard, len(names))
    files = [f"model-{i:05d}-of-{len(names):05d}.safetensors" for i in range(1, len(names) + 1)]
    for i, group in enumerate(names):
        os.replace(out_dir / f"shard{i + 1}.safetensors", out_dir / files[i])
        weight_map.update({n: files[i] for n in group})
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps(_config(c)))
    _write_tokenizer(out_dir)
    return sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flush(out_dir: Path, shard: dict, index: int) -> None:
    from safetensors.torch import save_file

    save_file(shard, str(out_dir / f"shard{index}.safetensors"), metadata={"format": "pt"})


def _config(c: dict) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c["hidden"], "num_hidden_layers": c["layers"],
        "intermediate_size": c["ffn"], "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"], "vocab_size": c["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 2048},
        "bos_token_id": 1, "eos_token_id": 4, "torch_dtype": "bfloat16",
    }


def _write_tokenizer(out_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import CHATML_TEMPLATE, train_bpe_tokenizer

    train_bpe_tokenizer(add_bos=True).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "add_bos_token": True,
        "chat_template": CHATML_TEMPLATE}))


# Runs in the child: do the work, then report this process's own high-water RSS (VmHWM).
# VmHWM belongs to the address space created at exec, so unlike wait4's ru_maxrss it does
# not include the parent's memory that the child inherited across fork.
_CHILD = """
import re, sys
try:
    if sys.argv[1:]:
        from export.__main__ import main
        code = main(sys.argv[1:])
    else:
        import export.gguf_convert, gguf, tokenizers, numpy
        code = 0
finally:
    status = open("/proc/self/status").read()
    print("PEAK_RSS_KIB", re.search(r"VmHWM:\\s*(\\d+)", status).group(1), flush=True)
sys.exit(code)
"""


def peak_rss_of(args: list[str]) -> tuple[int, float, int]:
    """Run the converter CLI with `args` (none: imports only) in a child process.

    Returns (exit code, seconds, the child's peak RSS in bytes).
    """
    cmd = [sys.executable, "-c", _CHILD, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    peak = 0
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_KIB"):
            peak = int(line.split()[1]) * 1024
        else:
            print(line)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
    return proc.returncode, seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (seconds), for tests")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "convert_memory.json")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary files go")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else FULL

    with tempfile.TemporaryDirectory(prefix="convert_memory.", dir=args.workdir) as tmp:
        hf_dir, gguf_path = Path(tmp) / "hf", Path(tmp) / "model-f16.gguf"
        hf_dir.mkdir()
        t0 = time.monotonic()
        ckpt_bytes = write_checkpoint(hf_dir, shape)
        build_s = time.monotonic() - t0
        n_shards = len(list(hf_dir.glob("*.safetensors")))
        print(f"checkpoint: {ckpt_bytes / 2**20:.1f} MiB bf16 in {n_shards} shards "
              f"(built in {build_s:.1f} s)", flush=True)

        # what the interpreter and the converter's imports cost before any tensor is read
        _, _, base_rss = peak_rss_of([])
        rc, seconds, peak = peak_rss_of([
            "gguf", "--hf", str(hf_dir), "--out", str(gguf_path),
            "--outtype", "f16", "--bpe-pre", "gpt-2", "--no-progress"])
        if rc != 0:
            print(f"conversion failed with exit code {rc}", file=sys.stderr)
            return rc
        result = {
            "model": "tiny" if args.tiny else "full", "shape": shape,
            "n_params": sum(_numel(s) for s in tensor_shapes(shape).values()),
            "checkpoint_bytes": ckpt_bytes, "n_shards": n_shards,
            "gguf_bytes": gguf_path.stat().st_size, "outtype": "f16",
            "peak_rss_bytes": peak, "baseline_rss_bytes": base_rss,
            "ratio": peak / ckpt_bytes, "target_ratio": TARGET_RATIO,
            "convert_seconds": round(seconds, 2),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
        }
    verdict = "ok" if result["ratio"] <= TARGET_RATIO else "OVER TARGET"
    print(f"params {result['n_params'] / 1e6:.1f}M | checkpoint {ckpt_bytes / 2**20:.1f} MiB | "
          f"peak RSS {peak / 2**20:.1f} MiB (imports alone {base_rss / 2**20:.1f} MiB) | "
          f"ratio {result['ratio']:.2f} (target <= {TARGET_RATIO}: {verdict}) | "
          f"convert {seconds:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
