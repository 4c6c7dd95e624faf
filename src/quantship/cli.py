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
    q.add_argument("--scheme", required=True,
                   help="default scheme, e.g. w8, w4g64, w4g32-asym, w3g64, nf4g64, fp8 (see `schemes`)")
    q.add_argument("--override", action="append", default=[], metavar="REGEX=SCHEME",
                   help="per-layer scheme: layers whose full name the regex is found in get SCHEME, e.g. "
                        "'down_proj=w8' or 'layers\\.0\\.=w8' (repeatable; the last match wins)")
    q.add_argument("--method", default=default_of(QuantSpec, "method"),
                   help="rtn, hqq (data-free); gptq, awq, awq+gptq (= awq with quantizer=gptq), smoothquant "
                        "(calibrated); transforms take --param quantizer=rtn|gptq and --param gptq.KEY=VALUE")
    q.add_argument("-o", "--out", help="artifact folder (default: ./out/<model>-<scheme>-<method>)")
    q.add_argument("--clip-search", action="store_true", help="RTN: MSE-optimal clipping search per group")
    q.add_argument("--no-act-order", action="store_true",
                   help="GPTQ (gptq, or a transform with quantizer=gptq): plain column order instead of "
                        "decreasing Hessian diagonal")
    q.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    q.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="keep matching layers (repeatable)")
    q.add_argument("--quantize-head", action="store_true", help="also quantize lm_head")
    q.add_argument("--seed", type=int, default=default_of(QuantSpec, "seed"))
    q.add_argument("--calib", default=default_of(QuantSpec, "calib"), help="calibration data spec (methods using data)")
    q.add_argument("--calib-samples", type=int, default=default_of(QuantSpec, "calib_samples"))
    q.add_argument("--calib-seqlen", type=int, default=default_of(QuantSpec, "calib_seqlen"))
    q.add_argument("--force", action="store_true", help="replace an existing output folder")
    q.set_defaults(func=cmd_quantize)

    s = sub.add_parser("search", help="mixed precision: a scheme per layer group under a bits or quality budget")
    _add_search_options(s)
    s.set_defaults(func=cmd_search)

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
    b.add_argument("model", nargs="?", help="built-in name, HF folder or quantship artifact (with --url: only its "
                   "tokenizer is used; default: the served model's)")
    b.add_argument("--url", help="measure a running OpenAI-compatible server over HTTP instead (load modes)")
    b.add_argument("--api-key-file", help="with --url: file holding the server's API key")
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

    bud = sub.add_parser("budget", help="error budgets").add_subparsers(metavar="ACTION")
    bi = bud.add_parser("init", help="write the default budget template (docs/gate.md)")
    bi.add_argument("-o", "--out", default="budget.yaml")
    bi.add_argument("--force", action="store_true", help="replace an existing file")
    bi.set_defaults(func=cmd_budget_init)

    g = sub.add_parser("gate", help="judge a candidate against its baseline under an error budget (exit 0 pass, "
                                    "1 fail, 2 could not decide)")
    g.add_argument("baseline", help="built-in name, HF folder or artifact")
    g.add_argument("candidate", help="artifact (or any model folder)")
    g.add_argument("--budget", required=True, help="budget YAML (quantship budget init writes a template)")
    g.add_argument("--eval-json", action="append", default=[], help="reuse this `quantship eval --json` file")
    g.add_argument("--bench-json", action="append", default=[],
                   help="reuse this `quantship bench --json` file (repeatable: baseline and candidate) or a gate's")
    g.add_argument("--json", help="write the decision as JSON")
    g.add_argument("--max-windows", type=int, default=None, help="override the budget's eval.max_windows")
    g.add_argument("--limit", type=int, default=None, help="override the budget's eval.limit (items per suite)")
    g.add_argument("--text", action="append", default=None, help="override the budget's eval.texts (repeatable)")
    g.set_defaults(func=cmd_gate)

    r = sub.add_parser("release", help="walk a recipe's ladder of candidates; ship the first that holds the budget")
    r.add_argument("recipe", help="recipe YAML (docs/gate.md)")
    r.add_argument("-o", "--out", required=True, help="run folder (rerun: finished rungs are reused)")
    r.set_defaults(func=cmd_release)

    rp = sub.add_parser("reproduce", help="re-quantize an artifact from its manifest and compare every tensor "
                                          "(exit 0 identical, 1 different)")
    rp.add_argument("artifact")
    rp.add_argument("--json", help="write the comparison as JSON")
    rp.set_defaults(func=cmd_reproduce)

    rep = sub.add_parser("report", help="a release run as one self-contained HTML page and a markdown summary")
    rep.add_argument("run_dir")
    rep.add_argument("-o", "--out", default=None, help="HTML file (default RUN_DIR/report.html); report.md beside it")
    rep.set_defaults(func=cmd_report)

    s = sub.add_parser("serve", help="OpenAI-compatible server: one model, or a baseline and a candidate under a "
                       "guarded rollout (canary, shadow, live budget, rollback)")
    s.add_argument("model", nargs="?", help="built-in name, HF folder or quantship artifact (one-model mode)")
    s.add_argument("--baseline", help="rollout mode: the model answering by default")
    s.add_argument("--candidate", help="rollout mode: the model being rolled out")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", help="file holding the API key clients send as 'Authorization: Bearer KEY'")
    s.add_argument("--admin-key-file", help="file holding the key of the /admin routes (default: the API key)")
    s.add_argument("--canary", type=float, default=10.0, help="percent of requests answered by the candidate")
    s.add_argument("--shadow", type=float, default=0.0, help="percent of requests also scored on the other model")
    s.add_argument("--sticky-header", help="request header whose value pins a user to one side (hashed)")
    s.add_argument("--budget", help="live budget YAML: breaches roll the candidate back")
    s.add_argument("--state-dir", help="where the rollout state is kept (restored on restart)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together per engine")
    s.add_argument("--max-seq-len", type=int, default=None, help="context per request (default: the model's, <= 2048)")
    s.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    s.add_argument("--shadow-queue", type=int, default=64, help="shadow comparisons waiting before new ones are dropped")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    s.add_argument("--served-model-name", help="the model id clients use (default: the baseline folder's name)")
    s.set_defaults(func=cmd_serve)
    return p


