"""`jaxlm serve` through the official openai client, against one in-process server on
127.0.0.1 (uvicorn in a thread) over a tiny checkpoint, one engine for the module."""

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
try:  # the HTTP client the openai package is built on
    import httpx
except ImportError:
    httpx = pytest.importorskip("httpx2")

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SETTINGS = ["model.max_seq_len=96", "mesh.devices=1", "serve.slots=8", "serve.max_tokens=24",
            "serve.page_size=8", "serve.max_queue=48", "serve.steps_per_call=4",
            "serve.max_top_k=8", "generate.max_new_tokens=16"]
KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["def main(", "import os\nimport sys\n", "class Foo:", "return self.",
           "for i in range(", "    if x is None:\n        "]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(tiny_checkpoint("llama"), path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def served(checkpoint):
    """(Server, base_url, port) of one server for the module."""
    from jaxlm.infer.serve import load_served, start, uvicorn_server
    s, run, mesh = load_served(checkpoint, SETTINGS)
    server = start(s, mesh, run.mesh.rules, api_key=KEY)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn_server(server, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if uv.started:
            break
        time.sleep(0.05)
    yield server, f"http://127.0.0.1:{port}/v1"
    uv.should_exit = True
    thread.join(timeout=30)
    server.worker.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1], api_key=KEY, max_retries=0)


def pool_whole(server, timeout=10.0):
    """Wait until no request runs; the page pool is then whole: free + cached = total."""
    eng = server.worker.engine
    deadline = time.time() + timeout
    while time.time() < deadline and (server.worker.jobs or eng.busy):
        time.sleep(0.02)
    time.sleep(0.1)
    pool = eng.pool
    assert pool.in_use() == 0
    assert sum(map(len, pool.free)) + pool.n_cached() == pool.n_pages


def test_completions_streamed_and_not(served, client):
    server, _ = served
    out = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0)
    assert out.object == "text_completion" and len(out.choices) == 1
    text = out.choices[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens >= 2
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens
    # the same text as the engine gives through jaxlm.generate on the checkpoint's ids
    s = server.s
    ids = [s.tokenizer.bos_id] + s.tokenizer.encode(PROMPTS[0])
    import jaxlm
    ref = jaxlm.generate(s.params, s.cfg, [ids], max_new_tokens=12, eos_id=list(s.eos_ids))
    assert text == s.detokenize(ref.sequences()[0])


def test_chat_streamed_and_not_n3(client):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def f(x):"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0)
    text = out.choices[0].message.content
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    three = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=1.0, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=1.0, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content
                                                          for c in three.choices]
    assert len({c.message.content for c in three.choices}) > 1  # n distinct samples


@pytest.mark.parametrize("hold", [0, 2])
def test_streamed_text_of_characters_split_over_byte_tokens(sp_tokenizer, hold):
    """Characters outside the vocabulary arrive as one byte token each (sentencepiece's
    byte fallback), and their first bytes decode to one U+FFFD each: the streamed
    deltas, a token at a time, still concatenate to the tokenizer's text of them all."""
    from jaxlm.infer.text import TextDeltas
    ids = sp_tokenizer.encode("x = '中文' + 'ü€' # ok")
    assert len(ids) > 12  # the CJK / symbol characters as byte tokens
    deltas = TextDeltas(sp_tokenizer.decode, hold)
    text = "".join(deltas.push([i]) for i in ids[:-1])
    text += deltas.push(ids[-1:], sp_tokenizer.decode(ids), done=True)
    assert text == sp_tokenizer.decode(ids)


