"""`jaxlm serve`: an OpenAI-compatible HTTP server over the one engine.

    jaxlm serve --checkpoint runs/sft [--host 127.0.0.1 --port 8000] [--api-key KEY]
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model="sft", messages=[...], stream=True)

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (the checkpoint's chat
template), /health, /metrics (Prometheus text). A Starlette app under uvicorn.

One background thread (`Worker`) owns the `Engine` (`jaxlm.infer.engine`): it adds
the requests the HTTP handlers hand it, steps the engine while any is running, and
feeds each request's tokens back to its handler's asyncio queue
(`call_soon_threadsafe`) as the engine produces them. Each OpenAI field maps onto
the engine's per-request settings (a GenerateConfig): max_tokens, temperature,
top_p, top_k, min_p, seed, n, stop, presence / frequency / repetition penalties,
logprobs / top_logprobs (the engine records each token's log-prob and the k most
likely), response_format json_object / json_schema (a guide, `jaxlm.infer.guided`).
What the compiled loop runs is fixed when the server starts (the serve.* keys);
a request needing what it does not run gets a 400 naming the key.

Load and faults: at most serve.slots running and serve.max_queue waiting requests,
beyond that 429 with Retry-After; a streaming client that disconnects cancels its
request (its slots and pages are freed at the engine's next round trip), and so does
one waiting for a whole (non-streamed) answer; on SIGTERM
the server stops admitting (503), lets in-flight requests finish, cancels what is
left shortly before serve.grace_seconds (those get a clean error), and exits 0.

Multi-process (`jax.distributed`): process 0 serves HTTP; every other process runs a
follower of its engine thread, the same engine steps on the global arrays (`Worker`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Optional

from ..errors import JaxlmError

log = logging.getLogger("jaxlm.serve")

# a request's fields that this server does not implement: refused unless left at
# OpenAI's default, so that no setting is silently dropped
UNSUPPORTED = {"echo": (False, None), "suffix": (None, ""), "logit_bias": (None, {}),
               "best_of": (None, 1), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none")}


class BadRequest(Exception):
    """An OpenAI-shaped error answer: status, message, param, code."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, headers: Optional[dict] = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.status, self.headers = status, headers

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 401: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class Served:
    """What the server serves: the model, its tokenizer and its text settings."""
    name: str  # the model name requests must give
    cfg: Any  # ModelConfig
    params: Any
    tokenizer: Any
    template: Optional[str]  # the chat template (None: /v1/chat/completions refused)
    eos_ids: tuple  # the checkpoint's stop ids (+ generate.stop_ids)
    settings: Any  # the base GenerateConfig (config + generation_config.json defaults)
    sampler_given: frozenset  # sampler keys the config / checkpoint set (else OpenAI's)
    serve: Any  # ServeConfig

    def detokenize(self, ids) -> str:
        from .text import decode_ids
        return decode_ids(self.tokenizer, ids, self.cfg.vocab_size)


def engine_features(s: Served):
    """The compiled loop's Features from the serve.* keys (what any request may use)."""
    from .engine import Features
    from .processors import ProcessorShape
    from .sampling import SamplerShape
    c = s.serve
    sampler = SamplerShape(True, min(c.max_top_k, s.cfg.vocab_size), True, True, True) \
        if c.sampling else SamplerShape()
    return Features(sampler, ProcessorShape(seen=c.penalties, counts=c.penalties),
                    guided=c.guided, logprobs=c.max_logprobs >= 0,
                    top_logprobs=max(c.max_logprobs, 0))


def make_engine(s: Served):
    """The server's one Engine: serve.slots over a paged pool (prefix caching per
    generate.prefix_cache), prompts up to the context, answers up to serve.max_tokens."""
    from .engine import Engine
    c = s.serve
    eng = Engine(s.params, s.cfg, settings=s.settings, max_prompt_len=s.cfg.max_seq_len - 1,
                 max_new_tokens=min(c.max_tokens, s.cfg.max_seq_len - 1), slots=c.slots,
                 cache="paged", page_size=c.page_size, n_pages=c.n_pages or None,
                 steps_per_call=c.steps_per_call, refill_batch=1, page_buckets=True,
                 features=engine_features(s), detokenize=s.detokenize)
    # compile the admission and the decode loop before the first request waits on them
    eng.add([0], max_new_tokens=2, temperature=0.0)
    eng.run()
    eng.forget_finished()
    eng.stats = dict.fromkeys(eng.stats, 0)
    return eng


# ------------------------------------------------------------ the engine thread