def _add_search_options(s: argparse.ArgumentParser) -> None:
    from .search.spec import SearchSpec

    def d(name):
        return default_of(SearchSpec, name)

    s.add_argument("model", help="built-in name or local Hugging Face folder")
    s.add_argument("--ladder", default=",".join(d("ladder")), metavar="LIST",
                   help="schemes a layer group may take, comma-separated (default %(default)s)")
    s.add_argument("--method", default=d("method"), help="how the chosen mix is quantized (rtn, hqq, gptq, ...)")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="method parameter (repeatable)")
    target = s.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-bpw", type=float, help="bits budget: the quantized layers' bits per weight")
    target.add_argument("--budget", metavar="YAML", help="quality budget file (kld_mean: the least bits that hold it)")
    s.add_argument("--calib", default=d("calib"), help="calibration data spec (default: news:0.7,code:0.3 calib splits)")
    s.add_argument("--calib-samples", type=int, default=d("calib_samples"))
    s.add_argument("--calib-seqlen", type=int, default=d("calib_seqlen"))
    s.add_argument("--sensitivity", default=d("sensitivity"), help="fisher (proxy, one backward per sample) or kld "
                                                                   "(measured: one forward per group x rung)")
    s.add_argument("--max-iters", type=int, default=d("max_iters"), help="quantize-measure-promote iterations")
    s.add_argument("--seed", type=int, default=d("seed"))
    s.add_argument("-o", "--out", help="artifact folder of the chosen mix (default: ./out/<model>-search-<method>)")
    s.add_argument("--force", action="store_true", help="replace an existing output folder")
    s.add_argument("--json", help="write the search (sensitivities, iterations, per-layer table) as JSON")


def cmd_serve(args) -> int:
    from .serve.app import ServeConfig, read_key_file, serve
    from .serve.live_budget import load_live_budget

    if args.model and (args.baseline or args.candidate):
        raise ValueError("give MODEL, or --baseline B --candidate C, not both")
    baseline = args.model or args.baseline
    if not baseline:
        raise ValueError("give a model to serve: quantship serve MODEL, or --baseline B --candidate C")
    if args.candidate is None and args.budget:
        raise ValueError("--budget needs a --candidate (the live budget watches a rollout)")
    config = ServeConfig(
        baseline=baseline, candidate=args.candidate, host=args.host, port=args.port,
        api_key=read_key_file(args.api_key_file), admin_key=read_key_file(args.admin_key_file),
        canary=args.canary, shadow=args.shadow, sticky_header=args.sticky_header,
        budget=load_live_budget(args.budget) if args.budget else None, state_dir=args.state_dir,
        max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
        shadow_queue=args.shadow_queue, max_body_bytes=args.max_body_bytes,
        served_model_name=args.served_model_name)
    serve(config)
    return 0


