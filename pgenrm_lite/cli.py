"""`pgenrm-lite`: the runtime's command line.

Every command takes `--json` for machine output. Exit codes: 0 success, 2 usage error,
1 anything else, with one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import orjson

from . import __version__
from ._progress import Progress
from .bundle import is_bundle_dir
from .errors import ConfigError, PgenrmError
from .group_rewards import GROUP_METHODS
from .options import add_option_flags, options_from_flags
from .records import MAX_TEXT_CHARS


# -- helpers --------------------------------------------------------------------------------

def _emit_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


_stdin_taken = False  # "-" may stand for one argument per invocation


def read_text_arg(value: str) -> str:
    """A text argument: literal, `@FILE` for a file's contents, or `-` for standard input.

    Files and standard input are read up to the text limit (MAX_TEXT_CHARS characters) and
    must be UTF-8.
    """
    global _stdin_taken
    from ._io import decode_utf8, read_bytes, read_stream

    if value == "-":
        if _stdin_taken:
            raise ConfigError("standard input ('-') can stand for one argument only; pass the others as text "
                              "or @FILE")
        _stdin_taken = True
        text = decode_utf8(read_stream(sys.stdin.buffer, 4 * MAX_TEXT_CHARS, "standard input"), "standard input")
        what = "standard input"
    elif value.startswith("@"):
        path = Path(value[1:])
        text = decode_utf8(read_bytes(path, 4 * MAX_TEXT_CHARS, "file"), f"file {path}")
        what = f"file {path}"
    else:
        return value
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(f"{what} has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
    return text


def _bundle_path(args) -> Path:
    from .defaults import default_bundle_dir

    return Path(args.bundle) if args.bundle else default_bundle_dir()


def _bundle_contract(args):
    """The output contract the bundle's template names (read from its manifest; no model loaded)."""
    from .bundle import read_manifest
    from .protocol import resolve_template

    path = _bundle_path(args)
    if not is_bundle_dir(path):
        return resolve_template(None).output_contract
    return resolve_template(read_manifest(path).template).output_contract


def _open_scorer(args):
    from .errors import BundleError
    from .scorer import Scorer

    path = _bundle_path(args)
    if not is_bundle_dir(path) and not args.bundle:
        raise BundleError(f"no default bundle at {path}; build it with `python -m export default-bundle` "
                          "or pass --bundle DIR")
    return Scorer.from_bundle(path, options_from_flags(args), device=args.device, n_threads=args.threads,
                              chat_template=args.chat_template)


MAX_USER_FILE_BYTES = 256 << 20


def _load_user(path: str):
    from ._io import read_bytes
    from .records import UserProfile

    return UserProfile.from_json(read_bytes(Path(path), MAX_USER_FILE_BYTES, "user profile"))


# -- commands -------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from .datasets import load_rows, users_from_rows
    from .defaults import example_users_path

    rows = load_rows(example_users_path())
    users = users_from_rows(rows)
    row = next(r for r in rows if r.split == "test")
    user = users[row.user_id]
    with _open_scorer(args) as scorer:
        res = scorer.compare(user, row.prompt, row.chosen, row.rejected)
    if args.json:
        _emit_json({"user_id": user.user_id, "prompt": row.prompt, "a": row.chosen, "b": row.rejected,
                    "user_chose": "a", "result": res.model_dump(mode="json")})
        return 0
    out = sys.stdout
    out.write(f"User {user.user_id} ({len(user.history)} past preference pairs)\n")
    out.write(f"\nQuery:\n  {row.prompt}\n\nResponse A:\n  {row.chosen}\n\nResponse B:\n  {row.rejected}\n\n")
    verdict = {"a": "A", "b": "B", None: "no decision (tie or no parseable chain)"}[res.preferred]
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    out.write(f"Decision: {verdict}   score A = {fmt(res.score_a)}   score B = {fmt(res.score_b)}\n")
    out.write(f"({res.n_parsed} chain(s) parsed, {res.n_failed} failed; seed {res.seed}, "
              f"Ind-{res.n_samples}/Pro-{res.n_neighbors}; {res.timing.total_s:.1f} s; "
              "this user actually chose A)\n")
    if res.chains:
        chain = res.chains[0]
        sample = next(s for s in res.samples if s.chain is not None)
        out.write("\nPersona and criteria (first chain, PART 1):\n")
        for line in chain.analysis.strip().splitlines()[:12]:
            out.write(f"  {line}\n")
        out.write("\nWeighted criteria (Response 1/2 as shown to the model; "
                  f"{'B was shown first' if sample.swapped else 'A was shown first'}):\n")
        for c in chain.criteria:
            s1, s2 = c.scores
            written = f"  (written {c.raw_weight:g}%)" if chain.weights_normalised and c.raw_weight is not None else ""
            out.write(f"  {c.weight:5.1f}%  {c.name[:40]:40s}  {s1}  {s2}{written}\n")
        if chain.weights_normalised:
            out.write(f"  (the weights as written sum to {chain.weights_sum:g}%, not 100%: shown normalised)\n")
    if res.neighbors:
        out.write("\nNeighbours used: " + ", ".join(f"{n.user_id} ({n.similarity:.2f})" for n in res.neighbors) + "\n")
    return 0