def test_stop_strings_honoured_not_returned(client):
    free = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20,
                                     temperature=0).choices[0].text
    assert len(free) > 4
    stop = free[3:5]
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20,
                                    temperature=0, stop=[stop])
    assert out.choices[0].text == free[:free.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20,
                                         temperature=0, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_logprobs_match_forward(served, client):
    """Each token's log-prob and the top 3 equal a recomputation by jaxlm.forward."""
    import jaxlm
    s = served[0].s
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8,
                                    temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert 1 <= len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs)
    ids = [s.tokenizer.bos_id] + s.tokenizer.encode(PROMPTS[2])
    width = s.cfg.max_seq_len  # one shape: causal, the padding after is never seen
    forward = jax.jit(lambda t: jaxlm.forward(s.params, s.cfg, t)[0])
    for i in range(len(lp.token_logprobs)):
        row = np.zeros((1, width), np.int32)
        row[0, :len(ids)] = ids
        logp = np.asarray(jax.nn.log_softmax(forward(jnp.asarray(row))[0, len(ids) - 1]))
        token = int(np.argmax(logp))  # greedy: the token the server chose
        assert lp.tokens[i] == s.detokenize([token])
        np.testing.assert_allclose(lp.token_logprobs[i], logp[token], atol=1e-4)
        np.testing.assert_allclose(sorted(lp.top_logprobs[i].values(), reverse=True),
                                   np.sort(logp)[::-1][:3], atol=1e-4)
        ids.append(token)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x = "}], max_tokens=4,
        temperature=0.8, seed=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content


def test_json_schema_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"},
                                               "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "give json"}], max_tokens=24,
        temperature=1.0, seed=1, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "ab",
                                                                "schema": schema}})
    for c in out.choices:
        jsonschema.validate(json.loads(c.message.content), schema)


@pytest.mark.parametrize("body,fragment", [
    ({"model": "tiny", "prompt": 5}, "'prompt'"),
    ({"model": "nope", "prompt": "x"}, "does not exist"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "'n'"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -3}, "'max_tokens'"),
    ("{not json", "not valid JSON"),
    ({"model": "tiny", "prompt": "word " * 200}, "maximum context length is 96 tokens"),
])
def test_bad_requests_are_400s(served, body, fragment):
    _, url = served
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/completions", content=data,
                   headers={"content-type": "application/json", **AUTH})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/models", headers=AUTH).json()["data"][0]["id"] == "tiny"


def test_load_equals_batch_infer_and_pool_whole(served, client, checkpoint, tmp_path):
    """40 requests from 16 concurrent clients (lengths varied), 20 more disconnecting
    mid-stream and 50 malformed ones: every request completes once, greedy outputs
    equal batch-infer's, and the pool is whole afterwards."""
    server, url = served
    rng = np.random.default_rng(0)
    words = "def class return import self value index print range None".split()
    prompts = [" ".join(rng.choice(words, int(rng.integers(2, 20)))) for _ in range(40)]
    budgets = [int(rng.integers(2, 20)) for _ in prompts]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
        sem = asyncio.Semaphore(16)

        async def one(p, m):
            async with sem:
                r = await aclient.completions.create(model="tiny", prompt=p, max_tokens=m,
                                                     temperature=0)
                return r.choices[0].text

        async def quitter(p):
            async with httpx.AsyncClient(headers=AUTH, timeout=120) as h:
                async with h.stream("POST", f"{url}/completions", json={
                        "model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0,
                        "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        break  # the first chunk, then hang up

        async def bad(i):
            async with httpx.AsyncClient(headers=AUTH, timeout=120) as h:
                r = await h.post(f"{url}/completions", content=[
                    b"{", b'{"model": "tiny", "prompt": "x", "n": 0}',
                    b'{"model": "tiny", "prompt": "x", "max_tokens": -1}',
                    b'{"model": "other", "prompt": "x"}', b'[1, 2]'][i % 5])
                return r.status_code

        jobs = [one(p, m) for p, m in zip(prompts, budgets)] + [
            quitter(p) for p in prompts[:20]] + [bad(i) for i in range(50)]
        return await asyncio.gather(*jobs)

    got = asyncio.run(main())
    assert got[-50:] == [400] * 50  # malformed requests mixed into the load
    texts = got[:40]
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": m}) + "\n"
                            for i, (p, m) in enumerate(zip(prompts, budgets))))
    from jaxlm.infer.batch import batch_infer
    batch_infer(checkpoint, str(rows), str(tmp_path / "out.jsonl"), batch_size=8,
                overrides=SETTINGS[:2], progress=False)
    want = [json.loads(x)["completion"] for x in (tmp_path / "out.jsonl").read_text().split("\n")
            if x]
    assert texts == want
    pool_whole(server)
    assert server.outstanding == 0


