"""Guided decoding: regex / JSON-schema / choice constraints as a token automaton on device.

    guide = Guide.regex(r"[0-9]{3}-[a-z]+", tokenizer, cfg.vocab_size)
    guide = Guide.json_schema({"type": "object", ...}, tokenizer, cfg.vocab_size)
    guide = Guide.choice(["yes", "no"], tokenizer, cfg.vocab_size)
    out = jaxlm.generate(params, cfg, prompts, guide=guide, eos_id=tok.eos_id, ...)
    out = jaxlm.generate(params, cfg, prompts, guide=[guide_a, None, guide_b], ...)

`outlines-core` compiles the regex (JSON schemas through its
`build_regex_from_schema`) against the tokenizer's vocabulary, given as the
exact bytes each id contributes to the decoded text (`token_bytes`). The
host then turns its index into dense arrays:

* `table` int32 [S, V]: next state after emitting token v in state s, -1 when
  v is not allowed (stop ids never appear in it);
* `accepting` bool [S]: the text so far matches, so a stop id is allowed;
* `dist` int32 [S]: fewest tokens from s to an accepting state.

States from which no accepting state can be reached are pruned (transitions
into them removed); a guide whose start state is pruned cannot be realised by
the tokenizer and is an InputError. Inside the decode loop each row carries
its state (`GuideState`): the logits of tokens not allowed are set to -inf
just before the sampler (after the logit processors, as vLLM does), stop ids
only in an accepting state, and tokens whose target state cannot finish
within the remaining budget are masked too, so that every guided row ends
with a stop id within max_new_tokens (when only a stop id is left, it is
forced). After sampling the state advances by one table lookup. Rows with
different guides share one table: the guides' tables are stacked with
per-guide offsets; unconstrained rows use a 1-state all-allowed block.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InputError
from ..model.tokenizer import require_eos as _require_eos

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# ------------------------------------------------------------ token bytes

def _bytelevel_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte map (ByteLevel pre-tokenizer / decoder)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer) -> list[Optional[bytes]]:
    """The bytes each id adds to the decoded text; None for special / control ids
    (bos, eos, pad, unk, added special tokens), which a guide never emits.

    sentencepiece (and HF tokenizer.json with Metaspace / ByteFallback):
    "<0xNN>" is the byte NN, "▁" is a space. HF ByteLevel: GPT-2's
    unicode-to-byte map. Checked by tests: decoding ordinary text's ids equals
    the concatenation of their bytes."""
    from ..model.tokenizer import HFTokenizer, SentencePieceTokenizer
    n = tokenizer.vocab_size
    if isinstance(tokenizer, SentencePieceTokenizer):
        sp = tokenizer._sp
        out = []
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                out.append(None)
                continue
            piece = sp.id_to_piece(i)
            m = _BYTE_PIECE.match(piece) if sp.is_byte(i) else None
            out.append(bytes([int(m.group(1), 16)]) if m else
                       piece.replace("\u2581", " ").encode("utf-8"))
        return out
    if isinstance(tokenizer, HFTokenizer):
        spec = json.loads(tokenizer._json)
        special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        special |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
                    if i is not None}
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
        table = _bytelevel_decoder() if byte_level else None
        out = []
        for i in range(n):
            piece = tokenizer.id_to_piece(i)
            m = None if byte_level or piece is None else _BYTE_PIECE.match(piece)
            if m and i not in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id):
                out.append(bytes([int(m.group(1), 16)]))  # byte fallback, even if "added"
            elif i in special or piece is None:
                out.append(None)
            elif byte_level:
                try:
                    out.append(bytes(table[c] for c in piece))
                except KeyError:  # an added non-special token in plain text
                    out.append(piece.encode("utf-8"))
            else:
                out.append(piece.replace("\u2581", " ").encode("utf-8"))
        return out
    raise InputError(f"guided decoding does not know the token strings of "
                     f"{type(tokenizer).__name__}")


# ------------------------------------------------------------ the compiled guide

class Guide(NamedTuple):
    """A constraint compiled for one tokenizer (host numpy arrays, see module doc)."""
    table: np.ndarray  # int32 [S, V]; -1: not allowed; state 0 is the start
    accepting: np.ndarray  # bool [S]
    dist: np.ndarray  # int32 [S]: fewest tokens to an accepting state
    pieces: tuple  # bytes-or-None per id: the text a guided row's ids spell
    description: str

    @classmethod
    def regex(cls, pattern: str, tokenizer, vocab_size: int, *,
              description: Optional[str] = None) -> "Guide":
        """Outputs that fully match `pattern` (outlines-core's regex dialect, a
        subset of Python's without lookarounds / backreferences)."""
        if not isinstance(pattern, str) or not pattern:
            raise InputError(f"regex must be a non-empty string, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"invalid regex {pattern!r}: {e}") from None
        return _compile(pattern, tokenizer, vocab_size, description or f"regex {pattern!r}")

    @classmethod
    def json_schema(cls, schema, tokenizer, vocab_size: int, *,
                    whitespace: Optional[str] = None) -> "Guide":
        """Outputs that are JSON documents valid against `schema` (a dict or its
        JSON text), through outlines-core's schema -> regex translation."""
        from outlines_core.json_schema import build_regex_from_schema
        if isinstance(schema, dict):
            text = json.dumps(schema)
        else:
            text = schema
            try:
                schema = json.loads(text)
            except (TypeError, ValueError) as e:
                raise InputError(f"json schema is not valid JSON: {e}") from None
        _check_keywords(schema, "schema")
        try:
            pattern = build_regex_from_schema(text, whitespace) if whitespace is not None \
                else build_regex_from_schema(text)
        except (ValueError, TypeError) as e:
            msg = " ".join(str(e).split()).replace(
                "Make sure it is valid to the JSON Schema specification and check if it's "
                "supported by Outlines. If it should be supported, please open an issue.", "")
            raise InputError(f"unsupported JSON schema: {msg.strip()}") from None
        return _compile(pattern, tokenizer, vocab_size, "json schema")

    @classmethod
    def choice(cls, choices: Sequence[str], tokenizer, vocab_size: int) -> "Guide":
        """Outputs equal to one of `choices` (literal strings)."""
        if isinstance(choices, str) or not choices or \
                not all(isinstance(c, str) and c for c in choices):
            raise InputError(f"choices must be a non-empty list of non-empty strings, "
                             f"got {choices!r}")
        pattern = "|".join(f"({re.escape(c)})" for c in choices)
        return _compile(pattern, tokenizer, vocab_size, f"choice {list(choices)!r}")

    def __repr__(self) -> str:
        return f"Guide({self.description}, {len(self.table)} states x {self.table.shape[1]} ids)"

    def text(self, ids: Sequence[int]) -> str:
        """The text the ids of a guided row spell (what the automaton matched)."""
        return b"".join(self.pieces[i] or b"" for i in ids).decode("utf-8", "replace")


# Keywords outlines-core 0.2 accepts but silently ignores (the output would not
# honour them): refused by name instead.
_IGNORED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
            "uniqueItems", "contains", "minContains", "maxContains", "patternProperties",
            "propertyNames", "dependentRequired", "dependentSchemas", "if", "then", "else",
            "not", "unevaluatedProperties", "unevaluatedItems")


def _check_keywords(schema, where: str) -> None:
    """InputError naming the first keyword of _IGNORED in the schema tree."""
    if isinstance(schema, list):
        for i, s in enumerate(schema):
            _check_keywords(s, f"{where}[{i}]")
        return
    if not isinstance(schema, dict):
        return
    for k in _IGNORED:
        if k in schema:
            raise InputError(f"unsupported JSON schema feature {k!r} at {where} (outlines-core "
                             "would ignore it; use enum / pattern / maxLength instead)")
    for k in ("properties", "$defs", "definitions"):
        subs = schema.get(k)
        for name, sub in (subs.items() if isinstance(subs, dict) else ()):
            _check_keywords(sub, f"{where}.{k}.{name}")
    for k in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
        if k in schema:
            _check_keywords(schema[k], f"{where}.{k}")


def _compile(pattern: str, tokenizer, vocab_size: int, what: str) -> Guide:
    from outlines_core import Index, Vocabulary
    pieces = token_bytes(tokenizer)[:vocab_size]
    pieces += [None] * (vocab_size - len(pieces))
    by_bytes: dict[bytes, list[int]] = {}
    for i, p in enumerate(pieces):
        if p:
            by_bytes.setdefault(p, []).append(i)
    eos = _require_eos(tokenizer, "guided decoding")
    try:
        index = Index(pattern, Vocabulary(eos, by_bytes))
    except ValueError as e:
        msg = str(e)
        if "incompatible" in msg or "no transitions" in msg.lower():
            raise InputError(f"{what}: the tokenizer cannot realise it "
                             f"({msg.split('. This may')[0]})") from None
        raise InputError(f"{what}: invalid or unsupported regex ({msg})") from None
    return _dense(index, eos, vocab_size, pieces, what)


def _dense(index, eos: int, vocab_size: int, pieces, what: str) -> Guide:
    """outlines-core's index -> (table, accepting, dist), dead states pruned."""
    trans = index.get_transitions()
    finals = set(index.get_final_states())
    start = index.get_initial_state()
    names = sorted(set(trans) | finals | {start} |
                   {s for m in trans.values() for s in m.values()},
                   key=lambda s: (s != start, s))
    num = {s: k for k, s in enumerate(names)}  # start -> 0
    edges = [(num[s], t, num[d]) for s, m in trans.items() for t, d in m.items()
             if t != eos and 0 <= t < vocab_size]
    accepting = np.zeros(len(names), bool)
    accepting[[num[s] for s in finals]] = True
    # fewest tokens to an accepting state: BFS backwards from the accepting states
    back: dict[int, list[int]] = {}
    for s, _, d in edges:
        back.setdefault(d, []).append(s)
    dist = np.full(len(names), -1, np.int64)
    todo = deque(np.flatnonzero(accepting).tolist())
    dist[todo] = 0
    while todo:
        d = todo.popleft()
        for s in back.get(d, ()):
            if dist[s] < 0:
                dist[s] = dist[d] + 1
                todo.append(s)
    if dist[0] < 0:
        raise InputError(f"{what}: the tokenizer cannot realise it (no token path from the "
                         "start reaches an accepting state)")
    table = np.full((len(names), vocab_size), -1, np.int32)
    for s, t, d in edges:
        if dist[d] >= 0 and dist[s] >= 0:
            table[s, t] = d
    return Guide(table, accepting, dist.astype(np.int32), tuple(pieces), what)


# ------------------------------------------------------------ in the decode loop

class GuideState(NamedTuple):
    """The loop-carried guide data of a batch (a pytree of device arrays)."""
    table: jax.Array  # int32 [N, V]: the stacked tables, global state ids
    accepting: jax.Array  # bool [N]
    dist: jax.Array  # int32 [N]
    state: jax.Array  # int32 [B]: each row's current state


def stack(guides: Sequence[Optional[Guide]], vocab_size: int) -> GuideState:
    """Per-row guides (None: unconstrained) -> one GuideState; state 0 is the
    all-allowed accepting block that unconstrained rows stay in."""
    tables = [np.zeros((1, vocab_size), np.int32)]
    # dist -2**30: the budget never masks an unconstrained row
    accepting, dist = [np.ones(1, bool)], [np.full(1, -2 ** 30, np.int32)]
    offsets, seen = [], {}
    base = 1
    for g in guides:
        if g is None:
            offsets.append(0)
            continue
        if g.table.shape[1] != vocab_size:
            raise InputError(f"guide ({g.description}) was compiled for vocab_size="
                             f"{g.table.shape[1]}, the model has {vocab_size}")
        if id(g) not in seen:
            seen[id(g)] = base
            tables.append(np.where(g.table >= 0, g.table + base, -1).astype(np.int32))
            accepting.append(g.accepting)
            dist.append(g.dist)
            base += len(g.table)
        offsets.append(seen[id(g)])
    pad = max(64, 1 << (base - 1).bit_length()) - base  # bucketed: fewer compiles
    tables.append(np.full((pad, vocab_size), -1, np.int32))
    accepting.append(np.zeros(pad, bool))
    dist.append(np.zeros(pad, np.int32))
    return GuideState(jnp.asarray(np.concatenate(tables)), jnp.asarray(np.concatenate(accepting)),
                      jnp.asarray(np.concatenate(dist)), jnp.asarray(offsets, jnp.int32))


def mask(g: GuideState, logits: jax.Array, eos_ids: jax.Array, budget: jax.Array,
         raw: Optional[jax.Array] = None) -> jax.Array:
    """logits [B, V] -> -inf where the row's state forbids the token.

    raw: the logits before the processors; a row whose processed logits have
    no allowed finite entry left (min_new_tokens masking the stop id the guide
    forces, a penalty of -inf) takes its allowed tokens from raw instead, so
    a guided row never samples from an all -inf row.

    eos_ids: [E], or per row [B, E] (-1: unused). budget: tokens each row may still
    emit, this one included (a scalar or [B]). A token is
    allowed if its target state can reach an accepting state and emit a stop
    id within the budget (dist[next] + 2 <= budget); a stop id if the state
    is accepting."""
    nxt = g.table[g.state]  # [B, V]
    budget = jnp.asarray(budget)
    ok = (nxt >= 0) & (g.dist[jnp.maximum(nxt, 0)] + 2 <= (budget[:, None] if budget.ndim
                                                             else budget))
    vocab = jnp.arange(logits.shape[-1])
    eos_ids = jnp.asarray(eos_ids)
    rows = eos_ids if eos_ids.ndim == 2 else eos_ids[None]  # [B or 1, E]
    is_stop = jnp.any((vocab[None, :, None] == rows[:, None, :]) & (rows[:, None, :] >= 0),
                      axis=-1)  # [B or 1, V]
    ok = jnp.where(is_stop, g.accepting[g.state][:, None], ok)
    out = jnp.where(ok, logits, -jnp.inf)
    if raw is None:
        return out
    stuck = ~jnp.any(out > -jnp.inf, axis=-1, keepdims=True)
    return jnp.where(stuck, jnp.where(ok, raw, -jnp.inf), out)


def advance(g: GuideState, token: jax.Array, live: jax.Array) -> GuideState:
    """Next states after sampling token [B] (rows not live, or stopping, stay)."""
    nxt = jnp.take_along_axis(g.table[g.state], jnp.maximum(token, 0)[:, None], axis=1)[:, 0]
    return g._replace(state=jnp.where(live & (nxt >= 0), nxt, g.state))
