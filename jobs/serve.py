"""Serve recommendations over HTTP with Ray Serve: POST /recommend, GET /healthz, GET /model.

    python -m jobs.serve                                   # models:/mmrec@champion, http://127.0.0.1:8000
    python -m jobs.serve --model models:/mmrec/3 --port 8080
    python -m jobs.serve --checkpoint runs/tiny-.../checkpoint_...
    serve run jobs.serve:app_builder model=models:/mmrec@champion poll_s=30       # on a running Ray cluster
    ray job submit --working-dir . -- python -m jobs.serve --host 0.0.0.0
Locally it starts Ray (or joins the cluster named by RAY_ADDRESS), deploys, prints the URL and blocks until Ctrl-C
(or SIGTERM), then deletes the application. Given an alias (the default follows @champion), every replica checks
the registry every --poll-s seconds and, when the alias names another version, loads it beside the one serving
and swaps: a promoted challenger is served without a restart and without refusing requests. Requests that
arrive together are answered by one model pass (dynamic batching: --max-batch, --batch-wait-ms).

    curl -s localhost:8000/recommend -d '{"history": ["50", "172", "181"], "k": 5}'
    curl -s localhost:8000/recommend -d '{"user_id": "42", "k": 10, "size": 32, "mode": "funnel"}'
Request fields: history (raw item ids, newest last) or user_id (its history from the prepared data), k (1..1000,
default 10), size (a served Matryoshka size), exclude_history (default true), candidates (raw ids to rank among),
mode (exact | hnsw | funnel). Bad requests get a 4xx and {"error": "<one line>"}.
"""
import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from jobs.cli import run_main
from model.config import valid_new_item_offset
from serving.online import (ModelSlot, ModelSource, RecommendRequest, RequestError, Served, UserHistories,
                            answer_batch, catalogue_dir, load_warm_recommender, parse_recommend_request)

APP_NAME = "mmrec"
log = logging.getLogger("jobs.serve")