def test_a_non_streamed_client_that_leaves_is_cancelled(served):
    """A client that gives up on a whole (non-streamed) answer: its request is
    cancelled, its slot and pages freed, as a streaming client's is. The engine is held
    after its first round trip, so the request is still running when the client goes."""
    server, url = served
    eng = server.worker.engine
    pool_whole(server)
    running, hold = [], threading.Event()

    def held_step():
        type(eng).step(eng)
        running.extend(r for r in eng.requests if not r.finished and r.slots)
        hold.wait(30)
    eng.step = held_step
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", headers=AUTH, timeout=2.0, json={
                "model": "tiny", "prompt": PROMPTS[3], "max_tokens": 24, "temperature": 0})
        deadline = time.time() + 10
        while server.outstanding and time.time() < deadline:
            time.sleep(0.02)
        assert server.outstanding == 0  # the handler saw the client leave
        assert len(running) == 1 and eng.pool.in_use() > 0  # still in its slot
    finally:
        del eng.step
        hold.set()
    pool_whole(server)
    out = running[0].outputs[0]
    assert out.finish_reason == "abort" and len(out.tokens) < 24


def test_prefix_cache_counts_and_metrics(served, client):
    server, url = served
    eng = server.worker.engine
    system = "You are a careful Python programmer."
    before = dict(eng.stats)
    for q in ("def a():", "def b():", "def c():"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "system", "content": system},
                                    {"role": "user", "content": q}], max_tokens=4,
            temperature=0)
    cached = eng.stats["cached_tokens"] - before["cached_tokens"]
    computed = eng.stats["prefill_tokens"] - before["prefill_tokens"]
    assert cached >= 2 * 16 and computed < eng.stats["prompt_tokens"] - before["prompt_tokens"]
    metrics = httpx.get(url.replace("/v1", "/metrics")).text
    for name in ("jaxlm_requests_running", "jaxlm_requests_queued", "jaxlm_kv_pages_free",
                 "jaxlm_prefix_cache_hit_rate", "jaxlm_time_to_first_token_seconds_bucket",
                 "jaxlm_inter_token_latency_seconds_count",
                 "jaxlm_generation_tokens_per_second"):
        assert name in metrics
    rate = float(next(x for x in metrics.splitlines()
                      if x.startswith("jaxlm_prefix_cache_hit_rate ")).split()[1])
    assert rate == pytest.approx(eng.prefix_hit_rate()) and rate > 0
    pool_whole(server)


def test_api_key_and_health(served):
    _, url = served
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.get(url.replace("/v1", "/health")).status_code == 200


def test_a_full_queue_is_429_with_retry_after(served):
    """100 requests at once on 8 slots + a queue of 48: the rest get 429, none is lost."""
    server, url = served

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=AUTH,
                                     limits=httpx.Limits(max_connections=200)) as h:
            body = {"model": "tiny", "prompt": "def f(", "max_tokens": 16, "temperature": 0}
            return await asyncio.gather(*[h.post(f"{url}/completions", json=body)
                                          for _ in range(100)])

    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    assert codes.count(200) >= 56 and codes.count(429) >= 1 and set(codes) == {200, 429}
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert len({r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}) == 1
    pool_whole(server)
    assert server.outstanding == 0


