"""Per-tenant quota enforcement: request and token rates, concurrency, stored versions, uploads, jobs.

The limits are `loraplex.adapters_store.tenancy.Quota`, stored per tenant in the registry; this module
only counts. Rates are sliding windows over the last minute kept in memory per tenant. A request is
admitted when the tenant is under every limit and counted at once, so a burst cannot overshoot by more
than the requests already admitted in the same instant; tokens are charged as they are known (the
prompt at submission, the completion when the request ends), so a tenant that used its tokens is
refused until enough of them have left the window, and `Retry-After` says when that is. A refused
request costs the engine nothing: it never reaches the batch, which is why other tenants keep their
latency.

The limits hold across replicas: every SHARE_INTERVAL_S each replica reports its counts for limited
tenants to the registry (`AccessRegistry.publish_usage`) and reads the sum of the others' reports, which
admission adds to its own. A tenant spread over replicas can therefore overshoot a limit by what the
other replicas admitted within one interval, and a replica that dies stops counting after
`USAGE_STALE_S`. `Retry-After` is exact for what this replica admitted and 1 s where only other
replicas' admissions hold the limit (their times are not shared).

Storage limits (versions, uploads, total file bytes, queued jobs) are checked against the stored state
where the change is made; they answer 413 for one upload that is too large and 429 for a tenant that
is out of room, naming the limit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import PayloadTooLarge as _TooLarge
from .errors import ResourceExhausted

WINDOW_S = 60.0
SHARE_INTERVAL_S = 0.25
log = logging.getLogger("loraplex.quotas")


def _limited(q) -> bool:
    return q.requests_per_minute is not None or q.tokens_per_minute is not None or q.concurrent_requests is not None


class QuotaExceeded(ResourceExhausted):
    """A tenant over one of its limits (429 / RESOURCE_EXHAUSTED); `retry_after` seconds when known."""

    def __init__(self, message: str, *, limit: str, retry_after: float | None = None):
        super().__init__(message, param=None, code=limit)
        self.limit = limit
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))


class PayloadTooLarge(_TooLarge):
    """One upload larger than the tenant's `max_upload_bytes` (413 / RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, *, limit: str):
        super().__init__(message, code=limit)
        self.limit = limit


