"""Shared test setup: 8 forced CPU devices (set before jax is imported)."""

import os

import xla_flags

# Fast compiles (tests/xla_flags.py); flags given in XLA_FLAGS win.
os.environ["XLA_FLAGS"] = xla_flags.for_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One OpenMP thread for torch (the transformers / TRL / peft oracles) and numpy's BLAS, here
# and in every subprocess: their ops on these tiny models are microseconds long, and with
# two pytest workers on two cores a second OpenMP thread mostly spin-waits on a core the
# other worker needs. 100 Hugging Face beam searches took 21 s of wall (11 s CPU) with
# torch's default 2 threads on the 2-core VM under load, 2.5 s (1.2 s CPU) with one; a
# tie-free oracle gives the same tokens. XLA does not read it (its own thread pool).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the session: set by the first process that loads
# this file (pytest-xdist's controller), inherited by its workers and by every `jaxlm`
# subprocess a test starts, so a program compiled in one of them (a train step, a decode
# loop) is read back in the others. Removed at the end of the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-")
    os.environ["_JAXLM_TESTS_OWN_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import collections  # noqa: E402

import pytest  # noqa: E402

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


_MAPS = "/proc/self/maps"
_MAPS_LIMIT = 30_000  # Linux's default vm.max_map_count is 65530


@pytest.fixture(autouse=True)
def _bounded_jit_memory():
    """XLA:CPU maps each compiled kernel's code and data into the process (three
    mappings each). A worker that runs hundreds of test files keeps every executable
    alive through jit's caches, and past vm.max_map_count the next compile aborts the
    process. Once a worker holds half of that, drop the caches (the next use compiles
    again) so the count falls back."""
    yield
    if os.path.exists(_MAPS):
        with open(_MAPS) as f:
            n = sum(1 for _ in f)
        if n > _MAPS_LIMIT:
            jax.clear_caches()


@pytest.fixture
def traces():
    """Counts, per function name, the jit traces made while the test runs, as JAX
    reports them through `jax.monitoring` (one event each time jit traces a
    function: a compile-cache miss). Nothing in the library keeps count."""
    counts = collections.Counter()

    def listen(event, duration, **kw):
        if event == _TRACE_EVENT:
            counts[kw.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# ------------------------------------------------------------ shared session fixtures
#
# One trained tokenizer, one tiny model (config + params) per family and one checkpoint
# per family, made once per worker process and shared by every test file that needs
# "some" such thing (tests/tiny_models.py says why: fewer distinct configs, fewer
# compiles). They are read-only: a test that changes one copies it first.

import shutil  # noqa: E402
from typing import NamedTuple  # noqa: E402

import tiny_models  # noqa: E402


class Tiny(NamedTuple):
    cfg: object  # jaxlm ModelConfig
    params: dict


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory):
    """The directory (a pathlib.Path) of the shared sentencepiece tokenizer: its
    `tokenizer.model`, trained on the first 20 stdlib files (200,000 characters), 512
    pieces. Do not write into it: copy the file where a run dir / checkpoint needs it."""
    from jaxlm.model.tokenizer import train_sentencepiece
    from jaxlm.train.data import load_documents
    out = tmp_path_factory.mktemp("sp_tokenizer")
    train_sentencepiece(load_documents("stdlib", max_docs=20), tiny_models.TOKENIZER_VOCAB, out,
                        max_chars=200_000)
    return out


@pytest.fixture(scope="session")
def sp_tokenizer_file(sp_tokenizer_dir):
    """The shared tokenizer's `tokenizer.model` path, a str (for `data.tokenizer=...`)."""
    return str(sp_tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def sp_tokenizer(sp_tokenizer_dir):
    """The shared tokenizer, loaded (a jaxlm SentencePieceTokenizer; 512 ids, bos/eos)."""
    from jaxlm.model.tokenizer import load_tokenizer
    return load_tokenizer(sp_tokenizer_dir)


def _tiny(cfg):
    import jaxlm
    return Tiny(cfg, jaxlm.init_params(cfg, jax.random.key(0)))


@pytest.fixture(scope="session")
def tiny_llama():
    """(cfg, params) of tiny_models.LLAMA: a Llama-style GQA decoder, vocab 97, 256
    positions, init_std 0.2 (peaked logits); params from key 0."""
    return _tiny(tiny_models.LLAMA)


@pytest.fixture(scope="session")
def tiny_gpt2():
    """(cfg, params) of tiny_models.GPT2: learned positions, LayerNorm, GELU, biases,
    tied embeddings; params from key 0."""
    return _tiny(tiny_models.GPT2)


@pytest.fixture(scope="session")
def tiny_mixtral():
    """(cfg, params) of tiny_models.MIXTRAL: the Llama with 4 experts, top-2; key 0."""
    return _tiny(tiny_models.MIXTRAL)


@pytest.fixture(scope="session")
def tiny_bert():
    """(cfg, params) of tiny_models.BERT: a BERT-style encoder (post-LN, biases, token
    types, tied MLM head), vocab 99, d_model 48; params from key 0."""
    return _tiny(tiny_models.BERT)


@pytest.fixture(scope="session")
def tiny_t5():
    """(cfg, params) of tiny_models.T5: a T5 v1.0-style encoder-decoder (relative
    buckets, ReLU, tied), vocab 99; params from key 0."""
    return _tiny(tiny_models.T5)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sp_tokenizer_dir):
    """tiny_checkpoint(family="llama") -> the path (a str) of a jaxlm checkpoint dir of
    that family (tiny_models.checkpoint_config: vocab 512, 32 positions, init_std 0.2,
    params from key 0) with the shared tokenizer in it; each saved once, when first
    asked for. Read-only: copy it (shutil.copytree) to change it."""
    import jaxlm
    made = {}

    def get(family="llama"):
        if family not in made:
            cfg = tiny_models.checkpoint_config(family)
            path = tmp_path_factory.mktemp(f"checkpoint_{family}") / "model"
            jaxlm.save(str(path), cfg, jaxlm.init_params(cfg, jax.random.key(0)))
            shutil.copy(sp_tokenizer_dir / "tokenizer.model", path / "tokenizer.model")
            made[family] = str(path)
        return made[family]

    return get


def pytest_sessionfinish(session):
    own = os.environ.get("_JAXLM_TESTS_OWN_CACHE")
    if own and not hasattr(session.config, "workerinput"):  # the controller, last
        shutil.rmtree(own, ignore_errors=True)