def cmd_compare(args) -> int:
    user = _load_user(args.user)
    prompt, a, b = read_text_arg(args.prompt), read_text_arg(args.a), read_text_arg(args.b)
    with _open_scorer(args) as scorer:
        res = scorer.compare(user, prompt, a, b)
    if args.json:
        _emit_json(res.model_dump(mode="json"))
    else:
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"preferred: {res.preferred or 'none'}  score_a: {fmt(res.score_a)}  score_b: {fmt(res.score_b)}  "
              f"parsed: {res.n_parsed}  failed: {res.n_failed}  seed: {res.seed}")
    return 0


def cmd_score(args) -> int:
    user = _load_user(args.user)
    prompt = read_text_arg(args.prompt)
    responses = [read_text_arg(r) for r in args.response]
    with _open_scorer(args) as scorer:
        group = scorer.score_group(user, prompt, responses, method=args.group_reward)
    if args.json:
        _emit_json({"scores": group.rewards, "stderr": group.stderr, "method": group.method,
                    "seed": group.seed, "n_samples": group.n_samples, "n_neighbors": group.n_neighbors,
                    "n_pairs_parsed": group.n_pairs_parsed, "n_pairs": len(group.pairs)})
    else:
        for i, (r, se) in enumerate(zip(group.rewards, group.stderr)):
            print(f"{i}\t{r:.3f}" + ("" if se != se else f"\t+/- {se:.3f}"))  # se != se: NaN
    return 0


def _eval_rows(args):
    from .datasets import load_hh, load_rows, rows_of_split, users_from_rows
    from .evaluation import interleave_by_user

    if args.format == "rewardbench":
        from .datasets import load_profiles, load_rewardbench

        rows = load_rewardbench(args.data, user_column=args.user_column)
        # Users come from --profiles; a row without a known user gets the non-personalised judge.
        users = load_profiles(args.profiles) if args.profiles else {}
        tests = interleave_by_user(rows)
        if args.limit is not None:
            tests = tests[: args.limit]
        if not tests:
            raise ConfigError(f"{args.data} has no rows to judge")
        return users, tests
    if args.format == "hh":
        rows = load_hh(args.data, seed=args.split_seed)
    else:
        rows = load_rows(args.data, turns=args.turns or _bundle_contract(args).turns)
    users = users_from_rows(rows)
    tests = interleave_by_user(rows_of_split(rows))
    if args.limit is not None:
        tests = tests[: args.limit]
    if not tests:
        raise ConfigError(f"{args.data} has no test rows to judge (rows with split 'test')")
    return users, tests


