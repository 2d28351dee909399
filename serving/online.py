"""Online serving without Ray: the /recommend request contract, users' histories, and a hot-swappable model.

This module owns what an HTTP front end (`jobs.serve`, on Ray Serve) needs besides the recommender itself:
- `parse_recommend_request`: a request body -> `RecommendRequest`, or a `RequestError` (HTTP status + one line);
- `UserHistories`: raw user id -> raw item ids, newest last, from the prepared interactions (for `user_id`
  requests; an unknown user is a 404);
- `ModelSlot`: the served `ItemRecommender` and where it came from; `refresh()` resolves a registry alias again and,
  when it names another version, loads that version beside the one serving and swaps the reference in one step
  (requests already running finish on the old model, none is refused); `start_polling` does it every N seconds;
- `answer`: a parsed request -> the JSON-ready response.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.recommender import ItemRecommender, RecommendationError

log = logging.getLogger(__name__)

MAX_K = 1000  # the most recommendations one request may ask for
MAX_HISTORY_IDS = 10_000  # the most history ids one request may send (the model reads only its last max_history)
MODES = ("exact", "hnsw", "funnel")


class RequestError(ValueError):
    """A request the service refuses: `status` is the HTTP status, the message one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RecommendRequest:
    history: list[str] | None  # raw item ids, newest last (None: look the user's up)
    user_id: str | None
    k: int = 10
    size: int | None = None
    exclude_history: bool = True
    candidates: list[str] | None = None
    mode: str | None = None


_FIELDS = {"history", "user_id", "k", "size", "exclude_history", "candidates", "mode"}


def _id_list(value: Any, name: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise RequestError(400, f"'{name}' must be a list of item ids (strings or integers)")
    if len(value) > limit:
        raise RequestError(400, f"'{name}' has {len(value)} ids; at most {limit} are accepted")
    return [str(v) for v in value]


def parse_recommend_request(body: bytes | str, *, max_k: int = MAX_K) -> RecommendRequest:
    """A POST /recommend body -> the request; `RequestError` (400/422) for anything malformed or out of range."""
    try:
        payload = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, 'the body must be a JSON object, e.g. {"history": ["50", "172"], "k": 10}')
    unknown = sorted(set(payload) - _FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(_FIELDS))}")
    has_history, has_user = payload.get("history") is not None, payload.get("user_id") is not None
    if has_history == has_user:
        raise RequestError(400, "give exactly one of 'history' (raw item ids, newest last) and 'user_id'")
    history = _id_list(payload["history"], "history", MAX_HISTORY_IDS) if has_history else None
    if history is not None and not history:
        raise RequestError(422, "'history' is empty: give at least one item id (or a 'user_id')")
    user_id = payload.get("user_id")
    if has_user and (isinstance(user_id, bool) or not isinstance(user_id, (str, int))):
        raise RequestError(400, "'user_id' must be a string or an integer")
    k = payload.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(422, f"'k' must be an integer from 1 to {max_k}, got {json.dumps(k)[:40]}")
    size = payload.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
        raise RequestError(422, f"'size' must be an integer (a served Matryoshka size) or null, got {json.dumps(size)[:40]}")
    exclude = payload.get("exclude_history", True)
    if not isinstance(exclude, bool):
        raise RequestError(422, "'exclude_history' must be true or false")
    candidates = payload.get("candidates")
    if candidates is not None:
        candidates = _id_list(candidates, "candidates", 1_000_000)
        if not candidates:
            raise RequestError(422, "'candidates' is empty: leave it out to rank the whole catalogue")
    mode = payload.get("mode")
    if mode is not None and mode not in MODES:
        raise RequestError(422, f"'mode' must be one of {', '.join(MODES)}, got {json.dumps(mode)[:40]}")
    return RecommendRequest(history=history, user_id=None if user_id is None else str(user_id), k=k, size=size,
                            exclude_history=exclude, candidates=candidates, mode=mode)


