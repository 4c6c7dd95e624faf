"""The `quantship` command: parse into a spec, call one library function, print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .specs import EvalSpec, QuantSpec, default_of


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing, unwritable, full, exists
        print(f"error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantship", description="Quantize, prove, ship.")
    sub = p.add_subparsers(metavar="COMMAND")

    model = sub.add_parser("model", help="built-in models").add_subparsers(metavar="ACTION")
    pull = model.add_parser("pull", help="install and convert a built-in model; prints its folder")
    pull.add_argument("name")
    pull.add_argument("--force", action="store_true", help="convert again even if present")
    pull.set_defaults(func=cmd_pull)
    model.add_parser("list", help="list built-in models").set_defaults(func=cmd_models)

    sub.add_parser("schemes", help="the scheme grammar with examples").set_defaults(func=cmd_schemes)

    q = sub.add_parser("quantize", help="quantize a model and write an artifact folder")
    q.add_argument("model", help="built-in name or local Hugging Face folder")
    q.add_argument("--scheme", required=True, help="e.g. w8, w4g64, w4g32-asym, w3g64, nf4g64, fp8 (see `schemes`)")
    q.add_argument("--method", default=default_of(QuantSpec, "method"),
                   help="rtn, hqq (data-free); gptq, awq (= awq+rtn), awq+gptq, smoothquant (calibrated)")
    q.add_argument("-o", "--out", help="artifact folder (default: ./out/<model>-<scheme>-<method>)")
    q.add_argument("--clip-search", action="store_true", help="RTN: MSE-optimal clipping search per group")
    q.add_argument("--no-act-order", action="store_true",
                   help="GPTQ (gptq, awq+gptq): plain column order instead of decreasing Hessian diagonal")
    q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    q.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="keep matching layers (repeatable)")
    q.add_argument("--quantize-head", action="store_true", help="also quantize lm_head")
    q.add_argument("--seed", type=int, default=default_of(QuantSpec, "seed"))
    q.add_argument("--calib", default=default_of(QuantSpec, "calib"), help="calibration data spec (methods using data)")
    q.add_argument("--calib-samples", type=int, default=default_of(QuantSpec, "calib_samples"))
    q.add_argument("--calib-seqlen", type=int, default=default_of(QuantSpec, "calib_seqlen"))
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.set_defaults(func=cmd_quantize)

    v = sub.add_parser("verify", help="check an artifact's (or export's) schema and sha256 of every file")
    v.add_argument("artifact")
    v.add_argument("--key", metavar="KEY.pub", help="also check its signature by this public key (quantship sign)")
    v.set_defaults(func=cmd_verify)

    x = sub.add_parser("export", help="export an artifact to another runtime's format, verified through its reader")
    x.add_argument("artifact", help="quantship artifact folder")
    x.add_argument("--to", required=True, metavar="TARGET", help="compressed-tensors, gptq or gguf (see docs/export.md)")
    x.add_argument("-o", "--out", required=True, help="export folder")
    x.add_argument("--force", action="store_true", help="replace an existing export folder")
    x.add_argument("--require-signature", metavar="KEY.pub", help="refuse the artifact unless signed by this key")
    x.set_defaults(func=cmd_export)

    sg = sub.add_parser("sign", help="sign an artifact or export folder (OpenSSF model-signing, offline EC key)")
    sg.add_argument("folder", help="quantship artifact or export folder")
    sg.add_argument("--key", required=True, metavar="KEY.priv", help="PEM elliptic-curve private key")
    sg.set_defaults(func=cmd_sign)

    e = sub.add_parser("eval", help="compare candidate(s) with the baseline: perplexity and KL divergence")
    e.add_argument("baseline")
    e.add_argument("candidates", nargs="+")
    add_eval_options(e)
    e.add_argument("--json", help="write the report(s) as JSON")
    e.add_argument("--require-signature", metavar="KEY.pub",
                   help="every candidate must be a quantship artifact signed by this key")
    e.set_defaults(func=cmd_eval)

    pl = sub.add_parser("plan", help="memory plan: weights, KV cache, the largest batch x context that fits")
    pl.add_argument("model", help="built-in name, HF folder, config.json or example (llama-2-7b, llama-3.1-8b, ...)")
    pl.add_argument("--scheme", required=True, help="fp32, bf16, fp16 or a scheme (w8, w4g128, ...)")
    pl.add_argument("--kv", default="bf16", help="KV cache: float32, bf16, fp16, int8, fp8")
    pl.add_argument("--ctx", type=int, default=4096, help="tokens per sequence")
    mem = pl.add_mutually_exclusive_group()
    mem.add_argument("--memory", default="24GiB", help="budget, e.g. 24GiB, 80GB, 500MiB")
    mem.add_argument("--gpu", help="preset: h100-80gb, a100-80gb, a100-40gb, l4-24gb, rtx4090-24gb")
    pl.add_argument("--quantize-head", action="store_true", help="lm_head quantized too")
    pl.add_argument("--price-per-hour", type=float, help="with --tok-s: cost per million tokens")
    pl.add_argument("--tok-s", type=float, help="sustained output tokens/s (from `quantship bench`)")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="speed and memory on the engine: single stream, or load at a concurrency/rate")
    b.add_argument("model", help="built-in name, HF folder or quantship artifact")
    _add_bench_options(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the default flow: pull, quantize w8 and w4g64 with RTN, evaluate, compare")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--schemes", default="w8,w4g64")
    d.add_argument("--out-dir", default="out")
    add_eval_options(d)
    d.add_argument("--json", default="out/demo.json")
    d.set_defaults(func=cmd_demo)

    from .evaluate.harness import DEFAULT_BATCH_SIZE, DEFAULT_TASKS

    h = sub.add_parser("harness", help="lm-evaluation-harness tasks (local YAMLs) on a model or artifact")
    h.add_argument("model", help="built-in name, HF folder or quantship artifact")
    h.add_argument("--tasks", default=",".join(DEFAULT_TASKS), metavar="LIST",
                   help="comma-separated: packaged tasks (quantship_mc, quantship_gen) or paths of task YAMLs")
    h.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    h.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--apply-chat-template", action="store_true", help="let lm-eval wrap prompts in the chat template")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--json", help="write the metrics as JSON")
    h.set_defaults(func=cmd_harness)
    return p


def _add_bench_options(b: argparse.ArgumentParser) -> None:
    from .bench.run import KV_KINDS, BenchSpec

    def d(name):
        return default_of(BenchSpec, name)

    load = b.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight")
    load.add_argument("--request-rate", type=float, help="open loop: Poisson arrivals per second ('inf': all at once)")
    b.add_argument("--num-prompts", type=int, default=d("num_prompts"), help="load modes: requests sent")
    b.add_argument("--input-len", type=int, default=d("input_len"), help="prompt tokens (real news text)")
    b.add_argument("--output-len", type=int, default=d("output_len"), help="generated tokens per request")
    b.add_argument("--range-ratio", type=float, default=d("range_ratio"),
                   help="load modes: lengths uniform in len x [1-r, 1+r] (0: fixed)")
    b.add_argument("--kv", default=d("kv"), help=f"KV cache: {', '.join(KV_KINDS)}")
    b.add_argument("--max-batch", type=int, default=d("max_batch"))
    b.add_argument("--repeats", type=int, default=d("repeats"), help="single stream: timed repeats (median)")
    b.add_argument("--warmup", type=int, default=d("warmup"), help="untimed warm-up runs")
    b.add_argument("--slo", default=d("slo"), help="goodput SLOs, e.g. ttft=0.5,tpot=50ms,e2e=10s")
    b.add_argument("--seed", type=int, default=d("seed"))
    b.add_argument("--price-per-hour", type=float, help="cost per million output tokens at this price")
    b.add_argument("--no-bandwidth", action="store_true", help="skip measuring the machine's read bandwidth")
    b.add_argument("--json", help="write the results as JSON")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", default=None, metavar="FILE|news|code",
                   help="evaluation text (repeatable; default: the news corpus's eval split)")
    p.add_argument("--ctx", type=int, default=default_of(EvalSpec, "ctx"), help="tokens per window")
    p.add_argument("--max-windows", type=int, default=default_of(EvalSpec, "max_windows"),
                   help="windows per text (0 = all)")
    p.add_argument("--batch-size", type=int, default=default_of(EvalSpec, "batch_size"))
    p.add_argument("--suites", default="", metavar="LIST",
                   help="task suites, comma-separated: code,math,json,qa,long,multilingual,refusal or all")
    p.add_argument("--suite-file", action="append", default=[], metavar="JSONL",
                   help="your own suite (repeatable; format in docs/evaluation.md)")
    p.add_argument("--full", action="store_true", help="full suites (e.g. all 164 HumanEval problems)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items per suite")
    p.add_argument("--items-dir", default=None, help="write per-item results (JSONL) here")
    p.add_argument("--seed", type=int, default=0)


def cmd_pull(args) -> int:
    from .models.builtin import pull

    print(pull(args.name, force=args.force))
    return 0


def cmd_models(args) -> int:
    from .models.builtin import BUILTINS, is_pulled, model_dir

    for name, spec in BUILTINS.items():
        state = f"pulled: {model_dir(name)}" if is_pulled(name) else "not pulled"
        print(f"{name:14s} {spec.description} [{spec.license}] ({state})")
    return 0


def cmd_schemes(args) -> int:
    from .formats.scheme import GRAMMAR, parse_scheme
    from .report import console
    from rich.table import Table

    from rich.markup import escape

    table = Table(title=escape(f"scheme grammar: {GRAMMAR}"))  # the grammar's [..] is not markup
    for col in ("scheme", "format", "granularity", "bpw (576x576 layer)"):
        table.add_column(col)
    for name in ("w8", "w8pt", "w4", "w4g64", "w4g32-asym", "w3g64", "w2g64", "nf4g64", "fp8", "w8a8"):
        s = parse_scheme(name)
        table.add_row(name, s.kind, s.granularity + (f" {s.group_size}" if s.group_size else ""),
                      f"{s.bits_per_weight(576, 576):.3f}")
    console.print(table)
    return 0


def _method_params(args) -> dict:
    from .specs import parse_method_params

    params = dict(parse_method_params(args.param))
    if args.clip_search:
        params["clip_search"] = True
    if args.no_act_order:
        params["act_order"] = False
    return params


def cmd_quantize(args) -> int:
    from . import api
    from .artifact import read_manifest
    from .report import console, quant_table

    out = args.out or str(Path("out") / f"{Path(args.model).name}-{args.scheme}-{args.method}")
    path = api.quantize(args.model, args.scheme, method=args.method, out=out, overwrite=args.force,
                        method_params=_method_params(args), ignore=tuple(args.ignore),
                        quantize_head=args.quantize_head, seed=args.seed, calib=args.calib,
                        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    manifest = read_manifest(path)
    console.print(quant_table(manifest, str(path)))
    print(f"wrote {path} (content sha256 {manifest['content_sha256'][:16]}…, "
          f"quantized in {manifest['timings']['quantize_s']:.1f} s)")
    return 0


def cmd_verify(args) -> int:
    from .artifact import ArtifactError, verify_artifact
    from .export.base import EXPORT_MANIFEST, ExportError, verify_export
    from .signing import SignatureError, verify_signature

    try:
        if (Path(args.artifact) / EXPORT_MANIFEST).is_file():
            manifest = verify_export(args.artifact)
        else:
            manifest = verify_artifact(args.artifact)
        if args.key:
            verify_signature(args.artifact, args.key)
    except (ArtifactError, ExportError, SignatureError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    signed = f", signature by {args.key} verified" if args.key else ""
    print(f"OK {args.artifact}: {len(manifest['files'])} files verified{signed}, "
          f"content sha256 {manifest['content_sha256']}")
    return 0


def cmd_sign(args) -> int:
    from .signing import sign

    path = sign(args.folder, args.key)
    print(f"signed {args.folder}: {path}")
    return 0


def cmd_export(args) -> int:
    from .export import EXPORT_MANIFEST, export
    from .export.base import read_export_manifest

    out = export(args.artifact, args.to, args.out, force=args.force, public_key=args.require_signature)
    manifest = read_export_manifest(out)
    print(f"wrote {out} ({args.to}; {len(manifest['tensors'])} quantized layers mapped exactly; "
          f"manifest {EXPORT_MANIFEST}, content sha256 {manifest['content_sha256'][:16]}…)")
    return 0


def _eval_spec(args) -> EvalSpec:
    return EvalSpec(ctx=args.ctx, max_windows=args.max_windows, batch_size=args.batch_size)


def _evaluate_all(baseline: str, candidates: list[str], args) -> list[dict]:
    from .evaluate.compare import compare
    from .models.load import is_artifact, load_model, resolve_model

    spec = _eval_spec(args)
    base = load_model(baseline)
    rows = []
    for cand_name in candidates:
        path = resolve_model(cand_name)
        cand = load_model(path, public_key=getattr(args, "require_signature", None))
        report = compare(base, cand, texts=args.text, spec=spec)
        _warn_calibration_overlap(path, base[1], args, spec)
        if args.suites or args.suite_file:
            report["tasks"] = _run_tasks(base, cand, args, cand_name)
        row = {"name": cand_name, "report": report, "bpw": None, "size_bytes": None}
        if is_artifact(path):
            from .artifact import read_manifest

            manifest = read_manifest(path)
            row["bpw"] = manifest["bits_per_weight"]["quantized_layers"]
            row["size_bytes"] = (path / "model.safetensors").stat().st_size
            row["calibration"] = manifest.get("calibration")
        rows.append(row)
        del cand
    return rows


def _suite_list(text: str) -> list[str]:
    from .evaluate.suites import GENERATION_SUITES, SCORING_SUITES

    names = [s.strip() for s in text.split(",") if s.strip()]
    return [*GENERATION_SUITES, *SCORING_SUITES] if names == ["all"] else names


def _run_tasks(base, cand, args, cand_name: str) -> dict:
    from .evaluate.tasks import render_tables, run_suites
    from .fsutil import canonical_json, sha256_bytes
    from .report import console

    items_dir = None
    if args.items_dir:
        items_dir = Path(args.items_dir) / Path(cand_name).name
    results = run_suites(base, cand, _suite_list(args.suites), suite_files=args.suite_file, full=args.full,
                         seed=args.seed, limit=args.limit, out_dir=items_dir)
    render_tables(results, console=console)
    hashes = {name: r.get("content_hash") for name, r in results.items()}
    return {**results, "content_sha256": sha256_bytes(canonical_json(hashes).encode())}


def _warn_calibration_overlap(path: Path, tokenizer, args, spec: EvalSpec) -> None:
    """Loudly warn when a candidate was calibrated on the very windows it is evaluated on."""
    from .models.load import is_artifact

    if not is_artifact(path):
        return
    from .artifact import read_manifest

    calibration = read_manifest(path).get("calibration")
    if not calibration:
        return
    from .calib.overlap import find_overlap
    from .evaluate.compare import load_texts
    from .evaluate.metrics import make_windows

    for name, text in load_texts(args.text).items():
        windows = make_windows(tokenizer(text, add_special_tokens=False)["input_ids"], spec.ctx, spec.max_windows)
        overlap = find_overlap(calibration, windows)
        if overlap:
            print(f"WARNING: {path} was calibrated on data that overlaps the evaluation text {name!r}: {overlap}. "
                  f"Its scores are optimistic; evaluate on held-out text.", file=sys.stderr)


def _write_json(path: str, rows: list[dict], baseline: str) -> None:
    from .fsutil import atomic_write_json

    if len(rows) == 1:
        payload = {"baseline": baseline, "candidate": rows[0]["name"], **rows[0]["report"]}
    else:
        payload = {"baseline": baseline, "candidates": {r["name"]: r["report"] for r in rows}}
    atomic_write_json(path, payload)
    print(f"wrote {path}")


def cmd_eval(args) -> int:
    from .report import console, eval_table, kld_table

    rows = _evaluate_all(args.baseline, args.candidates, args)
    for row in rows:
        console.print(kld_table(row["report"], row["name"]))
    console.print(eval_table(rows, title=f"{args.baseline} vs candidates (ctx {args.ctx}, second half scored)"))
    if args.json:
        _write_json(args.json, rows, args.baseline)
    return 0


def cmd_demo(args) -> int:
    from . import api
    from .models.builtin import model_dir
    from .report import console, eval_table

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    artifacts = []
    for scheme in schemes:
        out = Path(args.out_dir) / f"{args.model}-{scheme}-rtn"
        print(f"quantizing {args.model} -> {scheme} (rtn) into {out}")
        api.quantize(args.model, scheme, method="rtn", out=out, overwrite=True)
        artifacts.append(str(out))
    rows = _evaluate_all(args.model, artifacts, args)
    for row, scheme in zip(rows, schemes):
        row["name"] = f"{scheme} rtn"
        src = model_dir(args.model) / "model.safetensors"
        row["base_bytes"] = src.stat().st_size if src.exists() else None
    console.print(eval_table(rows, title=f"{args.model}: RTN candidates vs fp32 baseline "
                                         f"(news eval split, ctx {args.ctx}, second half scored)"))
    if args.json:
        _write_json(args.json, rows, args.model)
    return 0



def cmd_plan(args) -> int:
    from .bench.plan import cost_per_million_tokens, plan, render_plan
    from .report import console

    p = plan(args.model, args.scheme, kv=args.kv, ctx=args.ctx, memory=args.gpu or args.memory,
             quantize_head=args.quantize_head)
    console.print(render_plan(p))
    if args.price_per_hour is not None and args.tok_s:
        print(f"${cost_per_million_tokens(args.tok_s, args.price_per_hour):.3f} per 1M tokens "
              f"at {args.tok_s:g} tok/s and ${args.price_per_hour:g}/hour")
    return 0


def cmd_bench(args) -> int:
    from .bench.run import BenchSpec, run_bench
    from .bench.report import render_bench
    from .report import console

    spec = BenchSpec(model=args.model, concurrency=args.concurrency, request_rate=args.request_rate,
                     num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                     range_ratio=args.range_ratio, kv=args.kv, max_batch=args.max_batch, repeats=args.repeats,
                     warmup=args.warmup, slo=args.slo, seed=args.seed, price_per_hour=args.price_per_hour,
                     measure_bandwidth=not args.no_bandwidth)
    result = run_bench(spec)
    console.print(render_bench(result))
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def cmd_harness(args) -> int:
    from .evaluate.harness import render_harness, run_harness
    from .report import console

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_harness(args.model, tasks, limit=args.limit, batch_size=args.batch_size,
                         num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template, seed=args.seed)
    render_harness(result, console=console)
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