def test_sigterm_finishes_or_cancels_then_exits_0(checkpoint):
    """`jaxlm serve` under load gets SIGTERM: it stops admitting, every stream ends
    with [DONE] or a clean error event, and it exits 0 within the grace period."""
    grace = 3.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlm.scripts.cli", "serve", "--checkpoint", checkpoint,
         "--port", "0", *[x for x in SETTINGS if "steps_per_call" not in x],
         "serve.steps_per_call=1", f"serve.grace_seconds={grace}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " on http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split(" on ")[1].strip()

        async def main():
            async with httpx.AsyncClient(timeout=60) as h:
                async def one(i):
                    events = []
                    async with h.stream("POST", f"{url}/completions", json={
                            "model": "tiny", "prompt": PROMPTS[i % 6], "max_tokens": 24,
                            "temperature": 0, "stream": True}) as r:
                        if r.status_code != 200:  # refused before it started
                            return r.status_code, [(await r.aread()).decode()]
                        async for x in r.aiter_lines():
                            if x.startswith("data: "):
                                events.append(x[6:])
                                flowing.set()
                    return r.status_code, events

                flowing = asyncio.Event()
                tasks = [asyncio.create_task(one(i)) for i in range(40)]
                await asyncio.wait_for(flowing.wait(), 60)  # tokens are streaming: now
                proc.send_signal(signal.SIGTERM)
                t0 = time.time()
                results = await asyncio.gather(*tasks)
                return results, t0

        results, t0 = asyncio.run(main())
        assert proc.wait(timeout=grace + 10) == 0
        assert time.time() - t0 < grace + 5
        done = errors = 0
        for status, events in results:
            assert status in (200, 503)
            if status == 503:
                errors += 1
                assert json.loads(events[0])["error"]["code"] == "cancelled"
                continue
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            if "error" in last:  # cancelled at the end of the grace period
                errors += 1
                assert last["error"]["code"] == "cancelled"
            else:
                done += 1
                assert last["choices"][0]["finish_reason"] in ("stop", "length")
        assert done + errors == 40  # (how many finish in time depends on the machine)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_processes_serve_the_outputs_of_one(served, client, checkpoint):
    """`jaxlm serve` over 2 processes x 4 CPU devices (jax.distributed on localhost, the
    pool and heads sharded over data x tensor): process 0 serves, process 1 follows its
    engine steps; greedy answers equal the one-device server's, and a SIGTERM that
    reaches only process 1 stops both with exit code 0."""
    import os
    import xla_flags
    from test_multihost import _free_port
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "XLA_FLAGS": xla_flags.for_devices(4), "JAX_PLATFORMS": "cpu"}
    coordinator = f"localhost:{_free_port()}"
    # one page per request: the decode loop compiled at start-up serves them all
    settings = [x for x in SETTINGS if not x.startswith(("mesh.", "serve.page_size",
                                                         "serve.steps_per_call"))] + [
        "mesh.data=2", "mesh.tensor=4", "serve.page_size=32", "serve.steps_per_call=8",
        "serve.sampling=false",
        "serve.penalties=false", "serve.guided=false", "serve.max_logprobs=-1",
        "serve.grace_seconds=5"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxlm.scripts.cli", "serve", "--checkpoint", checkpoint,
         "--port", "0", "--coordinator", coordinator, "--num-processes", "2",
         "--process-id", str(i), *settings], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    watchdog = threading.Timer(300, lambda: [p.kill() for p in procs])  # never hang
    watchdog.start()
    try:
        for line in procs[0].stdout:  # gloo writes its own lines to stdout first
            if " on http://127.0.0.1:" in line:
                break
        assert " on http://127.0.0.1:" in line, procs[0].stderr.read()[-3000:]
        two = openai.OpenAI(base_url=line.split(" on ")[1].strip(), api_key="x",
                            max_retries=0)

        async def ask(url, key):
            aclient = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0)
            outs = await asyncio.gather(*[aclient.completions.create(
                model="tiny", prompt=p, max_tokens=4 + i, temperature=0)
                for i, p in enumerate(PROMPTS[:4])])
            return [o.choices[0].text for o in outs]

        got = asyncio.run(ask(str(two.base_url), "x"))
        want = asyncio.run(ask(served[1], KEY))
        assert got == want and len(set(got)) > 1
        chat = [{"role": "user", "content": "def f(x):"}]
        streamed = two.chat.completions.create(model="tiny", messages=chat, max_tokens=6,
                                               temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
            client.chat.completions.create(model="tiny", messages=chat, max_tokens=6,
                                           temperature=0).choices[0].message.content
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
        assert codes == [0, 0], [p.stderr.read()[-3000:] for p in procs]
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