def cmd_eval(args) -> int:
    from .evaluation import evaluate

    users, tests = _eval_rows(args)
    with _open_scorer(args) as scorer:
        config = {"data": str(args.data), "format": args.format, "limit": args.limit, "pairs": len(tests),
                  "bundle": str(_bundle_path(args)), "n_samples": scorer.n_samples,
                  "n_neighbors": scorer.n_neighbors, "seed": scorer.seed, "split_seed": args.split_seed,
                  "max_tokens": scorer.params.max_tokens, "temperature": scorer.params.temperature,
                  "constrained": scorer.constrained, "model": scorer.engine.architecture,
                  "contract": scorer.contract.name, "candidate_order": scorer.candidate_order,
                  "history_order": scorer.history_order,
                  "turns": None if args.format != "prb" else (args.turns or scorer.contract.turns),
                  "tie_conventions": {"accuracy_official": "ties and unparseable pairs dropped from the denominator",
                                      "accuracy_rewardbench": "ties and unparseable pairs counted wrong"}}

        if args.format == "rewardbench":
            config.update(user_column=args.user_column, profiles=args.profiles and str(args.profiles),
                          users_known=sorted({r.user_id for r in tests} & set(users)),
                          rewardbench_score="RewardBench's own score: chosen 1, rejected 0, tie or no parse 0.5")

        def judge(user, row, seed):
            res = scorer.compare(user, row.prompt, row.chosen, row.rejected, seed=seed)
            return res.preferred, res.n_parsed, res.n_failed, res.abstained

        with Progress(len(tests), "eval", unit="pairs") as bar:
            report = evaluate(judge, users, tests, seed=scorer.seed, config=config,
                              on_result=lambda _: bar.update(1))
    if args.format == "rewardbench":
        from .integrations.rewardbench import rewardbench_score

        for summary in (report.overall, *report.per_user.values()):
            summary["rewardbench_score"] = rewardbench_score(summary)
    if args.json:
        _emit_json({"config": report.config, "overall": report.overall, "per_user": report.per_user})
        return 0
    _print_accuracy("overall", report.overall)
    for uid, summary in report.per_user.items():
        _print_accuracy(uid, summary)
    return 0


def _print_accuracy(name: str, s: dict) -> None:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    ci = s["accuracy_official_ci95"]
    ci_txt = f"[{pct(ci[0])}, {pct(ci[1])}]" if ci else ""
    print(f"{name:>16}: {pct(s['accuracy_official'])} {ci_txt} (official, n={s['correct'] + s['wrong']})  "
          f"{pct(s['accuracy_rewardbench'])} (ties/failures wrong, n={s['pairs']})  "
          f"ties={s['ties']} unparsed={s['no_parse']}" + (f" abstained={s['abstained']}" if s["abstained"] else ""))


def cmd_serve(args) -> int:
    try:
        from .integrations.server import check_bind, serve
    except ImportError as exc:
        raise ConfigError(f"the reward server needs the `serve` extra: pip install 'pgenrm-lite[serve]' "
                          f"({exc})") from exc
    from .datasets import load_profiles

    profiles = load_profiles(args.profiles) if args.profiles else {}
    token = _server_token(args)
    check_bind(args.host, token, args.insecure)  # before the model loads: a refusal costs nothing
    with _open_scorer(args) as scorer:
        print(f"pgenrm-lite: serving {len(profiles)} user profile(s) on http://{args.host}:{args.port}/get_reward "
              f"(Ind-{scorer.n_samples}/Pro-{scorer.n_neighbors}, queue {args.queue_size})", file=sys.stderr)
        options = {"queue_size": args.queue_size, "max_body_bytes": args.max_body_bytes,
                   "unparsed_reward": args.unparsed_reward, "group_reward": args.group_reward}
        if args.reference is not None:
            options["reference"] = read_text_arg(args.reference)
        serve(scorer, profiles, host=args.host, port=args.port, token=token, allow_insecure=args.insecure,
              **options)
    return 0


def _server_token(args) -> str | None:
    from .integrations.server import TOKEN_ENV, check_token

    if args.token_file is not None:
        from ._io import decode_utf8, read_bytes

        text = decode_utf8(read_bytes(args.token_file, 8192, "token file"), "token file").strip()
        if not text:
            raise ConfigError(f"the token file {args.token_file} is empty")
        return check_token(text)
    return check_token(os.environ.get(TOKEN_ENV) or None)