class Job:
    """One engine request of an HTTP handler: what to add, and the queue its events
    come back on (("added",), ("error", message), ("event", ...), ("abort", why))."""

    def __init__(self, ids, settings, guide, row_seed: int, eos_ids: tuple,
                 loop: asyncio.AbstractEventLoop):
        self.ids, self.settings, self.guide = ids, settings, guide
        self.row_seed, self.eos_ids = row_seed, eos_ids
        self.loop, self.queue = loop, asyncio.Queue()
        self.request = None  # the engine's Request (the worker thread sets it)
        self.created = time.perf_counter()
        self.done = False  # finished, failed or cancelled
        self.released = False  # no longer counted in Server.outstanding

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is gone (server shutting down)
            pass


class Worker:
    """The thread that owns and steps the engine (module docstring).

    Multi-process (after `jax.distributed`): process 0's worker leads, each other
    process runs a follower (`follow`, in its main thread) over its own Engine on the
    same global arrays. Every round the leader shares what it did to its engine since
    the last round (the requests it added, with their settings and guides, and the
    ones it cancelled) and whether it is stopping; the followers do the same to
    theirs, and every process then runs the same step (its collectives included). The
    leader shares a round at least every half second while idle; a follower's SIGTERM
    travels with a round and stops the leader (`on_stop_wanted`), which then stops
    them all."""

    def __init__(self, make: Callable, context: Callable = None, leader: bool = True):
        import jax
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.engine = None
        self._make, self._context = make, context
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._stop = False
        self.jobs: set = set()  # added and not finished
        self.tokens_total = 0  # generated tokens
        self.recent: deque = deque(maxlen=256)  # (time, tokens) of recent round trips
        self.thread = threading.Thread(target=self._main, name="jaxlm-engine", daemon=True)
        self.leader, self.multi = leader, jax.process_count() > 1
        self.ops: list = []  # the leader's engine operations since the last shared round
        self.guide_keys: dict = {}  # leader: id(guide) -> (key, guide), the guides shared
        self.followed: dict = {}  # follower: request index -> its Request
        self.guides: dict = {}  # follower: key -> guide
        self.stop_wanted = False  # a follower's SIGTERM, sent with the next round
        self.on_stop_wanted: Optional[Callable] = None  # leader: a follower asked to stop

    def start(self) -> "Worker":
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def follow(self) -> None:
        """A follower: build the engine and follow the leader's rounds in this thread
        until the leader stops."""
        self._main()
        if self._error is not None:
            raise self._error

    def submit(self, job: Job) -> None:
        self.inbox.put(("add", job))

    def cancel(self, job: Job, why: Optional[str] = None) -> None:
        self.inbox.put(("cancel", job, why))

    def cancel_all(self, why: str) -> None:
        self.inbox.put(("cancel_all", why))

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the thread after its current step -> whether it has ended."""
        self._stop = True
        self.inbox.put(("wake",))
        self.thread.join(timeout=timeout)
        return not self.thread.is_alive()

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        got = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not got:
            return 0.0
        return sum(n for _, n in got) / max(now - got[0][0], 1e-3) if len(got) > 1 else 0.0

    def _main(self) -> None:
        import contextlib
        try:
            with (self._context() if self._context else contextlib.nullcontext()):
                try:
                    self.engine = self._make()
                except BaseException as e:  # noqa: BLE001 - reported by start()
                    self._error = e
                    return
                finally:
                    self._ready.set()
                self._loop()
        except BaseException as e:  # noqa: BLE001
            if not self.leader:
                self._error = e
            log.exception("the engine thread stopped")

    def _loop(self) -> None:
        eng = self.engine
        asked = False
        while True:
            if self.leader:
                self._read_inbox(block=not eng.busy)
            ops, stop, wanted = self._share()
            if wanted and self.leader and not asked and self.on_stop_wanted is not None:
                asked = True
                self.on_stop_wanted()
            if not self.leader:
                self._replay(ops)
            if stop:
                break
            if not eng.busy:
                continue
            before = self.tokens_total
            try:
                eng.step()
            except Exception as e:  # noqa: BLE001 - every running request gets the error
                if not self.leader:
                    raise
                log.exception("engine step failed")
                for job in list(self.jobs):
                    self._cancel(job, f"internal error: {e}")
            eng.events.clear()
            eng.forget_finished()
            if not self.leader:
                for i in [i for i, r in self.followed.items() if r.finished]:
                    del self.followed[i]
                continue
            for job in [j for j in self.jobs if j.request is not None and j.request.finished]:
                self.jobs.discard(job)
            self.recent.append((time.perf_counter(), self.tokens_total - before))
        for job in list(self.jobs):
            self._cancel(job, "the server is shutting down")

    def _read_inbox(self, block: bool) -> None:
        """The leader: apply the handlers' commands (waiting up to half a second for
        one when the engine is idle)."""
        while not self._stop:
            try:
                cmd = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            self._command(cmd)
            block = False

    def _share(self) -> tuple[list, bool, bool]:
        """One round: (the leader's engine operations since the last, whether it stops,
        whether a process asked to stop); one process: nothing to share."""
        if not self.multi:
            return [], self._stop, False
        import pickle

        from ..sharding.distributed import share_bytes
        data = pickle.dumps((self.ops, self._stop)) if self.leader else b""
        self.ops = []
        raw, wanted = share_bytes(data, self.stop_wanted)
        ops, stop = pickle.loads(raw)
        return ops, stop, wanted

    def _add(self, ids, settings, guide, row_seed: int, eos_ids: tuple, on_token=None):
        """engine.add, recorded for the followers (the failed ones too: `add` may have
        stacked the guide before it refused)."""
        if self.multi and self.leader:
            ref = None  # (key, the guide the first time, then None)
            if guide is not None:
                known = self.guide_keys.get(id(guide))
                if known is None:
                    self.guide_keys[id(guide)] = (len(self.guide_keys), guide)
                    ref = (len(self.guide_keys) - 1, guide)
                else:
                    ref = (known[0], None)
            self.ops.append(("add", list(map(int, ids)), settings, ref, row_seed,
                             tuple(eos_ids)))
        return self.engine.add(ids, settings, guide=guide, row_seed=row_seed,
                               eos_ids=eos_ids, on_token=on_token)

    def _replay(self, ops: list) -> None:
        """A follower: the leader's operations, on this process's engine."""
        for op in ops:
            if op[0] == "cancel":
                req = self.followed.pop(op[1], None)
                if req is not None:
                    self.engine.cancel(req)
                continue
            _, ids, settings, ref, row_seed, eos_ids = op
            guide = None
            if ref is not None:
                if ref[1] is not None:
                    self.guides[ref[0]] = ref[1]
                guide = self.guides[ref[0]]
            try:
                req = self.engine.add(ids, settings, guide=guide, row_seed=row_seed,
                                      eos_ids=eos_ids)
            except JaxlmError:
                continue
            self.followed[req.index] = req

    def _command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            job = cmd[1]
            if job.done:
                return
            try:
                job.request = self._add(job.ids, job.settings, job.guide, job.row_seed,
                                        job.eos_ids, lambda ev, job=job: self._on_token(job, ev))
            except JaxlmError as e:
                job.done = True
                job.post(("error", str(e)))
                return
            self.jobs.add(job)
            job.post(("added",))
        elif kind == "cancel":
            self._cancel(cmd[1], cmd[2])
        elif kind == "cancel_all":
            for job in list(self.jobs):
                self._cancel(job, cmd[1])

    def _cancel(self, job: Job, why: Optional[str]) -> None:
        job.done = True
        self.jobs.discard(job)
        if job.request is not None and not job.request.finished:
            if self.multi:
                self.ops.append(("cancel", job.request.index))
            self.engine.cancel(job.request)
        if why is not None:
            job.post(("abort", why))

    def _on_token(self, job: Job, ev) -> None:
        o = ev.request.outputs[ev.sample]
        n, k = len(o.tokens), len(ev.tokens)
        self.tokens_total += k
        lps = None if o.logprobs is None else o.logprobs[n - k:n]
        tops = None if o.top_logprobs is None else o.top_logprobs[n - k:n]
        job.post(("event", ev.sample, list(ev.tokens), lps, tops, ev.finish_reason,
                  o.text if ev.finish_reason is not None else None, o.stopped_by_id))


# ------------------------------------------------------------ reading a request

def _get(body: dict, name: str, kinds, default=None, check=None, why: str = ""):
    """body[name] if present and not null (of `kinds`, passing `check`), else default."""
    value = body.get(name)
    if value is None:
        return default
    bad = isinstance(value, bool) and bool not in kinds
    if bad or not isinstance(value, kinds) or (check is not None and not check(value)):
        raise BadRequest(f"'{name}': {value!r} is not valid: {why}", param=name,
                         code="invalid_value")
    return value


def _number(body, name, lo, hi, default=None):
    return _get(body, name, (int, float), default, lambda v: lo <= v <= hi,
                f"a number in [{lo}, {hi}]")


class Parsed:
    """A request's engine settings and what its answer needs."""
    settings: Any
    n: int
    stream: bool
    include_usage: bool
    logprobs: Optional[int]  # top log-probs per token (0: the tokens' own only); None: off
    guide: Any
    row_seed: int