@dataclass(kw_only=True)
class ServeOptions:
    """Everything the application is built from; `python -m jobs.serve --help` and `serve run ... key=value` name
    the same fields."""

    model: str = field(default="", metadata={"help": "registered model to serve, models:/NAME@ALIAS (the alias is "
                                                     "followed) or models:/NAME/VERSION; default: models:/<tracking."
                                                     "registered_model>@champion"})
    checkpoint: str = field(default="", metadata={"help": "serve a training checkpoint directory instead"})
    tracking_uri: str = field(default="", metadata={"help": 'MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else '
                                                            "sqlite:///<cwd>/mlflow.db"})
    prepared_dir: str = field(default="", metadata={"help": "prepared data for user_id requests (their histories) "
                                                            "and the catalogue; default: the model's data.prepared_dir"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host (0.0.0.0 to listen on every interface)"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    route_prefix: str = field(default="/", metadata={"help": "URL prefix of the routes"})
    poll_s: float = field(default=10.0, metadata={"help": "seconds between checks of the alias (0 = never)"})
    replicas: int = field(default=1, metadata={"help": "Ray Serve replicas"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs each replica reserves (also its torch "
                                                                   "threads, at least 1)"})
    max_ongoing_requests: int = field(default=32, metadata={"help": "requests a replica works on at once"})
    max_batch: int = field(default=16, metadata={"help": "requests answered together by one model pass (dynamic "
                                                         "batching; 1 = one at a time)"})
    batch_wait_ms: float = field(default=2.0, metadata={"help": "how long a request waits for others to batch with"})
    user_histories: bool = field(default=True, metadata={"help": "load users' histories from the prepared data "
                                                                 "(user_id requests)"})
    new_item_offset: str = field(default="", metadata={"help": "added to the cosine score of the items in no "
                                                               "training example, in [-2, 2]; \"\" = the model's "
                                                               "model.new_item_offset"})

    def __post_init__(self) -> None:
        from training.overrides import ConfigError

        if self.model and self.checkpoint:
            raise ConfigError("give at most one of --model and --checkpoint")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if (self.poll_s < 0 or self.replicas < 1 or self.cpus_per_replica <= 0 or self.max_ongoing_requests < 1
                or self.max_batch < 1 or self.batch_wait_ms < 0):
            raise ConfigError("--poll-s and --batch-wait-ms must be >= 0, --replicas, --max-ongoing-requests and "
                              "--max-batch >= 1, --cpus-per-replica > 0")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"--route-prefix must start with '/', got {self.route_prefix!r}")
        try:
            offset = self.recommender_options().get("new_item_offset", 0.0)
        except ValueError:
            raise ConfigError(f"--new-item-offset must be a number, got {self.new_item_offset!r}") from None
        if not valid_new_item_offset(offset):
            raise ConfigError(f"--new-item-offset must be in [-2, 2], got {self.new_item_offset}")

    def recommender_options(self) -> dict[str, Any]:
        """Keywords of `ItemRecommender` these options set."""
        return {"new_item_offset": float(self.new_item_offset)} if self.new_item_offset.strip() else {}

    @classmethod
    def from_strings(cls, values: dict[str, Any]) -> "ServeOptions":
        """`serve run jobs.serve:app_builder key=value ...` arguments (strings) -> options; ConfigError if wrong."""
        from training.overrides import ConfigError

        kinds = {f.name: _type_name(f) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ConfigError(f"unknown serve argument(s) {', '.join(unknown)}; valid: {', '.join(kinds)}")
        parsed: dict[str, Any] = {}
        for key, value in values.items():
            kind = kinds[key]
            try:
                if kind == "bool":
                    if str(value).lower() not in ("true", "false", "1", "0"):
                        raise ValueError(value)
                    parsed[key] = str(value).lower() in ("true", "1")
                else:
                    parsed[key] = {"int": int, "float": float}.get(kind, str)(value)
            except ValueError:
                raise ConfigError(f"serve argument {key}={value!r} is not a valid {kind}") from None
        return cls(**parsed)

    def resolved(self) -> "ServeOptions":
        """The tracking URI and default model filled in (done by the driver: replicas may run elsewhere)."""
        from training.config import TrackingConfig
        from training.tracking import resolve_tracking_uri

        tracking = TrackingConfig(tracking_uri=self.tracking_uri)
        model = self.model or ("" if self.checkpoint else f"models:/{tracking.registered_model}@champion")
        return dataclasses.replace(self, model=model, tracking_uri=resolve_tracking_uri(tracking))


def _load_recommender(target: str, options: ServeOptions):
    """A pinned models:/NAME/VERSION or a checkpoint directory -> a recommender, its indexes built and warmed by one
    request per mode before it serves (a swap never makes the first requests pay for them)."""
    return load_warm_recommender(target, options.tracking_uri, prepared_dir=options.prepared_dir or None,
                                 **options.recommender_options())


api = FastAPI(title="mmrec recommendations", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(HTTPException)
async def _http_error(_request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method: one JSON line
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "malformed request"}, status_code=400)


@serve.deployment(name="Recommender", health_check_period_s=10)
@serve.ingress(api)
class RecommenderDeployment:
    """One replica: a `ModelSlot` (the served model, following the alias) and the users' histories."""

    def __init__(self, options: ServeOptions) -> None:
        import torch

        torch.set_num_threads(max(1, int(options.cpus_per_replica)))
        self.options = options
        source = ModelSource(model_uri=options.model, checkpoint=options.checkpoint, tracking_uri=options.tracking_uri)
        self.slot = ModelSlot(source, lambda target: _load_recommender(target, options))
        self.histories = (UserHistories.from_prepared(catalogue_dir(self.slot.served.recommender))
                          if options.user_histories else None)
        self.started = time.time()
        self._answer_together.set_max_batch_size(options.max_batch)
        self._answer_together.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
        self.slot.start_polling(options.poll_s)

    def check_health(self) -> None:  # Serve replaces a replica that stopped following its alias
        if self.options.poll_s > 0 and self.slot.source.alias is not None and not self.slot.polling:
            raise RuntimeError("the model poll thread stopped")

    @api.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        try:
            parsed = parse_recommend_request(await request.body())
            served = self.slot.served  # this request is answered by this model, whatever is swapped in meanwhile
            result = await self._answer_together((served, parsed))
            if isinstance(result, RequestError):
                raise result
            return JSONResponse(result)
        except RequestError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        except Exception as err:  # noqa: BLE001 -- one line to the client, the traceback to the replica's log
            log.exception("recommend failed")
            first = str(err).splitlines()[0][:200] if str(err) else ""
            return JSONResponse({"error": f"internal error: {type(err).__name__}: {first}"}, status_code=500)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _answer_together(self, items: list[tuple[Served, RecommendRequest]]) -> list:
        """Requests that arrive together share one model pass (`serving.online.answer_batch`), off the event loop."""
        return await run_in_threadpool(answer_batch, items, self.histories)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "version": self.slot.served.version,
                "uptime_s": round(time.time() - self.started, 1)}

    @api.get("/model")
    def model(self) -> dict:
        return {**self.slot.describe(), "info": self.slot.served.recommender.info(),
                "user_histories": len(self.histories) if self.histories is not None else 0}


def build_app(options: ServeOptions) -> Application:
    """The application for `options` (tracking URI and default model resolved here, in the driver)."""
    options = options.resolved()
    return RecommenderDeployment.options(
        num_replicas=options.replicas, ray_actor_options={"num_cpus": options.cpus_per_replica},
        max_ongoing_requests=options.max_ongoing_requests,
    ).bind(options)


def app_builder(args: dict[str, str]) -> Application:
    """`serve run jobs.serve:app_builder key=value ...` (keys: the ServeOptions fields). `host` and `port` are not
    the application's: Serve's HTTP options decide them (127.0.0.1:8000, or a Serve config file's http_options)."""
    return build_app(ServeOptions.from_strings(args))


def _type_name(spec: dataclasses.Field) -> str:
    return spec.type if isinstance(spec.type, str) else spec.type.__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    for spec in dataclasses.fields(ServeOptions):
        target = source if spec.name in ("model", "checkpoint") else parser
        flag = "--" + spec.name.replace("_", "-")
        if _type_name(spec) == "bool":
            target.add_argument(flag, default=spec.default, action=argparse.BooleanOptionalAction,
                                help=spec.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(_type_name(spec), str)
            shown = f" (default: {spec.default})" if spec.default != "" else ""
            target.add_argument(flag, dest=spec.name, type=kind, default=spec.default,
                                help=spec.metadata["help"] + shown)
    return parser


def _check_source(options: ServeOptions) -> None:
    """Fail in the driver, in one line, before anything is deployed: no such alias/version/checkpoint."""
    from training.overrides import ConfigError
    from training.registry import RegistryError, resolve_checkpoint

    try:
        resolve_checkpoint(options.model or None, options.checkpoint or None, options.tracking_uri)
    except RegistryError as err:
        raise ConfigError(str(err)) from None


def main() -> int:
    args = _parser().parse_args()
    options = ServeOptions(**vars(args)).resolved()
    _check_source(options)

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # ray job submit, or a cluster named by the caller
            ray.init(logging_level="WARNING")
        else:
            ray.init(num_cpus=max(os.cpu_count() or 2, 2), include_dashboard=False, logging_level="WARNING")
    serve.start(http_options={"host": options.host, "port": options.port})
    try:
        serve.run(build_app(options), name=APP_NAME, route_prefix=options.route_prefix)
    except RuntimeError as err:
        print(f"error: the application did not start: {str(err).strip().splitlines()[0][:300]}", file=sys.stderr)
        return 1
    where = options.model or options.checkpoint
    print(f"[serve] {where} at http://{options.host}:{options.port}{options.route_prefix.rstrip('/')}/recommend "
          f"(GET /healthz, GET /model); alias checked every {options.poll_s:g}s; Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("[serve] stopping", flush=True)
    serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    run_main(main)