def cmd_info(args) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(_bundle_path(args), verify="size")
    m = bundle.manifest
    if args.json:
        _emit_json({"path": str(bundle.root), **m.model_dump(mode="json")})
        return 0
    print(f"bundle {bundle.root} (schema {m.schema_version}, by {m.created_by})")
    print(f"  model: {m.llm.file} ({m.llm.architecture}, context {m.llm.context_length}, "
          f"chat template {m.llm.chat_template_file or ('from the GGUF' if m.llm.has_chat_template else 'none')})")
    if m.embedder:
        e = m.embedder
        print(f"  embedder: {e.dir}/{e.model_file} (dim {e.dimension}, {e.pooling} pooling, "
              f"{'normalised' if e.normalized else 'not normalised'}, max length {e.max_length}"
              f"{', query prefix ' + repr(e.query_prefix) if e.query_prefix else ''})")
    if m.prototypes:
        p = m.prototypes
        refined = (f", refined ({p.refinement.epochs} epoch(s), {p.refinement.n_examples} targets)"
                   if p.refinement else "")
        print(f"  prototypes: {p.count} over {p.n_members} {p.granularity} members (persona from {p.persona_source}, "
              f"members carry {p.members_carry}, ef {p.ef}{refined})")
    print(f"  template: {m.template.get('name', 'custom')} "
          f"(output contract {m.template.get('contract', 'structured')})")
    if m.defaults:
        print("  recommended options: " + ", ".join(f"{k}={v}" for k, v in m.defaults.items()))
    print("  files:")
    for f in m.files:
        print(f"    {f.size:>12,d}  {f.sha256[:12]}  {f.path}")
    return 0


def cmd_forget(args) -> int:
    from .bundle import Bundle
    from .prototypes import PrototypeIndex, forget_persona_checkpoint

    bundle = Bundle.open(args.bundle, verify="size")
    if bundle.manifest.prototypes is None:
        removed = 0
        forget_persona_checkpoint(bundle.root, args.user_id)
    else:
        with PrototypeIndex.load(bundle) as index:  # no embedder: removal needs no query
            removed = index.remove_user(args.user_id)
            left = index.n_members
    if args.json:
        _emit_json({"user_id": args.user_id, "bundle": str(bundle.root), "members_removed": removed})
    elif removed:
        print(f"forgot {args.user_id}: {removed} member record(s) removed; {left} member(s) left in {bundle.root}")
    else:
        print(f"{args.user_id} is not a prototype member of {bundle.root}; nothing to remove")
    return 0


def cmd_verify(args) -> int:
    from .bundle import Bundle

    bundle = Bundle.open(args.dir, verify="full")
    n = len(bundle.manifest.files)
    if args.json:
        _emit_json({"path": str(bundle.root), "ok": True, "files_checked": n})
    else:
        print(f"ok: {n} files match their sizes and sha256 in {bundle.root}/manifest.json")
    return 0


def cmd_doctor(args) -> int:
    info = _doctor_report(args)
    ok = info["decode_check"].get("ok") is not False
    if args.json:
        _emit_json(info)
        return 0 if ok else 1
    for key, value in info.items():
        _print_doctor_item(key, value, info)
    return 0 if ok else 1


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _doctor_report(args) -> dict:
    """What `doctor` reports: versions, llama.cpp's build, the prefix cache, a decode check, hints."""
    import llama_cpp
    import onnxruntime

    from . import diagnostics
    from .defaults import default_bundle_dir
    from .prefix_cache import DEFAULT_DISK_MB, DEFAULT_MEMORY_MB, describe_directory

    system_info = diagnostics.system_info()
    features = diagnostics.build_features(system_info)
    cpu = diagnostics.cpu_flags()
    bundle = _bundle_path(args)
    info = {
        "pgenrm_lite": __version__,
        "python": sys.version.split()[0],
        "packages": {d: _package_version(d) for d in ("llama-cpp-python", "onnxruntime", "tokenizers", "numpy",
                                                      "hnswlib", "pydantic", "orjson")},
        "llama_cpp_system_info": system_info,
        "llama_cpp_build": {"features": features, "backends": diagnostics.backends(system_info),
                            "setup_flags": diagnostics.build_flags(),
                            "cpu_advertises_amx": "amx_tile" in cpu,
                            "amx_kernels_built": any(v for k, v in features.items() if k.startswith("AMX"))},
        "llama_cpp_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "default_bundle": str(default_bundle_dir()),
        "default_bundle_present": is_bundle_dir(default_bundle_dir()),
        "bundle": str(bundle),
        "prefix_cache": {"memory_mb_default": DEFAULT_MEMORY_MB, "disk_mb_default": DEFAULT_DISK_MB,
                         **(describe_directory(args.prefix_cache_dir) if args.prefix_cache_dir
                            else {"dir": "off (--prefix-cache-dir DIR to inspect one)"})},
        "decode_check": _decode_check(args, bundle),
    }
    info["hints"] = _hints(system_info)
    if info["decode_check"].get("ok") is False:
        info["hints"].insert(0, info["decode_check"]["message"])
    return info