def _add_bench_options(b: argparse.ArgumentParser) -> None:
    from .specs import KV_KINDS, BenchSpec

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
    p.add_argument("--suites", default=",".join(default_of(EvalSpec, "suites")), metavar="LIST",
                   help="task suites, comma-separated: code,math,json,qa,long,multilingual,refusal or all")
    p.add_argument("--suite-file", action="append", default=[], metavar="JSONL",
                   help="your own suite (repeatable; format in docs/evaluation.md)")
    p.add_argument("--full", action="store_true", help="full suites (e.g. all 164 HumanEval problems)")
    p.add_argument("--limit", type=int, default=default_of(EvalSpec, "limit"), help="at most this many items per suite")
    p.add_argument("--items-dir", default=None, help="write per-item results (JSONL) here")
    p.add_argument("--seed", type=int, default=default_of(EvalSpec, "seed"))


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

    from .methods.registry import get_method, resolve_alias

    params = dict(parse_method_params(args.param))
    flags = {}
    if args.clip_search:
        flags["clip_search"] = True
    if args.no_act_order:
        flags["act_order"] = False
    name, resolved = resolve_alias(args.method, params)
    method = get_method(name)
    if flags and method.is_transform:  # the flags are the weight quantizer's parameters
        quantizer = resolved.get("quantizer", method.default_quantizer)
        flags = {f"{quantizer}.{key}": value for key, value in flags.items()}
    return {**params, **flags}


def cmd_quantize(args) -> int:
    from . import api
    from .artifact import read_manifest
    from .report import console, quant_table

    out = args.out or str(Path("out") / f"{Path(args.model).name}-{args.scheme}-{args.method}")
    path = api.quantize(args.model, args.scheme, method=args.method, out=out, overwrite=args.force,
                        method_params=_method_params(args), overrides=args.override, ignore=tuple(args.ignore),
                        quantize_head=args.quantize_head, seed=args.seed, calib=args.calib,
                        calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                        reclaim_memory=True)  # one-shot process: the float model is dropped anyway
    manifest = read_manifest(path)
    console.print(quant_table(manifest, str(path)))
    print(f"wrote {path} (content sha256 {manifest['content_sha256'][:16]}…, "
          f"quantized in {manifest['timings']['quantize_s']:.1f} s)")
    return 0


def cmd_search(args) -> int:
    from .fsutil import atomic_write_json
    from .search.budget import read_kld_budget
    from .search.loop import SearchSpec, run_search
    from .specs import parse_method_params

    spec = SearchSpec(model=args.model, ladder=tuple(args.ladder.split(",")), method=args.method,
                      method_params=parse_method_params(args.param), max_bpw=args.max_bpw,
                      max_kld=read_kld_budget(args.budget) if args.budget else None, calib=args.calib,
                      calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, sensitivity=args.sensitivity,
                      max_iters=args.max_iters, seed=args.seed)
    out = args.out or str(Path("out") / f"{Path(args.model).name}-search-{args.method}")
    result = run_search(spec, out=out, overwrite=args.force)
    final = result.final
    counts = ", ".join(f"{n} x{c}" for n, c in final.to_json(result.rungs, result.groups)["schemes"].items())
    print(f"chosen mix (iteration {final.index}): {final.bits_per_weight:.4f} bits per weight, predicted KLD "
          f"{final.predicted:.5f}, measured {final.measured:.5f}; layers: {counts}")
    if spec.max_kld is not None and not final.holds:
        print(f"no mix of the ladder held kld_mean <= {spec.max_kld}; wrote the closest", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, result.to_json())
        print(f"wrote {args.json}")
    print(f"wrote {result.artifact} (search took {result.timings['wall_s']:.1f} s)")
    return 0 if final.holds or spec.max_bpw is not None else 1


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
    suites = tuple(s.strip() for s in args.suites.split(",") if s.strip())
    return EvalSpec(ctx=args.ctx, max_windows=args.max_windows, batch_size=args.batch_size, texts=args.text or (),
                    suites=suites, suite_files=args.suite_file, full=args.full, limit=args.limit, seed=args.seed)


def _print_reports(reports, *, kld: bool = True) -> None:
    from .evaluate.tasks import render_tables
    from .report import console, kld_table

    for report in reports:
        if kld:
            console.print(kld_table(report, report.candidate.name))
        if report.tasks is not None:
            render_tables(report.tasks.as_dict(), console=console)


def _write_json(path: str, reports) -> None:
    from .evaluate.results import reports_to_json
    from .fsutil import atomic_write_json

    atomic_write_json(path, reports_to_json(reports))
    print(f"wrote {path}")


def cmd_eval(args) -> int:
    from .evaluate.run import evaluate_models
    from .report import console, eval_table

    if args.require_signature:  # before any model is loaded: every candidate signed by this key
        from .models.load import resolve_model
        from .signing import verify_signature

        for candidate in args.candidates:
            verify_signature(resolve_model(candidate), args.require_signature)
    reports = evaluate_models(args.baseline, args.candidates, _eval_spec(args), items_dir=args.items_dir)
    _print_reports(reports)
    console.print(eval_table(reports, title=f"{args.baseline} vs candidates (ctx {args.ctx}, second half scored)"))
    if args.json:
        _write_json(args.json, reports)
    return 0