class UserHistories:
    """Raw user id -> raw item ids, oldest first, the last `keep` interactions (the prepared data's order:
    timestamp, then position in the raw file)."""

    def __init__(self, histories: dict[str, list[str]]) -> None:
        self._histories = histories

    @classmethod
    def from_prepared(cls, prepared_dir: Path, keep: int = 200) -> "UserHistories":
        from pipeline.sources import read_interactions

        frame = read_interactions(Path(prepared_dir))
        frame = frame.sort_values(["timestamp", "row_order"], kind="stable")
        grouped = frame.groupby(frame.user_id.astype(str), sort=False).item_id
        return cls({user: [str(i) for i in items.to_numpy()[-keep:]] for user, items in grouped})

    def __len__(self) -> int:
        return len(self._histories)

    def get(self, user_id: str) -> list[str]:
        history = self._histories.get(str(user_id))
        if history is None:
            raise RequestError(404, f"unknown user {str(user_id)[:80]!r}: no interactions in the prepared data")
        return history


@dataclass(frozen=True)
class ModelSource:
    """Where the served model comes from: a registry URI (`models:/NAME@ALIAS` follows the alias, `models:/NAME/3`
    is pinned) or a checkpoint directory."""

    model_uri: str = ""
    checkpoint: str = ""
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        if bool(self.model_uri) == bool(self.checkpoint):
            raise ValueError("give exactly one of a model URI (models:/NAME@ALIAS) and a checkpoint directory")

    @property
    def alias(self) -> str | None:
        if not self.model_uri:
            return None
        from training.registry import parse_model_uri

        return parse_model_uri(self.model_uri)[1]

    def resolve(self) -> tuple[str, str]:
        """-> (a pinned URI or checkpoint path to load, its version: "" for a checkpoint)."""
        if self.checkpoint:
            return self.checkpoint, ""
        from training.registry import resolve_model

        info = resolve_model(self.model_uri, self.tracking_uri)
        return info.uri, info.version


Loader = Callable[[str], ItemRecommender]  # a pinned URI or checkpoint path -> a ready recommender


@dataclass
class Served:
    recommender: ItemRecommender
    source: str  # the pinned URI (models:/NAME/VERSION) or the checkpoint directory
    version: str  # "" for a checkpoint
    loaded_at: float = field(default_factory=time.time)


