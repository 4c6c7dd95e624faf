"""The engine's owner: the loop thread (concurrent submit, cancel, shutdown, a step that raises), step
hooks, incremental detokenization and the non-finite logits count, on tiny random-init models."""

from __future__ import annotations

import asyncio
import gc
import json
import threading

import pytest
import torch

from quantship.engine import Engine, EngineDeadError, SamplingParams
from quantship.engine.detok import IncrementalDetokenizer

from conftest import build_tiny_model, make_tokenizer

PROMPTS = ["The quick brown fox", "def add(a, b):", "Quantization maps real numbers", "Perplexity",
           "lazy dog", "return a + b"]
WAIT_S = 60.0  # bound on every wait: a hang fails the test instead of stalling the suite


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("llama", seed=3)


def alone(model, tok, prompt, params) -> list[int]:
    """The request's tokens through the bare core, on an engine of its own, batch 1."""
    engine = Engine(model, tok, max_batch=1, fast=False)
    rid = engine.add_request(prompt, params)
    out = []
    while engine.has_unfinished():
        out += [ev.token_id for ev in engine.step() if ev.request_id == rid]
    return out


def in_thread(fn, *args):
    """Run fn in a thread, bounded by WAIT_S -> its result (or its exception, re-raised here)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT_S)
    assert not t.is_alive(), f"{fn.__name__} did not return within {WAIT_S} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def decode_full(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ----- the loop -----------------------------------------------------------------------------------
def test_concurrent_submits_from_threads_each_get_exactly_their_own_tokens(tiny):
    model, tok = tiny
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (9, 4, 12, 6, 3, 10)]
    expected = [alone(model, tok, p, sp) for p, sp in zip(PROMPTS, params)]
    engine = Engine(model, tok, max_batch=3, fast=False)  # 6 requests, 3 slots: some wait, slots compact
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(3)

    def client(indices):
        barrier.wait()  # all three threads submit at once
        streams = [(i, engine.submit(PROMPTS[i], params[i], request_id=f"c{i}")) for i in indices]
        for i, stream in streams:
            events = list(stream)
            results[i] = (events, stream.result())

    with engine:
        threads = [threading.Thread(target=client, args=(ix,)) for ix in ([0, 3], [1, 4], [2, 5])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert not any(t.is_alive() for t in threads)
    for i, (events, out) in results.items():
        assert [ev.token_id for ev in events] == expected[i] == list(out.token_ids)
        assert {ev.request_id for ev in events} == {f"c{i}"}
        assert [ev.finished for ev in events] == [False] * (len(events) - 1) + [True]
        assert out.finish_reason == "length" and out.prompt_tokens == len(tok(PROMPTS[i])["input_ids"])
        assert "".join(ev.text for ev in events) == out.text == decode_full(tok, expected[i])
    assert len(results) == 6 and not engine.loop_running and not engine.has_unfinished()


def test_generate_and_stream_run_on_the_loop_and_leave_no_thread(tiny):
    model, tok = tiny
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    engine = Engine(model, tok, max_batch=2, fast=False)
    before = threading.active_count()
    assert in_thread(engine.generate, PROMPTS[:3], params) == [alone(model, tok, p, params) for p in PROMPTS[:3]]
    events = list(engine.stream(PROMPTS[0], params))
    assert [e.token_id for e in events] == alone(model, tok, PROMPTS[0], params)
    assert not engine.loop_running and threading.active_count() == before
    engine.add_request(PROMPTS[0], params)  # the bare core is free again
    assert engine.step()
    with pytest.raises(RuntimeError, match="add_request"):
        engine.generate([PROMPTS[1]], params)  # would run the core's request with nobody to read it
    engine.abort_all()
    # two threads generating at once share one loop, each gets its own outputs
    outs = {}
    threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, engine.generate([PROMPTS[i]], params)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert outs == {i: [alone(model, tok, PROMPTS[i], params)] for i in range(2)}


def test_cancel_frees_the_slot_and_ends_the_stream_cancelled(tiny):
    model, tok = tiny
    long, short = SamplingParams(max_tokens=200, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)
    engine = Engine(model, tok, max_batch=1, fast=False)
    sizes = []
    engine.add_step_hook(lambda s: sizes.append(s.batch_size))
    with engine:
        running = engine.submit(PROMPTS[0], long)
        waiting = engine.submit(PROMPTS[1], long)  # no free slot: waits
        it = iter(running)
        first = next(it)
        assert first.token_id is not None and not first.finished
        waiting.cancel()
        engine.cancel(running.request_id)
        rest = in_thread(list, it)
        assert rest[-1].finished and rest[-1].finish_reason == "cancelled" and rest[-1].token_id is None
        assert len(running.token_ids) < 200 and running.result().finish_reason == "cancelled"
        assert in_thread(waiting.result).finish_reason == "cancelled" and waiting.result().token_ids == ()
        # the one slot is free: a new request runs to its end with the tokens it gets alone
        assert list(in_thread(engine.submit(PROMPTS[2], short).result).token_ids) == alone(model, tok, PROMPTS[2], short)
        engine.cancel("no-such-request")  # unknown ids are ignored
    assert not engine.has_unfinished() and max(sizes) == 1


def test_an_abandoned_async_stream_cancels_its_request(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, fast=False)
    short = SamplingParams(max_tokens=3, ignore_eos=True)

    async def client():
        stream = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True),
                               loop=asyncio.get_running_loop())
        got = []
        async for ev in stream:  # a client that disconnects after two tokens
            got.append(ev)
            if len(got) == 2:
                break
        after = engine.submit(PROMPTS[3], short, loop=asyncio.get_running_loop())
        return stream, await asyncio.wait_for(after.aresult(), WAIT_S)

    with engine:
        stream, after = asyncio.run(client())
    assert len(stream.token_ids) == 2 and not stream.finished  # never read to the end...
    assert list(after.token_ids) == alone(model, tok, PROMPTS[3], short)  # ...but its slot was freed
    with pytest.raises(TypeError, match="async for"):
        list(stream)


def test_the_loop_shuts_down_cleanly_and_the_engine_stays_usable(tiny):
    model, tok = tiny
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    engine = Engine(model, tok, max_batch=2, fast=False).start()
    thread = engine._box.thread
    stream = engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
    next(iter(stream))
    engine.shutdown(timeout=WAIT_S)
    assert not thread.is_alive() and not engine.loop_running
    assert in_thread(stream.result).finish_reason == "cancelled"
    assert not engine.running and not engine.waiting
    with pytest.raises(RuntimeError, match="not running"):
        engine.submit(PROMPTS[0], params)
    engine.shutdown()  # twice is fine
    assert alone(model, tok, PROMPTS[1], params) == engine.generate([PROMPTS[1]], params)[0]
    with engine:  # restarts
        with pytest.raises(RuntimeError, match="loop owns"):
            engine.add_request(PROMPTS[0], params)
        with pytest.raises(ValueError, match="already in flight"):
            engine.submit(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), request_id="x")
            engine.submit(PROMPTS[0], params, request_id="x")
    # a started engine nobody holds is freed, and its thread ends
    engine = Engine(model, tok, fast=False).start()
    thread = engine._box.thread
    del engine
    gc.collect()
    thread.join(WAIT_S)
    assert not thread.is_alive()


def test_an_exception_inside_a_step_reaches_every_waiting_request(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, fast=False)
    calls = {"n": 0}
    decode = engine.forward.decode

    def failing_decode(ids, positions, cache):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return decode(ids, positions, cache)

    engine.forward.decode = failing_decode
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    with engine:
        streams = [engine.submit(p, params) for p in PROMPTS[:3]]  # two running, one waiting
        for stream in streams:
            with pytest.raises(EngineDeadError, match="boom") as info:
                in_thread(stream.result)
            assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.dead and str(engine.error) == "boom"
        with pytest.raises(EngineDeadError):
            engine.submit(PROMPTS[0], params)
    assert not engine.loop_running
    with pytest.raises(EngineDeadError):
        engine.generate([PROMPTS[0]], params)
    with pytest.raises(EngineDeadError):
        engine.step()
    # the bare core: the step's own exception propagates, then the engine is dead too
    bare = Engine(model, tok, fast=False)
    bare.forward.decode = failing_decode
    calls["n"] = 2
    bare.add_request(PROMPTS[0], params)
    with pytest.raises(RuntimeError, match="boom"):
        bare.step()
    assert bare.dead
    with pytest.raises(EngineDeadError):
        bare.add_request(PROMPTS[0], params)


# ----- hooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("driver", ["bare", "loop"])
def test_step_hooks_see_every_forward_with_its_batch_size(tiny, driver):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4, fast=False)
    steps = []
    lengths = [2, 4, 6]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    with engine.step_hook(steps.append):
        if driver == "bare":
            for p, sp in zip(PROMPTS, params):
                engine.add_request(p, sp)
            while engine.has_unfinished():
                engine.step()
        else:
            in_thread(engine.generate, PROMPTS[:3], params)
    prompt_lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS[:3]]
    assert [(s.kind, s.batch_size, s.tokens) for s in steps[:3]] == [("prefill", 1, n) for n in prompt_lens]
    # each prefill gives one token; a decode adds one to every running request; a request leaves at its max_tokens
    assert [(s.kind, s.batch_size, s.tokens) for s in steps[3:]] == [("decode", b, b) for b in (3, 2, 2, 1, 1)]
    assert all(s.duration_s > 0 for s in steps)
    assert all(a.start + a.duration_s <= b.start for a, b in zip(steps, steps[1:]))  # in order, not overlapping
    engine.generate([PROMPTS[0]], params[0])
    assert len(steps) == 8  # removed on leaving the block


# ----- detokenization ---------------------------------------------------------------------------
MULTIBYTE = "naïve café — 日本語 🚀 ok"


def sentencepiece_tokenizer():
    """A Llama-style tokenizer: Metaspace words, byte fallback for characters outside the vocab, a decoder
    that drops the first word's space (so decoding a window alone differs from decoding it in context)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|eos|>"],
                                                            show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte tokens are ordinary vocabulary entries (skip_special_tokens keeps them)
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<|eos|>"])
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_detokenization_matches_the_full_decode(kind):
    tok = make_tokenizer() if kind == "byte-level" else sentencepiece_tokenizer()
    ids = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    assert decode_full(tok, ids).strip() == MULTIBYTE  # the tokenizer round-trips the text
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == decode_full(tok, ids)
    assert not any("\ufffd" in p for p in pieces)  # never a partial character
    assert "" in pieces[:-1]  # some tokens were held back: a character spans several tokens
    # every prefix: what was emitted is whole characters of the text; plus what flush() gives, it is the prefix's
    # full decode (for byte fallback only where the prefix ends on a character: decoding a cut run of byte
    # tokens replaces every byte of the run, characters already complete and streamed included)
    for n in range(1, len(ids) + 1):
        d = IncrementalDetokenizer(tok)
        emitted = "".join(d.push(t) for t in ids[:n])
        assert MULTIBYTE.startswith(emitted.lstrip()) and "\ufffd" not in emitted
        if kind == "byte-level" or "\ufffd" not in decode_full(tok, ids[:n]):
            assert emitted + d.flush() == decode_full(tok, ids[:n])
    # a special token in the middle decodes to nothing and does not disturb the text around it
    eos = tok.convert_tokens_to_ids("<|eos|>")
    d = IncrementalDetokenizer(tok)
    with_eos = ids[:3] + [eos] + ids[3:]
    assert "".join(d.push(t) for t in with_eos) + d.flush() == decode_full(tok, with_eos)


