"""``xllm-master``: the cluster's OpenAI-compatible front door and gRPC control plane.

One event loop runs the HTTP API (xllm.api's app over a :class:`ClusterEngine`), the gRPC
``Master`` service (registration and heartbeats), the registry (embedded, or etcd with
``--etcd``) and the streams to the instances. ``--spawn N`` starts N local ``xllm-server``
instances pointed at this master, passing on the engine options given here (``--model``,
``--num-threads`` ...), and stops them on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
import uvicorn

from xllm.api.app import build_app
from xllm.api.errors import APIError
from xllm.api.server import _listen_url, _Server, add_server_options, settings_from_args
from xllm.config import EngineConfig, add_engine_options, engine_config_from_args
from xllm.service.master import ClusterEngine, MasterServicer, ModelFacts
from xllm.service.pd import PD_POLICIES, PdController, load_speed_model
from xllm.service.proto import master_pb2_grpc
from xllm.service.registry import EmbeddedRegistry, InstanceRegistry
from xllm.service.routing import POLICIES, Router
from xllm.service.state import SpareCapacity

__all__ = ["build_parser", "main"]

logger = logging.getLogger("xllm.master")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xllm-master", description="xllm cluster master: OpenAI-compatible front door")
    add_server_options(parser)
    # add_server_options also adds the instance-side cluster flags; the master's own differ.
    for action in list(parser._actions):
        if action.dest in ("master", "etcd", "grpc_port", "instance_id"):
            parser._remove_action(action)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            for opt in action.option_strings:
                parser._option_string_actions.pop(opt, None)
    parser.set_defaults(port=8080)
    m = parser.add_argument_group("master options")
    m.add_argument("--grpc-port", type=int, default=0,
                   help="port of the gRPC Master service (0 picks a free one)")
    m.add_argument("--etcd", metavar="HOST:PORT", help="keep the registry in this etcd")
    m.add_argument("--policy", default="least_load", choices=sorted(POLICIES))
    m.add_argument("--spawn", type=int, default=0, metavar="N",
                   help="start N local xllm-server instances (stopped on exit)")
    m.add_argument("--spawn-prefill", type=int, default=0, metavar="P",
                   help="start P local prefill instances (--role prefill)")
    m.add_argument("--spawn-decode", type=int, default=0, metavar="D",
                   help="start D local decode instances (--role decode)")
    m.add_argument("--spawn-nice", type=int, default=10, metavar="N",
                   help="niceness added to the spawned instances (0: none), so that the "
                        "master, which routes every request, keeps a core when its "
                        "instances saturate the host")
    m.add_argument("--max-attempts", type=int, default=4,
                   help="instances one request may use (first try + resumes)")
    m.add_argument("--heartbeat-timeout", type=float, default=1.0,
                   help="seconds of silence after which an instance is dead")
    pd = parser.add_argument_group("prefill/decode disaggregation (docs/cluster.md)")
    pd.add_argument("--pd-policy", default="static", choices=PD_POLICIES,
                    help="static: instances keep the roles they start with; dynamic: the "
                         "planner switches roles to the split whose predicted SLO "
                         "attainment is best for the measured traffic")
    pd.add_argument("--slo-ttft-ms", type=float, default=None, metavar="MS",
                    help="the time-to-first-token objective the planner (and overflow) "
                         "plans for")
    pd.add_argument("--slo-tpot-ms", type=float, default=None, metavar="MS",
                    help="the time-per-output-token objective the planner (and overflow) "
                         "plans for")
    pd.add_argument("--pd-overflow", action="store_true",
                    help="with prefill and decode instances (either policy), a new request "
                         "that every prefill instance would start later than --slo-ttft-ms "
                         "goes whole to a decode instance that would start it sooner with "
                         "its decodes within --slo-tpot-ms (docs/cluster.md)")
    pd.add_argument("--pd-interval", type=float, default=5.0, metavar="S",
                    help="seconds between planning rounds")
    pd.add_argument("--pd-min-dwell", type=float, default=30.0, metavar="S",
                    help="seconds a split stays at least before the next switch")
    pd.add_argument("--pd-window", type=float, default=15.0, metavar="S",
                    help="seconds of traffic the planner measures")
    pd.add_argument("--speed-model", metavar="FILE",
                    help="plan with this speed model (JSON, as bench.speed_model writes) "
                         "instead of the instances' reported ones; without it, spawned "
                         "instances take a start-up profile (--profile-speed)")
    o = parser.add_argument_group("offline requests (\"offline\": true)")
    o.add_argument("--offline-queue-size", type=int, default=1024, metavar="N",
                   help="offline requests that may wait at the master for spare capacity "
                        "(more are answered 503)")
    o.add_argument("--offline-max-kv-usage", type=float, default=0.9, metavar="F",
                   help="an instance takes offline work only below this KV cache usage")
    o.add_argument("--offline-max-waiting", type=int, default=0, metavar="N",
                   help="... and only with at most N requests queued in its scheduler")
    add_engine_options(parser)  # the model (tokenizer, context) and the spawned engines
    return parser


def _engine_argv(config: EngineConfig) -> list[str]:
    """The flags that recreate ``config`` on an xllm-server command line."""
    default = EngineConfig()
    argv: list[str] = []
    for f in dataclasses.fields(EngineConfig):
        if f.name == "extra":
            continue
        value = getattr(config, f.name)
        if value == getattr(default, f.name) and f.name != "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


# What a spawned instance runs before xllm.api.server: die with the master (PR_SET_PDEATHSIG),
# set here after exec rather than in a preexec_fn -- Python code between fork and exec in a
# process with threads (the master's gRPC threads) can deadlock, and did: on a loaded machine
# about one cluster start in ten left an instance hung before exec ("epoll_wait error: Bad
# file descriptor" in the log, the instance never up). Without a preexec_fn, subprocess runs
# no Python in the child. If the master died before the prctl, the parent pid shows it.
_INSTANCE_BOOT = """\
import ctypes, os, runpy, signal, sys
master = int(sys.argv.pop(1))
os.nice(int(sys.argv.pop(1)))  # before any thread starts: threads inherit it
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except OSError:
    pass