class ModelSlot:
    """The model being served, swapped for a newly promoted one without a gap (see the module docstring)."""

    def __init__(self, source: ModelSource, loader: Loader) -> None:
        self.source = source
        self._loader = loader
        self._refresh_lock = threading.Lock()  # one load at a time; requests never take it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.last_check = 0.0
        target, version = source.resolve()
        self._served = Served(loader(target), target, version)

    @property
    def served(self) -> Served:
        return self._served  # one attribute read: a request sees the old or the new model, never a mix

    def refresh(self) -> bool:
        """Follow the alias: when it names another version, load it beside the current one and swap. -> swapped.
        A failure (registry down, a broken checkpoint) keeps the current model and is kept in `last_error`."""
        if self.source.alias is None:
            return False
        with self._refresh_lock:
            self.last_check = time.time()
            try:
                target, version = self.source.resolve()
                if version == self._served.version:
                    self.last_error = ""
                    return False
                replacement = Served(self._loader(target), target, version)
            except Exception as err:  # noqa: BLE001 -- serving goes on with the model it has
                self.last_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                log.warning("model refresh failed, still serving %s: %s", self._served.source, self.last_error)
                return False
            previous, self._served = self._served, replacement
            self.last_error = ""
            log.warning("now serving %s (was %s)", replacement.source, previous.source)
            return True

    def start_polling(self, interval_s: float) -> None:
        """Call `refresh` every `interval_s` seconds in a daemon thread (0 = never)."""
        if interval_s <= 0 or self.source.alias is None or self._thread is not None:
            return

        def poll() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._thread = threading.Thread(target=poll, name="model-slot-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def describe(self) -> dict[str, Any]:
        served = self._served
        return {"source": served.source, "version": served.version, "follows": self.source.model_uri or None,
                "loaded_at": served.loaded_at, "last_check": self.last_check or None,
                "last_refresh_error": self.last_error or None}


def load_warm_recommender(target: str, tracking_uri: str, *, prepared_dir: str | Path | None = None,
                          **options: Any) -> ItemRecommender:
    """A pinned `models:/NAME/VERSION` (or an alias) or a checkpoint directory -> an `ItemRecommender` that has
    answered one request in each mode it supports (exact, funnel when it has a smaller Matryoshka size), so its
    indexes are built before it serves."""
    if target.startswith("models:/"):
        recommender = ItemRecommender.from_model_uri(target, tracking_uri, prepared_dir=prepared_dir, **options)
    else:
        recommender = ItemRecommender.from_checkpoint(target, prepared_dir=prepared_dir, **options)
    import pyarrow.parquet as pq

    items = pq.read_table(recommender.source["items"], columns=["item_id"]).slice(0, 1)
    probe = [str(items.column("item_id")[0].as_py())]
    for mode in ("exact", "funnel") if recommender.funnel_size is not None else ("exact",):
        recommender.recommend(probe, 1, mode=mode)
    return recommender


def catalogue_dir(recommender: ItemRecommender) -> Path:
    """The prepared dataset the recommender's catalogue was read from (user histories come from there too)."""
    return Path(recommender.source["items"]).parent


def _history_of(request: RecommendRequest, histories: UserHistories | None) -> list[str]:
    if request.history is not None:
        return request.history
    if histories is None:
        raise RequestError(422, "this server has no user histories loaded: send 'history' instead of 'user_id'")
    return histories.get(request.user_id or "")


def _options(request: RecommendRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"exclude_history": request.exclude_history, "size": request.size,
                               "candidates": request.candidates}
    if request.mode is not None:
        options["mode"] = request.mode
    return options


def _response(served: Served, request: RecommendRequest, result) -> dict[str, Any]:
    return {
        "items": [{"item_id": item, "score": float(score)} for item, score in zip(result.item_ids, result.scores)],
        "unknown_history": list(result.unknown_history),
        "size": result.size,
        "model": {"source": served.source, "version": served.version},
        **({"user_id": request.user_id} if request.user_id is not None else {}),
    }


def _refused(err: RecommendationError) -> RequestError:
    return RequestError(422, str(err).splitlines()[0] if str(err) else "refused by the recommender")


def answer_batch(items: Sequence[tuple[Served, RecommendRequest]],
                 histories: UserHistories | None) -> list[dict[str, Any] | RequestError]:
    """Many parsed requests -> for each, its response or its `RequestError` (returned, not raised).

    Requests for the same model with the same options share one `recommend_batch` call (one sequence-model pass
    for all their histories: what dynamic batching in `jobs.serve` buys); a group the recommender refuses as a
    whole (one history of unknown items) is answered request by request, so only the bad one fails.
    """
    out: list[dict[str, Any] | RequestError | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, list[str]]]] = {}
    for position, (served, request) in enumerate(items):
        try:
            history = _history_of(request, histories)
        except RequestError as err:
            out[position] = err
            continue
        key = (id(served), request.k, request.size, request.mode, request.exclude_history,
               tuple(request.candidates) if request.candidates is not None else None)
        groups.setdefault(key, []).append((position, history))
    for members in groups.values():
        served, request = items[members[0][0]]
        try:
            results = served.recommender.recommend_batch([history for _, history in members], request.k,
                                                         **_options(request))
        except RecommendationError as err:
            if len(members) == 1:
                out[members[0][0]] = _refused(err)
                continue
            results = [None] * len(members)
        for (position, history), result in zip(members, results):
            served, request = items[position]
            if result is None:  # the group was refused: this request alone
                try:
                    result = served.recommender.recommend(history, request.k, **_options(request))
                except RecommendationError as err:
                    out[position] = _refused(err)
                    continue
            out[position] = _response(served, request, result)
    return out  # type: ignore[return-value]


def answer(served: Served, request: RecommendRequest, histories: UserHistories | None) -> dict[str, Any]:
    """A parsed request -> {"items": [{"item_id", "score"}], "unknown_history", "size", "model"}.
    `RequestError` 404 for an unknown user, 422 for what the recommender refuses (k, size, candidates...)."""
    (result,) = answer_batch([(served, request)], histories)
    if isinstance(result, RequestError):
        raise result
    return result