def _decode_check(args, bundle: Path) -> dict:
    from . import diagnostics

    if args.no_decode_check:
        return {"ok": None, "message": "skipped (--no-decode-check)"}
    if not is_bundle_dir(bundle):
        return {"ok": None, "message": f"no bundle at {bundle} to test; build one with "
                                       "`python -m export default-bundle`"}
    from .bundle import read_manifest

    return diagnostics.decode_check(bundle / read_manifest(bundle).llm.file, n_threads=args.threads)


def _print_doctor_item(key: str, value: Any, info: dict) -> None:
    if key == "llama_cpp_build":
        on = [k for k, v in value["features"].items() if v]
        cuda = value["backends"].get("CUDA")
        if cuda is not None:
            print(f"llama_cpp_cuda: built for architectures {cuda.get('ARCHS', '?')}; GPU offload "
                  f"{'available' if info['llama_cpp_gpu_offload'] else 'unavailable (no usable GPU or driver)'}")
        print(f"llama_cpp_build: {' '.join(on) or 'no CPU features reported'}; AMX kernels "
              f"{'built' if value['amx_kernels_built'] else 'not built'} (CPU "
              f"{'advertises' if value['cpu_advertises_amx'] else 'does not advertise'} AMX)")
    elif key == "prefix_cache":
        disk = (f"{value['files']} file(s), {value['mb']} MB, {value['sound_headers']} with a sound header, in "
                f"{value['dir']}" if "files" in value else value["dir"])
        print(f"prefix_cache: memory {value['memory_mb_default']:g} MB by default; disk {disk} "
              f"(cap {value['disk_mb_default']:g} MB by default)")
    elif key == "decode_check":
        print(f"decode_check: {'ok' if value.get('ok') else 'FAILED' if value.get('ok') is False else 'not run'}"
              f": {value['message']}")
    elif isinstance(value, dict):
        print(f"{key}:")
        for k, v in value.items():
            print(f"  {k}: {v or 'not installed'}")
    elif isinstance(value, list):
        print(f"{key}:" + ("" if value else " none"))
        for line in value:
            print(f"  - {line}")
    else:
        print(f"{key}: {value}")


def _hints(system_info: str) -> list[str]:
    """Advice on this machine's set-up that changes speed by large factors."""
    hints = []
    policy = os.environ.get("OMP_WAIT_POLICY", "").upper()
    if "OPENMP = 1" in system_info and policy == "ACTIVE":
        load = os.getloadavg()[0]
        hints.append(f"llama.cpp is built with OpenMP and OMP_WAIT_POLICY=ACTIVE: its idle threads spin, and on "
                     f"cores shared with other work a decode step slows by up to 40x (measured); unset it to get "
                     f"pgenrm-lite's default, PASSIVE (load average now {load:.2f} on {os.cpu_count()} CPU(s))")
    return hints


# -- parser ---------------------------------------------------------------------------------