if os.getppid() != master:
    sys.exit("xllm-server: the xllm-master that spawned this instance is gone")
runpy.run_module("xllm.api.server", run_name="__main__", alter_sys=True)
"""


def spawn_instances(n: int, master: str, config: EngineConfig, host: str,
                    log_level: str, etcd: str | None = None,
                    nice: int = 0, role: str = "mixed", extra: Sequence[str] = ()
                    ) -> list[subprocess.Popen[bytes]]:
    """N local xllm-server instances registering with ``master`` (or in ``etcd``), their
    niceness raised by ``nice``: on a host they saturate, the master's routing otherwise
    waits for a scheduler slice now and then (bench.cluster: 1-2 decisions in 96 took
    3-4 ms at nice 0, against a p50 of ~60 us)."""
    join = ["--etcd", etcd] if etcd else ["--master", master]
    cmd = [sys.executable, "-c", _INSTANCE_BOOT, str(os.getpid()), str(nice), "--host", host,
           "--port", "0", *join, "--log-level", log_level, "--role", role,
           *extra, *_engine_argv(config)]
    return [subprocess.Popen(cmd) for _ in range(n)]


def stop_instances(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def _run(args: argparse.Namespace, config: EngineConfig) -> int:
    from xllm.loader import resolve_model
    from xllm.models.config import ModelConfig
    from xllm.tokenizer import Tokenizer

    settings = settings_from_args(args)
    if not settings.served_model_names:
        settings.served_model_names = [config.model]
    model_dir = resolve_model(config.model)
    model_config = ModelConfig.from_file(model_dir)
    grpc_server = grpc.aio.server()
    port = grpc_server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    if port == 0:
        raise ValueError(f"grpc-port: cannot listen on {args.host}:{args.grpc_port}")
    address = f"{args.host}:{port}"
    registry: InstanceRegistry
    if args.etcd:
        from xllm.service.etcd_registry import EtcdRegistry

        registry = EtcdRegistry(args.etcd, address, heartbeat_timeout_s=args.heartbeat_timeout)
    else:
        registry = EmbeddedRegistry(heartbeat_timeout_s=args.heartbeat_timeout)
    master_pb2_grpc.add_MasterServicer_to_server(MasterServicer(registry), grpc_server)
    facts = ModelFacts(Tokenizer.from_dir(model_dir), model_config,
                       config.max_model_len or model_config.max_position_embeddings, registry)
    spare = SpareCapacity(args.offline_max_kv_usage, args.offline_max_waiting)
    pd = PdController(args.pd_policy, slo_ttft_ms=args.slo_ttft_ms,
                      slo_tpot_ms=args.slo_tpot_ms, interval_s=args.pd_interval,
                      min_dwell_s=args.pd_min_dwell, window_s=args.pd_window,
                      speed_model=load_speed_model(args.speed_model) if args.speed_model
                      else None, overflow=args.pd_overflow)
    cluster = ClusterEngine(config, facts, registry,
                            Router(args.policy, config.block_size, spare),
                            max_attempts=args.max_attempts,
                            max_offline_queued=args.offline_queue_size, pd=pd)
    app = build_app(cluster, settings, shutdown_engine=False)
    cluster.metrics.register(app.state.serving.metrics.registry)  # on the same /metrics

    @app.get("/cluster/instances")
    async def instances() -> list[dict[str, object]]:
        """The live instances: role, last reported load (its speed model among it), the KV
        blocks the master's prefix index records for each per tier (pool, cpu, disk), and
        the PD planner's recent decisions that moved it, with their reasons."""
        moved: dict[str, list[dict[str, object]]] = {}
        for record in pd.decisions:
            for move in record.moves:
                moved.setdefault(move["instance"], []).append(
                    {"time": record.time, "from": move["from"], "to": move["to"],
                     "reason": record.reason, "switch_seconds": record.switch_seconds})
        return [{"instance_id": v.instance_id, "incarnation_id": v.incarnation_id,
                 "address": v.info.address, "role": v.info.role,
                 "load": dataclasses.asdict(v.load),
                 "kv_blocks": registry.index.blocks_per_tier(v.slot),
                 "pd_decisions": moved.get(v.instance_id, [])}
                for v in registry.routable()]

    @app.post("/cluster/role")
    async def set_role(body: dict[str, object]) -> dict[str, object]:
        """Switches an instance's role by hand (operators; the dynamic planner does it by
        itself): {"instance_id": ..., "role": "prefill" | "decode" | "mixed",
        "drain_timeout_s": 30, "migrate": true}. Answers once the instance confirms: the
        requests it let finish, those still running at the timeout, those it handed off
        (to prefill with migrate: decoding requests go on elsewhere, their KV fetched),
        and the seconds it took."""
        iid, role = body.get("instance_id"), body.get("role")
        drain = body.get("drain_timeout_s", 30.0)
        migrate = body.get("migrate", True)
        if not isinstance(migrate, bool):
            raise APIError.bad_request("migrate must be true or false", param="migrate")
        if role not in ("prefill", "decode", "mixed"):
            raise APIError.bad_request("role must be prefill, decode or mixed", param="role")
        if not isinstance(drain, (int, float)) or not 0 < drain <= 3600:
            raise APIError.bad_request("drain_timeout_s must be a number in (0, 3600]",
                                       param="drain_timeout_s")
        if not isinstance(iid, str) or registry.get(iid) is None:
            raise APIError(404, f"no live instance {iid!r}", param="instance_id")
        t0 = time.monotonic()
        try:
            resp = await cluster.switch_role(iid, str(role), float(drain), migrate)
        except grpc.aio.AioRpcError as e:
            raise APIError(502, f"instance {iid}: {e.code().name}: {e.details()}") from None
        return {"instance_id": iid, "role": resp.role, "drained": resp.drained,
                "still_running": resp.still_running, "migrated": resp.migrated,
                "seconds": round(time.monotonic() - t0, 3)}

    @app.get("/cluster/pd")
    async def pd_status() -> dict[str, object]:
        """The PD planner: policy, SLOs, its latest round and its recent switches."""
        return pd.view()

    @app.get("/cluster/status")
    async def status() -> dict[str, object]:
        """This master's view: leadership (etcd), live instances, offline queue, resumes."""
        return {"is_leader": registry.is_leader, "num_instances": len(registry.routable()),
                "offline_queued": len(cluster.admission), "num_resumed": cluster.num_resumed}

    server = _Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                    log_config=None, access_log=settings.access_log,
                                    lifespan="on", timeout_graceful_shutdown=int(
                                        max(1, settings.grace_period_s))))
    await registry.start()
    await grpc_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    # The dynamic planner needs speed models: spawned instances profile themselves first.
    profile = ["--profile-speed"] if args.pd_policy == "dynamic" and not args.speed_model else []
    try:
        for count, role in ((args.spawn, "mixed"), (args.spawn_prefill, "prefill"),
                            (args.spawn_decode, "decode")):
            if count:
                procs += spawn_instances(count, address, config, args.host, args.log_level,
                                         args.etcd, args.spawn_nice, role, profile)
        cluster.start_pd()
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            logger.info("xllm-master serving %s on %s (gRPC %s, policy %s%s)",
                        ", ".join(settings.served_model_names),
                        _listen_url(server, settings.host), address, args.policy,
                        f", spawned {args.spawn} mixed, {args.spawn_prefill} prefill, "
                        f"{args.spawn_decode} decode" if procs else "")
        await task
        return 0
    finally:
        await cluster.close()
        await asyncio.to_thread(stop_instances, procs)
        await grpc_server.stop(1.0)
        await registry.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config_from_args(args)
        for name in ("spawn", "spawn_prefill", "spawn_decode"):
            if getattr(args, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(args, name)}")
        if not 0 <= args.spawn_nice <= 19:
            raise ValueError(f"spawn-nice must be in [0, 19], got {args.spawn_nice}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("pd_interval", "pd_window"):
            if not getattr(args, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got "
                                 f"{getattr(args, name)}")
        if args.pd_min_dwell < 0:
            raise ValueError(f"pd-min-dwell must be >= 0, got {args.pd_min_dwell}")
        if args.speed_model:
            load_speed_model(args.speed_model)  # a bad file fails here, with its reason
        if args.offline_queue_size < 0:
            raise ValueError(f"offline-queue-size must be >= 0, got {args.offline_queue_size}")
        if not 0.0 < args.offline_max_kv_usage <= 1.0:
            raise ValueError(f"offline-max-kv-usage must be in (0, 1], got "
                             f"{args.offline_max_kv_usage}")
        if args.offline_max_waiting < 0:
            raise ValueError(f"offline-max-waiting must be >= 0, got {args.offline_max_waiting}")
    except ValueError as e:
        print(f"xllm-master: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
