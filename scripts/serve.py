"""`jaxlm serve`: an OpenAI-compatible server on a checkpoint (`jaxlm.infer.serve`)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a jaxlm run/checkpoint dir or a "
                   "Hugging Face dir (a decoder)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default "
                   "127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    p.add_argument("--config", help="optional YAML with generate:, serve: and mesh: sections")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", help="the model name requests give (default the "
                   "checkpoint dir's name)")
    p.add_argument("--step", type=int, help="the checkpoint step (default the latest)")
    p.add_argument("overrides", nargs="*", metavar="serve.key=value|generate.key=value|mesh...",
                   help="config overrides (and model.* keys that keep the weights' shapes)")


def run_serve(args) -> int:
    import logging
    import socket

    from ..errors import InputError
    from ..infer.serve import load_served, run, start
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            raise InputError(f"jaxlm serve needs {module}: pip install 'jaxlm[serve]'") from None
    if not 0 <= args.port < 65536:
        raise InputError(f"--port={args.port} must be in [0, 65535]")
    import jax

    from ..sharding.distributed import initialize, share_from_zero
    initialize(args.coordinator, args.num_processes, args.process_id,  # before any device use
               timeout_s=args.coordinator_timeout)
    served, cfg, mesh = load_served(args.checkpoint, args.overrides, args.config,
                                    args.served_model_name, args.step)
    sock, error = None, None
    if jax.process_index() == 0:
        try:  # bind before the engine compiles: a port in use is a one-line error
            sock = socket.create_server((args.host, args.port))
        except OSError as e:
            error = f"cannot listen on {args.host}:{args.port}: {e.strerror}"
    error = share_from_zero(error)  # every process stops on it
    if error is not None:
        raise InputError(error)
    if jax.process_index() != 0:
        from ..infer.serve import follow
        follow(served, mesh, cfg.mesh.rules)
        return 0
    server = start(served, mesh, cfg.mesh.rules, api_key=args.api_key)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host, port = sock.getsockname()[:2]
    print(f"serving {served.name!r} on http://{host}:{port}/v1", flush=True)
    run(server, sock=sock)
    if server.worker.thread.is_alive():  # a step still compiling: leave without waiting
        import os
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