def _int_in(lo: int, hi: int, why: str):
    """An argparse type: an integer in lo..hi, else a usage error that says `why`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} {why}")
        return value
    return parse


_positive = _int_in(1, sys.maxsize, "must be at least 1")


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if not model:
        return
    p.add_argument("--bundle", help="bundle directory (default: the embedded default bundle)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--chat-template", metavar="FILE.jinja", default=None,
                   help="a chat template that replaces the bundle's and the model file's own")
    add_option_flags(p.add_argument_group("scorer options (left out: the bundle's recommended value, else the "
                                          "default)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgenrm-lite", description="Personalised rewards with P-GenRM on llama.cpp")
    parser.add_argument("--version", action="version", version=f"pgenrm-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_compare, _add_score, _add_eval, _add_serve, _add_info, _add_forget, _add_verify,
                _add_doctor):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="score an example pair for an example user")
    _common(p)
    p.set_defaults(func=cmd_demo)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="which of two responses a user prefers")
    _common(p)
    p.add_argument("--user", required=True, help="user profile JSON (as UserProfile serialises it)")
    p.add_argument("--prompt", required=True, help="text, @FILE or - for stdin")
    p.add_argument("--a", required=True, help="response A: text, @FILE or -")
    p.add_argument("--b", required=True, help="response B: text, @FILE or -")
    p.set_defaults(func=cmd_compare)


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="one score per response for a user")
    _common(p)
    p.add_argument("--user", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--response", action="append", required=True, help="repeat for each response (text, @FILE, -)")
    p.add_argument("--group-reward", choices=GROUP_METHODS, default="mean",
                   help="mean final score over its pairs (0-10, default) or Bradley-Terry strength (log-odds)")
    p.set_defaults(func=cmd_score)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="pairwise accuracy on a PersonalRewardBench-format or HH file")
    _common(p)
    p.add_argument("data", type=Path, help="data file (.jsonl, .jsonl.gz, .json)")
    p.add_argument("--format", choices=("prb", "hh", "rewardbench"), default="prb",
                   help="prb: PersonalRewardBench rows; hh: the two-user HH-RLHF relabelling; "
                        "rewardbench: prompt/chosen/rejected rows")
    p.add_argument("--user-column", default=None, help="rewardbench: the column holding each row's user id")
    p.add_argument("--profiles", type=Path, default=None,
                   help="rewardbench: UserProfile records (JSON list or JSON Lines); rows whose user is not "
                        "there use the non-personalised judge")
    p.add_argument("--limit", type=_positive, default=None,
                   help="judge at most N >= 1 test pairs (round-robin over users)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the history/test split (hh)")
    p.add_argument("--turns", choices=("first", "all"), default=None,
                   help="multi-turn contexts: the first turn only, or every turn labelled (default: the "
                        "bundle's contract: first for official, all for structured)")
    p.set_defaults(func=cmd_eval)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenRLHF-compatible HTTP reward server (POST /get_reward, GET /health)")
    _common(p)
    p.add_argument("--profiles", type=Path, default=None,
                   help="UserProfile records (JSON list or JSON Lines); the label of a request names the user")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting for the model before 503 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024,
                   help="larger bodies get 413 (default 16 MiB)")
    p.add_argument("--reference", default=None,
                   help="reference response for a rollout alone in its request (text, @FILE); default: a refusal")
    p.add_argument("--unparsed-reward", type=float, default=None,
                   help="reward when no chain parsed (default: the middle of the scale, 5.0; 0.0 for bradley_terry)")
    p.add_argument("--group-reward", choices=GROUP_METHODS, default="mean",
                   help="rollouts of one group: mean final score over their pairs (0-10, default) or "
                        "Bradley-Terry strengths from the pairs' verdicts (log-odds, centred per group)")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the bearer token every request must send (default: $PGENRM_SERVER_TOKEN "
                        "if set; without a token only loopback addresses are served)")
    p.add_argument("--insecure", action="store_true",
                   help="serve a non-loopback address without a token (only on a trusted network)")
    p.set_defaults(func=cmd_serve)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a bundle's manifest")
    _common(p, model=False)
    p.add_argument("--bundle", help="bundle directory (default: the embedded default bundle)")
    p.set_defaults(func=cmd_info)


def _add_forget(sub) -> None:
    p = sub.add_parser("forget", help="remove a user from a bundle's prototype members (atomically)")
    _common(p, model=False)
    p.add_argument("user_id")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory whose prototype index to update")
    p.set_defaults(func=cmd_forget)


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every bundle file against its sha256")
    _common(p, model=False)
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_verify)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="versions, llama.cpp build features, GPU offload, a one-token decode check")
    _common(p, model=False)
    p.add_argument("--bundle", help="bundle whose model the decode check loads (default: the default bundle)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the decode check")
    p.add_argument("--no-decode-check", action="store_true", help="skip the one-token decode in a child process")
    p.add_argument("--prefix-cache-dir", default=None, metavar="DIR", help="report the prompt-cache files in DIR")
    p.set_defaults(func=cmd_doctor)


def main(argv: Sequence[str] | None = None) -> int:
    global _stdin_taken
    _stdin_taken = False
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    try:
        return int(args.func(args) or 0)
    except PgenrmError as exc:
        print(f"pgenrm-lite: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pgenrm-lite: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