@dataclass
class _Usage:
    requests: deque = field(default_factory=deque)  # admission times
    tokens: deque = field(default_factory=deque)  # (time, tokens)
    token_sum: int = 0
    running: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class RateLimiter:
    """Admission of inference requests per tenant against `quota_of(tenant)` (a Quota)."""

    def __init__(self, quota_of):
        self.quota_of = quota_of
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._others: dict[str, tuple[int, int, int]] = {}  # tenant -> other replicas' (requests, tokens, running)
        self._reported = False
        self._stop = threading.Event()

    # --- counts shared with the other replicas ---------------------------------------------------
    def share(self, peers, replica: str) -> None:
        """Reports this replica's counts of limited tenants to `peers` (an AccessRegistry) and reads theirs."""
        if not peers.quotas() and not self._reported:
            return  # no tenant has limits: nothing to count together
        now = time.monotonic()
        with self._lock:
            tenants = list(self._usage)
        limited = {t for t in tenants if _limited(self.quota_of(t))}
        mine = {}
        with self._lock:
            for t in limited:
                u = self._usage[t]
                u.expire(now)
                if u.requests or u.token_sum or u.running:
                    mine[t] = (len(u.requests), u.token_sum, u.running)
        if mine or self._reported:
            peers.publish_usage(replica, mine)
            self._reported = bool(mine)
        others = peers.peer_usage(replica)
        with self._lock:
            self._others = others

    def start_sharing(self, peers_of, replica: str) -> None:
        """Shares counts every SHARE_INTERVAL_S with `peers_of()` (the current AccessRegistry) until `close`."""

        def loop() -> None:
            while not self._stop.wait(SHARE_INTERVAL_S):
                peers = peers_of()
                if peers.store.registry.closed:
                    return
                try:
                    self.share(peers, replica)
                except Exception:
                    if self._stop.is_set() or peers.store.registry.closed:
                        return
                    log.exception("could not share quota usage through the registry")

        threading.Thread(target=loop, name="loraplex-quota-share", daemon=True).start()

    def close(self) -> None:
        self._stop.set()

    def admit(self, tenant: str) -> None:
        """Counts one request of `tenant`, or raises QuotaExceeded naming the limit; `release` it when done."""
        q = self.quota_of(tenant)
        if not _limited(q):
            with self._lock:
                self._usage.setdefault(tenant, _Usage()).running += 1
            return
        now = time.monotonic()
        with self._lock:
            u = self._usage.setdefault(tenant, _Usage())
            u.expire(now)
            o_req, o_tok, o_run = self._others.get(tenant, (0, 0, 0))
            running = u.running + o_run
            if q.concurrent_requests is not None and running >= q.concurrent_requests:
                raise QuotaExceeded(
                    f"tenant {tenant!r} already has {running} requests running, its limit "
                    f"(concurrent_requests={q.concurrent_requests})",
                    limit="concurrent_requests",
                    retry_after=1,
                )
            requests = len(u.requests) + o_req
            if q.requests_per_minute is not None and requests >= q.requests_per_minute:
                # when enough of this replica's admissions leave the window; 1 s if the others' must
                need = requests - q.requests_per_minute + 1
                wait = u.requests[need - 1] + WINDOW_S - now if need <= len(u.requests) else 1.0
                raise QuotaExceeded(
                    f"tenant {tenant!r} is over its limit of {q.requests_per_minute} requests per minute "
                    "(requests_per_minute)",
                    limit="requests_per_minute",
                    retry_after=wait,
                )
            tokens = u.token_sum + o_tok
            if q.tokens_per_minute is not None and tokens >= q.tokens_per_minute:
                left, wait = tokens, 1.0
                for at, n in u.tokens:  # oldest first: when enough have left the window to be under the limit
                    left -= n
                    wait = at + WINDOW_S - now
                    if left < q.tokens_per_minute:
                        break
                else:
                    wait = 1.0  # this replica's tokens leaving is not enough: the others' must
                raise QuotaExceeded(
                    f"tenant {tenant!r} used {tokens} tokens in the last minute, over its limit of "
                    f"{q.tokens_per_minute} (tokens_per_minute)",
                    limit="tokens_per_minute",
                    retry_after=wait,
                )
            u.requests.append(now)
            u.running += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            u = self._usage.get(tenant)
            if u is not None and u.running > 0:
                u.running -= 1

    def charge(self, tenant: str, tokens: int) -> None:
        if tokens <= 0:
            return
        with self._lock:
            u = self._usage.setdefault(tenant, _Usage())
            u.tokens.append((time.monotonic(), int(tokens)))
            u.token_sum += int(tokens)

    def usage(self, tenant: str) -> dict:
        now = time.monotonic()
        with self._lock:
            u = self._usage.get(tenant) or _Usage()
            u.expire(now)
            o_req, o_tok, o_run = self._others.get(tenant, (0, 0, 0))  # other replicas' (limited tenants only)
            return {
                "requests_last_minute": len(u.requests) + o_req,
                "tokens_last_minute": u.token_sum + o_tok,
                "running_requests": u.running + o_run,
            }


def check_upload(quota, tenant: str, size: int, stored: int) -> None:
    """One upload of `size` bytes by `tenant`, which stores `stored` bytes already."""
    if quota.max_upload_bytes is not None and size > quota.max_upload_bytes:
        raise PayloadTooLarge(
            f"upload of {size} bytes is over tenant {tenant!r}'s limit of {quota.max_upload_bytes} bytes "
            "per upload (max_upload_bytes)",
            limit="max_upload_bytes",
        )
    if quota.file_storage_bytes is not None and stored + size > quota.file_storage_bytes:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {stored} bytes of files; {size} more would exceed its limit of "
            f"{quota.file_storage_bytes} bytes (file_storage_bytes)",
            limit="file_storage_bytes",
        )


def check_versions(quota, tenant: str, stored: int) -> None:
    if quota.adapter_versions is not None and stored >= quota.adapter_versions:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {stored} adapter versions, its limit (adapter_versions="
            f"{quota.adapter_versions}); delete versions to register more",
            limit="adapter_versions",
        )


def check_jobs(quota, tenant: str, queued: int) -> None:
    if quota.queued_jobs is not None and queued >= quota.queued_jobs:
        raise QuotaExceeded(
            f"tenant {tenant!r} has {queued} fine-tuning jobs waiting, its limit (queued_jobs={quota.queued_jobs})",
            limit="queued_jobs",
            retry_after=60,
        )