def read_settings(body: dict, s: Served, prompt_len: int, chat: bool, guides: dict) -> Parsed:
    """The OpenAI fields of `body` -> Parsed (BadRequest naming the field)."""
    c = s.serve
    for name, defaults in UNSUPPORTED.items():
        if name in body and body[name] not in defaults:
            raise BadRequest(f"'{name}' is not supported by this server", param=name,
                             code="unsupported_parameter")
    over: dict = {}
    limit = s.cfg.max_seq_len
    max_tokens = _get(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                      else "max_tokens", (int,), None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens is None:
        max_tokens = min(s.settings.max_new_tokens, c.max_tokens, limit - prompt_len)
    if prompt_len + max(max_tokens, 1) > limit:
        raise BadRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the "
            f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please "
            "reduce the length of the messages or completion.",
            param="messages" if chat else "prompt", code="context_length_exceeded")
    if max_tokens > c.max_tokens:
        raise BadRequest(f"max_tokens={max_tokens} is more than this server's "
                         f"serve.max_tokens={c.max_tokens}", param="max_tokens",
                         code="invalid_value")
    over["max_new_tokens"] = max_tokens
    n = _get(body, "n", (int,), 1, lambda v: 1 <= v <= c.slots, f"an integer in [1, {c.slots}]")
    over["num_return_sequences"] = n
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is None:  # the checkpoint's / config's, else OpenAI's 1.0
        temperature = s.settings.temperature if "temperature" in s.sampler_given else 1.0
    over["temperature"] = float(temperature)
    top_p = _get(body, "top_p", (int, float), None, lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = _get(body, "top_k", (int,), None, lambda v: v >= -1, "an integer >= -1 (-1, 0: off)")
    min_p = _number(body, "min_p", 0.0, 1.0)
    for key, value in (("top_p", top_p), ("top_k", None if top_k is None else max(top_k, 0)),
                       ("min_p", min_p)):
        if value is not None:
            over[key] = value
    sampled = over["temperature"] > 0 and over.get("top_k", s.settings.top_k) != 1
    if sampled and not c.sampling:
        raise BadRequest("this server decodes greedily only (serve.sampling=false): give "
                         "temperature 0", param="temperature", code="unsupported_value")
    if over.get("top_k", 0) > c.max_top_k:
        raise BadRequest(f"top_k={over['top_k']} is more than this server's serve.max_top_k="
                         f"{c.max_top_k}", param="top_k", code="invalid_value")
    for key in ("presence_penalty", "frequency_penalty"):
        value = _number(body, key, -2.0, 2.0)
        if value is not None:
            over[key] = float(value)
    rep = _get(body, "repetition_penalty", (int, float), None, lambda v: v > 0, "a number > 0")
    if rep is not None:
        over["repetition_penalty"] = float(rep)
    if not c.penalties and any(over.get(k, d) != d for k, d in (
            ("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0))):
        raise BadRequest("penalties are off on this server (serve.penalties=false)",
                         param="presence_penalty", code="unsupported_value")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise BadRequest("'stop' must be a string or a list of non-empty strings",
                             param="stop", code="invalid_value")
        over["stop"] = tuple(stop)
    seed = _get(body, "seed", (int,), None, None)
    import random
    over["seed"] = (seed if seed is not None else random.getrandbits(31)) % 2 ** 31
    p = Parsed()
    p.n, p.row_seed = n, 0
    p.stream = bool(_get(body, "stream", (bool,), False, None, "true or false"))
    opts = _get(body, "stream_options", (dict,), {}, None, "an object")
    p.include_usage = bool(_get(opts, "include_usage", (bool,), False, None, "true or false"))
    if chat:
        want = _get(body, "logprobs", (bool,), False, None, "true or false")
        top = _get(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "in [0, 20]")
        if top and not want:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                             code="invalid_value")
        p.logprobs = top if want else None
    else:
        p.logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "in [0, 20]")
    if p.logprobs is not None and p.logprobs > c.max_logprobs:
        raise BadRequest(f"{p.logprobs} top log-probs asked, this server gives at most "
                         f"serve.max_logprobs={c.max_logprobs}", param="logprobs",
                         code="invalid_value")
    p.guide = read_response_format(body, s, guides)
    try:
        p.settings = dataclasses.replace(s.settings, **over)
    except JaxlmError as e:
        raise BadRequest(str(e), code="invalid_value") from None
    return p


def read_response_format(body: dict, s: Served, guides: dict):
    """response_format -> a compiled Guide (cached by schema) or None."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object",
                                                            "json_schema"):
        raise BadRequest("'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                         "\"json_schema\"}", param="response_format", code="invalid_value")
    if fmt["type"] == "text":
        return None
    if not s.serve.guided:
        raise BadRequest("response_format is off on this server (serve.guided=false)",
                         param="response_format", code="unsupported_value")
    if fmt["type"] == "json_object":
        schema = {"type": "object"}
    else:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest("response_format json_schema needs {\"json_schema\": {\"name\": "
                             "..., \"schema\": {...}}}", param="response_format",
                             code="invalid_value")
        schema = spec["schema"]
    key = json.dumps(schema, sort_keys=True)
    if key not in guides:
        from .guided import Guide
        try:
            guides[key] = Guide.json_schema(schema, s.tokenizer, s.cfg.vocab_size)
        except JaxlmError as e:
            raise BadRequest(f"response_format: {e}", param="response_format",
                             code="invalid_value") from None
    return guides[key]


def read_prompts(body: dict, s: Served, chat: bool) -> list:
    """The prompt ids of a request: one list for chat (its messages through the chat
    template) or per prompt of a completion (a string, token ids, or a list of them)."""
    from .text import chat_ids, encode_prompts
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"}",
                             param="messages", code="invalid_value")
        msgs = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content
                                  if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise BadRequest("each message's 'content' must be text", param="messages",
                                 code="invalid_value")
            msgs.append({"role": m["role"], "content": content})
        if s.template is None:
            raise BadRequest(f"model {s.name!r} has no chat template: use /v1/completions",
                             param="messages", code="unsupported_value")
        try:
            return [chat_ids(s.tokenizer, s.template, msgs)]
        except JaxlmError as e:
            raise BadRequest(str(e), param="messages", code="invalid_value") from None
    prompt = body.get("prompt")
    ints = lambda x: isinstance(x, list) and x and all(  # noqa: E731
        isinstance(i, int) and not isinstance(i, bool) for i in x)
    if isinstance(prompt, str):
        prompts = [prompt]
    elif ints(prompt):
        return [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(ints(p) for p in prompt):
        return [list(p) for p in prompt]
    else:
        raise BadRequest("'prompt' must be a string, a list of strings, token ids or lists of "
                         "token ids", param="prompt", code="invalid_value")
    try:
        return encode_prompts(s.tokenizer, s.cfg, prompts)
    except JaxlmError as e:
        raise BadRequest(str(e), param="prompt", code="invalid_value") from None


# ------------------------------------------------------------ answers

def _token_text(s: Served, i: int) -> str:
    return s.detokenize([i])


def completion_logprobs(s: Served, ids, lps, tops, k: int, offset: int) -> dict:
    """OpenAI's completions logprobs object for the tokens ids (their text from offset)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, t in enumerate(ids):
        text = _token_text(s, t)
        out["tokens"].append(text)
        out["token_logprobs"].append(lps[i])
        out["top_logprobs"].append({_token_text(s, a): b for a, b in tops[i][:k]}
                                   if tops is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(s: Served, ids, lps, tops, k: int) -> list:
    """OpenAI's chat logprobs "content" entries for the tokens ids."""
    def entry(t, lp):
        text = _token_text(s, t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return [dict(entry(t, lps[i]), top_logprobs=[entry(a, b) for a, b in tops[i][:k]]
                 if tops is not None else []) for i, t in enumerate(ids)]


class Sample:
    """One choice being answered: its text so far, tokens, log-probs."""

    def __init__(self, s: Served, stop: tuple):
        from .text import TextDeltas
        self.deltas = TextDeltas(s.detokenize, max(map(len, stop), default=1) - 1)
        self.text, self.count, self.last = "", 0, 0.0
        self.finish: Optional[str] = None
        self.lp_ids: list = []
        self.lps: list = []
        self.tops: list = []


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


# ------------------------------------------------------------ the app

async def _disconnected(request) -> None:
    """Returns once the client has closed the connection (its body already read: the
    next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The HTTP side: handlers, the bounded queue, auth, metrics (module docstring)."""

    def __init__(self, served: Served, worker: Worker, api_key: Optional[str] = None):
        self.s, self.worker, self.api_key = served, worker, api_key
        self.outstanding = 0  # jobs accepted and not answered (the event loop's count)
        self.active: set = set()  # those jobs
        self.draining = False
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.guides: dict = {}
        self.metrics = _Metrics(self)

    # ---- the shared steps of both endpoints

    def _check(self, request) -> None:
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                raise BadRequest("Incorrect API key provided", code="invalid_api_key",
                                 status=401)
        if self.draining:
            raise BadRequest("the server is shutting down", code="shutting_down", status=503)

    async def _body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}",
                             code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str):
            raise BadRequest("'model' is required", param="model", code="invalid_value")
        if model != self.s.name:
            raise BadRequest(f"The model `{model}` does not exist (this server serves "
                             f"{self.s.name!r})", param="model", code="model_not_found")
        return body

    async def handle(self, request, chat: bool):
        from starlette.responses import JSONResponse, Response, StreamingResponse
        jobs: list = []
        self.loop = asyncio.get_running_loop()
        try:
            self._check(request)
            body = await self._body(request)
            prompts = read_prompts(body, self.s, chat)
            parsed = [await asyncio.to_thread(read_settings, body, self.s, len(ids), chat,
                                              self.guides) for ids in prompts]
            c = self.s.serve
            if self.outstanding + len(prompts) > c.slots + c.max_queue:
                self.metrics.rejected.inc()
                raise BadRequest("too many requests: the queue is full, retry later",
                                 code="rate_limit_exceeded", status=429,
                                 headers={"Retry-After": "1"})
            loop = asyncio.get_running_loop()
            for ids, p in zip(prompts, parsed):
                job = Job(ids, p.settings, p.guide, p.row_seed, self.s.eos_ids, loop)
                jobs.append(job)
                self.active.add(job)
                self.outstanding += 1
                self.worker.submit(job)
            for job in jobs:  # each added, or the engine's reason why not
                item = await job.queue.get()
                if item[0] == "abort":
                    raise BadRequest(f"the request was cancelled: {item[1]}",
                                     code="cancelled", status=503)
                if item[0] != "added":
                    raise BadRequest(item[1], code="invalid_value")
        except BadRequest as e:
            self._release(jobs)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except BaseException:
            self._release(jobs)
            raise
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if parsed[0].stream:
            return StreamingResponse(self._stream(jobs, parsed, chat, rid, body["model"]),
                                     media_type="text/event-stream")
        tasks = [asyncio.ensure_future(self._collect(job, p)) for job, p in zip(jobs, parsed)]
        collect = asyncio.gather(*tasks)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():  # the client left: its requests are cancelled (released)
                return Response(status_code=499)
            samples = collect.result()
        except BadRequest as e:
            return JSONResponse(e.body(), status_code=e.status)
        finally:
            for task in (gone, *tasks):  # none left waiting on a cancelled job's queue
                task.cancel()
            self._release(jobs)
        choices = []
        for samps, p in zip(samples, parsed):
            for smp in samps:
                choice = {"index": len(choices), "finish_reason": smp.finish,
                          "logprobs": self._logprobs(smp, p, chat)}
                if chat:
                    choice["message"] = {"role": "assistant", "content": smp.text}
                else:
                    choice["text"] = smp.text
                choices.append(choice)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()),
                             "model": body["model"], "choices": choices,
                             "usage": self._usage(jobs, samples)})

    def _release(self, jobs: list) -> None:
        """The jobs answered (or abandoned): unfinished ones cancelled, each counted once."""
        for job in jobs:
            if job.released:
                continue
            job.released = True
            self.active.discard(job)
            if not job.done:
                job.done = True
                self.worker.cancel(job)
            self.outstanding -= 1

    def _logprobs(self, smp: Sample, p: Parsed, chat: bool):
        if p.logprobs is None:
            return None
        tops = smp.tops if smp.tops and smp.tops[0] is not None else None
        if chat:
            return {"content": chat_logprobs(self.s, smp.lp_ids, smp.lps, tops, p.logprobs)}
        return completion_logprobs(self.s, smp.lp_ids, smp.lps, tops, p.logprobs, 0)

    def _usage(self, jobs, samples) -> dict:
        prompt = sum(len(j.ids) for j in jobs)
        done = sum(smp.count for samps in samples for smp in samps)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    def _absorb(self, job: Job, smp: Sample, item, p: Parsed) -> str:
        """One event of a sample -> its new text (and its tokens / log-probs kept)."""
        _, _, tokens, lps, tops, reason, text, by_id = item
        now = time.perf_counter()
        if smp.count == 0 and tokens:
            self.metrics.ttft.observe(now - job.created)
        elif tokens:
            for _ in tokens:
                self.metrics.itl.observe((now - smp.last) / len(tokens))
        smp.last = now
        smp.count += len(tokens)
        shown = tokens[:-1] if reason is not None and by_id else tokens
        if p.logprobs is not None and lps is not None:
            smp.lp_ids += shown
            smp.lps += lps[:len(shown)]
            smp.tops += (tops or [None] * len(tokens))[:len(shown)]
        delta = smp.deltas.push(tokens, text, reason is not None)
        smp.text += delta
        if reason is not None:
            smp.finish = _finish_reason(reason)
        return delta

    async def _collect(self, job: Job, p: Parsed) -> list:
        samps = [Sample(self.s, p.settings.stop) for _ in range(p.n)]
        while any(x.finish is None for x in samps):
            item = await job.queue.get()
            if item[0] == "abort":
                raise BadRequest(f"the request was cancelled: {item[1]}", code="cancelled",
                                 status=503)
            if item[0] == "event":
                self._absorb(job, samps[item[1]], item, p)
        job.done = True
        return samps

    async def _stream(self, jobs, parsed, chat: bool, rid: str, model: str):
        """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(choices, usage=None):
            data = {"id": rid, "object": kind, "created": created, "model": model,
                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        samples = [[Sample(self.s, p.settings.stop) for _ in range(p.n)] for p in parsed]
        base = [sum(p.n for p in parsed[:i]) for i in range(len(parsed))]
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}
                             for i in range(parsed[0].n)])
            getters = {asyncio.ensure_future(job.queue.get()): k for k, job in enumerate(jobs)}
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    k = getters.pop(fut)
                    job, p, item = jobs[k], parsed[k], fut.result()
                    if item[0] == "abort":
                        err = BadRequest(f"the request was cancelled: {item[1]}",
                                         code="cancelled", status=503)
                        yield f"data: {json.dumps(err.body())}\n\n"
                        for f in getters:
                            f.cancel()
                        getters.clear()
                        break
                    if item[0] != "event":
                        getters[asyncio.ensure_future(job.queue.get())] = k
                        continue
                    smp = samples[k][item[1]]
                    old = len(smp.lp_ids)
                    delta = self._absorb(job, smp, item, p)
                    choice = {"index": base[k] + item[1], "finish_reason": smp.finish}
                    lp = None
                    if p.logprobs is not None:
                        part = Sample.__new__(Sample)
                        part.lp_ids, part.lps = smp.lp_ids[old:], smp.lps[old:]
                        part.tops = smp.tops[old:]
                        lp = self._logprobs(part, p, chat)
                    if chat:
                        choice["delta"] = {"content": delta} if delta or smp.finish is None \
                            else {}
                    else:
                        choice["text"] = delta
                    choice["logprobs"] = lp
                    if delta or smp.finish is not None or lp:
                        yield chunk([choice])
                    if any(x.finish is None for x in samples[k]):
                        getters[asyncio.ensure_future(job.queue.get())] = k
                    else:
                        job.done = True
            if parsed[0].include_usage:
                yield chunk([], self._usage(jobs, samples))
            yield "data: [DONE]\n\n"
        finally:
            self._release(jobs)

    # ---- the app

    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse
        from starlette.routing import Route

        async def models(request):
            try:
                self._check(request)
            except BadRequest as e:
                return JSONResponse(e.body(), status_code=e.status)
            return JSONResponse({"object": "list", "data": [
                {"id": self.s.name, "object": "model", "created": 0, "owned_by": "jaxlm",
                 "max_model_len": self.s.cfg.max_seq_len}]})

        async def completions(request):
            return await self.handle(request, chat=False)

        async def chat(request):
            return await self.handle(request, chat=True)

        async def health(request):
            ok = self.worker.thread.is_alive() and not self.draining
            return PlainTextResponse("ok" if ok else "unavailable", status_code=200 if ok else 503)

        async def metrics(request):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            return PlainTextResponse(generate_latest(self.metrics.registry),
                                     media_type=CONTENT_TYPE_LATEST)

        async def not_found(request, exc):
            return JSONResponse(BadRequest(f"no route {request.url.path}", code="not_found",
                                           status=404).body(), status_code=404)

        return Starlette(routes=[
            Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health),
            Route("/metrics", metrics)], exception_handlers={404: not_found})

    def drain(self, grace: float) -> None:
        """SIGTERM: stop admitting; cancel what still runs shortly before `grace` ends
        (answered from the event loop itself: a clean error even while the engine
        thread is busy in a step)."""
        self.draining = True

        def abort():
            why = "the server is shutting down"
            self.worker.cancel_all(why)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._abort_all, why)

        timer = threading.Timer(max(grace - 1.0, grace * 0.8), abort)
        timer.daemon = True
        timer.start()

    def _abort_all(self, why: str) -> None:
        for job in list(self.active):
            if not job.done:
                job.done = True
                job.queue.put_nowait(("abort", why))


class _Metrics:
    """/metrics: Prometheus gauges read from the engine at scrape time, and the latency
    histograms the handlers fill."""

    def __init__(self, server: Server):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        w = server.worker

        def engine(fn, default=0.0):
            def read():
                eng = w.engine
                return default if eng is None else fn(eng)
            return read

        Gauge("jaxlm_requests_running", "requests decoding in the engine's slots",
              registry=r).set_function(engine(
                  lambda e: len({id(o[0]) for o in e.owner if o is not None})))
        Gauge("jaxlm_requests_queued", "requests waiting for a slot",
              registry=r).set_function(engine(lambda e: len(e.queue)))
        Gauge("jaxlm_generation_tokens_per_second", "tokens generated per second (last 10 s)",
              registry=r).set_function(w.tokens_per_s)
        Gauge("jaxlm_kv_pages_free", "KV pages free or holding only cached prefixes",
              registry=r).set_function(engine(lambda e: e.pool.n_available()))
        Gauge("jaxlm_kv_pages_total", "KV pages in the pool",
              registry=r).set_function(engine(lambda e: e.pool.n_pages))
        Gauge("jaxlm_prefix_cache_hit_rate", "prompt tokens read from cached pages / prompt "
              "tokens admitted", registry=r).set_function(engine(
                  lambda e: e.prefix_hit_rate()))
        Gauge("jaxlm_generation_tokens", "tokens generated since start",
              registry=r).set_function(lambda: w.tokens_total)
        self.rejected = Counter("jaxlm_requests_rejected", "requests refused with 429",
                                registry=r)
        buckets = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds", "time to first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("jaxlm_inter_token_latency_seconds", "time between tokens",
                             buckets=buckets, registry=r)


# ------------------------------------------------------------ running it

def load_served(checkpoint: str, overrides=(), config: Optional[str] = None,
                name: Optional[str] = None, step: Optional[int] = None):
    """(Served, run config) of a checkpoint with --config / key=value overrides (the
    generate.*, serve.*, mesh.* and shape-keeping model.* keys)."""
    import os

    from ..api import checkpoint_kind, companions_dir, load, model_config_of
    from ..config import config_from_dict, load_config, read_yaml, to_dict
    from ..model.chat import chat_template_of
    from ..model.tokenizer import load_tokenizer
    from ..train.loop import read_run_config
    from .text import (apply_model_overrides, generation_settings, given_generate_keys,
                       resolve_generate, split_model_overrides, stop_ids)
    model_overrides, overrides = split_model_overrides(list(overrides))
    hf_dir = checkpoint_kind(checkpoint) != "jaxlm"
    saved = {} if hf_dir else read_run_config(checkpoint)
    base = {} if hf_dir else {"generate": to_dict(saved.generate), "mesh": to_dict(saved.mesh)}
    run = load_config(config, overrides) if config else config_from_dict(base, overrides)
    cfg = apply_model_overrides(model_config_of(checkpoint), model_overrides)
    if cfg.family != "decoder":
        from ..errors import InputError
        raise InputError(f"{checkpoint}: jaxlm serve serves decoder models, not "
                         f"model.family={cfg.family!r}")
    files = companions_dir(checkpoint)
    tok = load_tokenizer(files)
    gen = generation_settings(files, tok)
    given = given_generate_keys(overrides, read_yaml(config) if config else {},
                                saved=None if hf_dir else base["generate"])
    g = resolve_generate(run.generate, gen, given)
    sampler = frozenset(k for k in ("temperature",) if k in given or k in gen.defaults)
    eos = tuple(stop_ids(gen.eos_ids, g, cfg.vocab_size))
    from ..sharding.mesh import make_mesh
    mesh = make_mesh(run.mesh)
    _, params = load(checkpoint, cfg=cfg, mesh=mesh, rules=run.mesh.rules, step=step)
    served = Served(name or os.path.basename(os.path.normpath(checkpoint)), cfg, params, tok,
                    chat_template_of(files), eos, g, sampler, run.serve)
    return served, run, mesh


def start(served: Served, mesh=None, rules=None, api_key: Optional[str] = None) -> Server:
    """The engine thread started (the engine built on it, under the mesh) and the
    Server over it; `Server.app()` is the ASGI app."""
    from ..sharding.rules import use_mesh
    context = None if mesh is None else (lambda: use_mesh(mesh, rules))
    worker = Worker(lambda: make_engine(served), context).start()
    return Server(served, worker, api_key)


def follow(served: Served, mesh=None, rules=None) -> None:
    """Multi-process, a process other than 0: run the engine's steps as process 0's
    server leads them (`Worker`), until it stops; SIGTERM here stops them all."""
    import signal

    from ..sharding.rules import use_mesh
    context = None if mesh is None else (lambda: use_mesh(mesh, rules))
    worker = Worker(lambda: make_engine(served), context, leader=False)

    def wanted(*_):
        worker.stop_wanted = True
    previous = signal.signal(signal.SIGTERM, wanted) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        worker.follow()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def uvicorn_server(server: Server, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info"):
    """The uvicorn.Server of the app: SIGTERM / SIGINT drain it (`Server.drain`), then
    uvicorn waits up to serve.grace_seconds for the open connections."""
    import uvicorn
    grace = server.s.serve.grace_seconds

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not server.draining:
                server.drain(grace)
            super().handle_exit(sig, frame)

    return _Uvicorn(uvicorn.Config(server.app(), host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=grace, access_log=False))


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, sock=None,
        log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT: stop admitting, let in-flight requests finish
    within serve.grace_seconds (cancel the rest), stop the engine; returns normally
    (exit code 0)."""
    import signal
    # uvicorn raises the caught signal again once it has stopped: handled here, it
    # ends the command with exit code 0 instead of killing it
    previous = {sig: signal.signal(sig, lambda *a: None)
                for sig in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    import os
    # a follower's SIGTERM (multi-process) stops this server as its own would
    server.worker.on_stop_wanted = lambda: os.kill(os.getpid(), signal.SIGTERM)
    try:
        uvicorn_server(server, host, port, log_level).run(
            sockets=[sock] if sock is not None else None)
    finally:
        # a step still running: the caller exits anyway; other processes wait for the
        # stop to reach them
        server.worker.stop(timeout=60.0 if server.worker.multi else 1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