def cmd_demo(args) -> int:
    from .evaluate.run import run_demo
    from .report import console, eval_table

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    reports = run_demo(args.model, schemes, _eval_spec(args), out_dir=args.out_dir, items_dir=args.items_dir)
    _print_reports(reports, kld=False)
    console.print(eval_table(reports, title=f"{args.model}: RTN candidates vs fp32 baseline "
                                            f"(news eval split, ctx {args.ctx}, second half scored)",
                             baseline_size=True))
    if args.json:
        _write_json(args.json, reports)
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
    from .bench.report import render_bench
    from .bench.run import run_bench
    from .report import console
    from .specs import BenchSpec

    if args.url:
        return _bench_http(args)
    if not args.model:
        raise ValueError("give a model to benchmark, or --url of a running server")
    spec = BenchSpec(model=args.model, concurrency=args.concurrency, request_rate=args.request_rate,
                     num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                     range_ratio=args.range_ratio, kv=args.kv, max_batch=args.max_batch, repeats=args.repeats,
                     warmup=args.warmup, slo=args.slo, seed=args.seed, price_per_hour=args.price_per_hour,
                     measure_bandwidth=not args.no_bandwidth)
    result = run_bench(spec).to_json()
    console.print(render_bench(result))
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def _bench_http(args) -> int:
    import json

    from .bench.http import run_http_bench
    from .serve.app import read_key_file
    from .specs import BenchSpec

    spec = BenchSpec(model=args.model or args.url, concurrency=args.concurrency, request_rate=args.request_rate,
                     num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                     range_ratio=args.range_ratio, warmup=args.warmup, slo=args.slo, seed=args.seed)
    result = run_http_bench(args.url, spec, api_key=read_key_file(args.api_key_file), model=args.model)
    keys = ("completed", "failed", "duration_s", "request_throughput", "output_tok_s", "ttft_s", "tpot_s", "itl_s",
            "e2e_s")
    print(json.dumps({k: result.get(k) for k in keys}, indent=1))
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 1 if result["failed"] else 0


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

def cmd_budget_init(args) -> int:
    from .fsutil import atomic_write_text
    from .gate.budget import DEFAULT_TEMPLATE

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} already exists; pass --force to replace it", file=sys.stderr)
        return 1
    atomic_write_text(out, DEFAULT_TEMPLATE)
    print(f"wrote {out}")
    return 0


def cmd_gate(args) -> int:
    """Exit 0 pass, 1 fail, 2 could not decide."""
    from .gate.budget import BudgetError, load_budget
    from .gate.run import GateError, run_gate
    from .gate.table import gate_table
    from .report import console

    try:
        budget = load_budget(args.budget)
        overrides = {"max_windows": args.max_windows, "limit": args.limit,
                     "texts": tuple(args.text) if args.text else None}
        result = run_gate(args.baseline, args.candidate, budget, eval_json=args.eval_json, bench_json=args.bench_json,
                          eval_overrides=overrides)
    except (BudgetError, GateError, ValueError, OSError, RuntimeError) as e:
        print(f"error: could not decide: {e}", file=sys.stderr)
        return 2
    decision = result.decision
    console.print(gate_table(decision, f"gate: {args.candidate} vs {args.baseline} ({args.budget})"))
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result.to_json())
        print(f"wrote {args.json}")
    if decision.passed:
        print(f"PASS: all {len(decision.terms)} terms hold")
        return 0
    print(f"FAIL: {', '.join(t.name for t in decision.failed)}")
    return 1


def cmd_release(args) -> int:
    from .gate.budget import BudgetError
    from .gate.release import RecipeError, run_release
    from .gate.run import GateError

    try:
        decision = run_release(args.recipe, args.out)
    except (RecipeError, BudgetError, GateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if decision["chosen"] else 1


def cmd_reproduce(args) -> int:
    from .gate.reproduce import ReproduceError, reproduce

    try:
        result = reproduce(args.artifact)
    except ReproduceError as e:
        print(f"error: cannot reproduce: {e}", file=sys.stderr)
        return 2
    if args.json:
        from .fsutil import atomic_write_json

        atomic_write_json(args.json, result)
    if result["identical"]:
        print(f"IDENTICAL: {result['tensors']} tensors byte-identical ({args.artifact})")
        return 0
    print(f"DIFFERENT: {len(result['differ'])} of {result['tensors']} tensors differ")
    for d in result["differ"][:20]:
        print(f"  {d['name']}: {d['why']}")
    return 1


def cmd_report(args) -> int:
    from .report.html import write_reports

    html, md = write_reports(args.run_dir, args.out)
    print(f"wrote {html}\nwrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