def test_the_engine_streams_multibyte_text_whole(tiny, monkeypatch):
    import quantship.engine.engine as engine_module

    model, tok = tiny
    script = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    picks = iter(script + script)
    monkeypatch.setattr(engine_module, "sample_token", lambda *a, **k: next(picks))  # the model "says" the text
    engine = Engine(model, tok, fast=False)
    events = list(engine.stream(PROMPTS[0], SamplingParams(max_tokens=len(script), ignore_eos=True)))
    assert [e.token_id for e in events] == script
    assert "".join(e.text for e in events) == MULTIBYTE and not any("\ufffd" in e.text for e in events)
    # a stop string inside a multi-byte run: the text ends just before it
    events = list(engine.stream(PROMPTS[0], SamplingParams(max_tokens=len(script), stop=("語",), ignore_eos=True)))
    assert events[-1].finish_reason == "stop" and "".join(e.text for e in events) == MULTIBYTE.split("語")[0]


# ----- non-finite logits ----------------------------------------------------------------------
def test_non_finite_logits_are_counted_per_request_and_per_engine(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, fast=False)
    decode, calls = engine.forward.decode, {"n": 0}

    def decode_with_an_inf(ids, positions, cache):
        logits = decode(ids, positions, cache).clone()  # an inference tensor: written to outside inference mode
        calls["n"] += 1
        if calls["n"] == 2:
            logits[0, 5] = float("inf")  # slot 0's second decode position only
        return logits

    engine.forward.decode = decode_with_an_inf
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    with engine:
        a, b = engine.submit(PROMPTS[0], params), engine.submit(PROMPTS[1], params)
        out_a, out_b = in_thread(a.result), in_thread(b.result)
    assert (out_a.nonfinite_logits, out_b.nonfinite_logits, engine.nonfinite_logits) == (1, 0, 1)
    # a model whose logits are all NaN: every sampled position counts
    broken = Engine(model, tok, fast=False)
    broken.forward.decode = lambda ids, positions, cache: torch.full((ids.shape[0], len(tok)), float("nan"))
    events = list(broken.stream(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True)))
    assert [e.nonfinite_logits for e in events] == [0, 1, 2, 3]  # the prefill's logits were finite
    assert broken.nonfinite_logits == 3
