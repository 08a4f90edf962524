"""The server's fine-tuning job queue: uploaded files, persistent jobs, one subprocess per running job.

State lives in a `Registry` (adapters_store/registry.py, the store's own seam): by default the SQLite
file `jobs.sqlite3` under the jobs directory, or, when the server runs with `--registry postgresql://...`,
the shared PostgreSQL registry, whose replicas then share one queue: a file uploaded on one is listed
and read on every other, a job created on one is seen, cancelled or paused from any. The files and the
jobs' directories (checkpoints, event logs) are then under `<store>/jobs`, the store directory every
replica already shares; the rows name them relative to that folder.

A job runs on exactly one replica: the one holding its lease (`ft_leases`: holder, expiry), which a
thread renews every `lease_seconds / 4`. A replica whose lease expires (it died, or lost the database
for longer than the lease) is replaced: any replica's watcher finds the running job without a live
lease, queues it again, and the first with a free slot claims it and resumes it from its last
checkpoint; the job's events say which replica took over from which. A replica that finds its lease
taken (it was cut off too long) kills its copy of the job at once. Restarting the only server is the
same case. Queued jobs are claimed under the registry's write lock, so two replicas never start the
same job, and a tenant's concurrent-jobs quota (`may_start`) counts the running jobs of every replica.

Pause asks the job's process to checkpoint at the end of its current step and exit (a stop file in the
job's directory, core.STOP_FILE_ENV); resume queues it again, to continue from that checkpoint, so the
loss curve is that of an uninterrupted run. By default one job runs at a time per replica
(`max_concurrent`). A job's process writes events to its directory; the holder's watcher copies them
into the database (with the offset it has read, so a replica taking over goes on where the last one
stopped), and when the process exits records success (the registered adapter becomes
`fine_tuned_model`) or the reason it failed. Cancel terminates the job's process group (the holder's
watcher does it when another replica cancelled).

This is a multi-tenant surface, so every input is bounded where it enters:
a request is parsed by `job_request` (an allow-list of training knobs; the
operator owns methods, paths, devices, names and code), uploads stream to
disk under a size limit and are validated line by line as they arrive
(`Upload`), the queue has a length limit, a job a wall-clock limit, and
everything handed back to a client (job errors, events, checkpoints) passes
through `_public`, which replaces server paths by names the client knows.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from loraplex.adapters_store.errors import LoraplexError, kind_for_status
from loraplex.adapters_store.registry import Registry, SQLiteRegistry
from loraplex.adapters_store.tenancy import qualify

from .core import STOP_FILE_ENV, few_steps_warning
from .hyperparams import LORA_BASE_LR
from .hyperparams import resolve as resolve_hyperparameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ft_files (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, filename TEXT, bytes INTEGER, created_at INTEGER,
  purpose TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS ft_jobs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, created_at INTEGER, status TEXT, model TEXT,
  training_file TEXT, validation_file TEXT, suffix TEXT, seed INTEGER, method TEXT, hyperparameters TEXT, config TEXT,
  fine_tuned_model TEXT, error TEXT, finished_at INTEGER, trained_tokens INTEGER, pid INTEGER, metadata TEXT,
  result_files TEXT, plan TEXT, replica TEXT, took_over_from TEXT, events_offset INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS ft_jobs_status ON ft_jobs(status, seq);
CREATE TABLE IF NOT EXISTS ft_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT, created_at INTEGER, level TEXT, type TEXT, message TEXT,
  data TEXT);
CREATE INDEX IF NOT EXISTS ft_events_job ON ft_events(job_id, id);
CREATE TABLE IF NOT EXISTS ft_checkpoints (
  job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL, train_loss REAL, valid_loss REAL,
  PRIMARY KEY (job_id, step));
CREATE TABLE IF NOT EXISTS ft_leases (
  job_id TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL, acquired_at REAL NOT NULL);
"""
# jobs.sqlite3 of before the registry seam: tables `files`, `jobs`, `events`, copied into the ft_ tables once
_LEGACY_COLUMNS = {
    "files": "id, filename, bytes, created_at, purpose, path",
    "jobs": "id, created_at, status, model, training_file, validation_file, suffix, seed, method, hyperparameters, "
    "config, fine_tuned_model, error, finished_at, trained_tokens, pid, metadata, result_files, plan",
    "events": "id, job_id, created_at, level, type, message, data",
}
DEFAULT_LEASE_SECONDS = 10.0  # a job whose replica has not renewed its lease for this long is taken over

TERMINAL = ("succeeded", "failed", "cancelled")
STOP_FILE = "stop"  # in a job's directory: present = checkpoint at the end of this step and exit (a pause)
PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "user_data", "evals")

# Limits an operator sets with `loraplex serve` flags (the defaults live here, ServeConfig uses them)
DEFAULT_MAX_UPLOAD_BYTES = 512 << 20
DEFAULT_MAX_QUEUED_JOBS = 16
DEFAULT_MAX_JOB_SECONDS = 24 * 3600
MAX_LINE_BYTES = 8 << 20  # one JSONL record; held in memory while it is checked
MAX_FILENAME = 255  # characters, as most filesystems allow for one name


class JobError(LoraplexError, ValueError):
    """A request the job manager refuses (bad file, unknown job, full queue, an upload too large...); `status` picks
    its kind (404, 409, 413, 429...)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        kind = kind_for_status(status)
        self.http_status, self.grpc_code, self.error_type = kind.http_status, kind.grpc_code, kind.error_type


class JobManager:
    def __init__(
        self,
        root: Path,
        store_dir: Path,
        base_model: str,
        base_model_id: str,
        *,
        registry: Registry | None = None,
        replica: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_concurrent: int = 1,
        max_queued: int = DEFAULT_MAX_QUEUED_JOBS,
        max_job_seconds: float | None = DEFAULT_MAX_JOB_SECONDS,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        reward_functions: dict[str, str] | None = None,
        python: str = sys.executable,
        poll: float = 0.5,
    ):
        """`registry`: where the files and jobs are recorded (the store's PostgreSQL registry, shared by replicas:
        `root` must then be a folder every replica sees, as `<store>/jobs`); None: `root/jobs.sqlite3`.
        `replica`: this process's name in leases and events (default host-pid-random)."""
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = Path(store_dir)
        self.base_model = base_model
        self.base_model_id = base_model_id
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_job_seconds = max_job_seconds
        self.max_upload_bytes = max_upload_bytes
        self.reward_functions = check_reward_functions(reward_functions or {})
        self.python = python
        self.poll = poll
        self.lease_seconds = float(lease_seconds)
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.may_start = None  # callable(job id, running job ids of every replica) -> bool: a tenant's quota (server)
        self._shared = registry  # also the adapter store's registry (the one jobs register into)
        self.db = registry if registry is not None else SQLiteRegistry(self.root / "jobs.sqlite3")
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._offsets: dict[str, int] = {}  # job id -> events.jsonl bytes copied (a cache of the row's events_offset)
        self._renewed_at = time.time()  # the last time this replica's leases were renewed
        self._store_obj = None
        self._started: dict[str, float] = {}  # job id -> time.monotonic() at start, for the wall-clock limit
        cutoff = time.time() - 3600  # uploads cut short by a crash (another replica's in progress is younger)
        for part in self.files_dir.glob(".*.part"):
            try:
                if part.stat().st_mtime < cutoff or registry is None:
                    part.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        self.db.ensure_schema(_SCHEMA)
        if isinstance(self.db, SQLiteRegistry):
            self._migrate_legacy()
        from loraplex.adapters_store import AdapterStore

        self._store_obj = AdapterStore(self.store_dir, registry=self._shared)
        self._recover()  # a restart interrupted whatever this server was running: queue it again, to resume from it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-jobs", daemon=True)
        self._thread.start()
        self._lease_thread = threading.Thread(target=self._renew_leases, name="loraplex-job-leases", daemon=True)
        self._lease_thread.start()

    # --- the database ---------------------------------------------------------------
    def _rows(self, sql: str, args=()) -> list[dict]:
        with self.db.connection() as c:
            return _dicts(c.execute(sql, args))

    def _row(self, sql: str, args=()) -> dict | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _migrate_legacy(self) -> None:
        """Copies a jobs.sqlite3 of before the registry seam (tables files, jobs, events) into the ft_ tables."""
        with self.db.write() as c:
            old = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "jobs" not in old:
                return
            have = {r[1] for r in c.execute("PRAGMA table_info(jobs)")}
            for col in ("result_files", "plan"):  # databases from before result files / training plans
                if col not in have:
                    c.execute(f"ALTER TABLE jobs ADD COLUMN {col} TEXT")
            for table, cols in _LEGACY_COLUMNS.items():
                if table in old:
                    c.execute(f"INSERT INTO ft_{table}({cols}) SELECT {cols} FROM {table} ORDER BY rowid")
                    c.execute(f"DROP TABLE {table}")

    def _event(self, c, job_id, level, typ, message, data=None) -> None:
        c.execute(
            "INSERT INTO ft_events(job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?)",
            (job_id, int(time.time()), level, typ, message, json.dumps(data) if data is not None else None),
        )

    def _recover(self) -> None:
        """Queues again the jobs marked running whose replica is gone: no lease (a server of before leases, or a
        record left running) or one not renewed in time. The next replica with a free slot resumes them."""
        now = time.time()
        found = self._rows(
            "SELECT j.id, l.holder, l.expires_at FROM ft_jobs j LEFT JOIN ft_leases l ON l.job_id = j.id "
            "WHERE j.status IN ('running', 'validating_files')"
        )
        if not any(r["expires_at"] is None or r["expires_at"] < now for r in found):
            return
        with self.db.write() as c:  # again under the write lock: another replica may have just done it
            rows = _dicts(c.execute(
                "SELECT j.id, j.replica, l.holder, l.expires_at FROM ft_jobs j LEFT JOIN ft_leases l ON l.job_id = j.id "
                "WHERE j.status IN ('running', 'validating_files')"
            ))
            for r in rows:
                if r["expires_at"] is not None and r["expires_at"] >= now:
                    continue  # its replica is alive
                gone = r["holder"] or r["replica"]
                c.execute("DELETE FROM ft_leases WHERE job_id=?", (r["id"],))
                c.execute("UPDATE ft_jobs SET status='queued', took_over_from=? WHERE id=?", (gone, r["id"]))
                if r["holder"] is None:
                    msg = "job interrupted by a server restart: queued to resume from its last checkpoint"
                else:
                    msg = (f"job interrupted by a server restart or crash: replica {gone} stopped renewing its lease; "
                           "queued to resume from its last checkpoint")
                self._event(c, r["id"], "warn", "message", msg, {"replica": gone})

    def _renew_leases(self) -> None:
        """Every quarter lease: pushes back the expiry of the leases this replica holds (its own thread, so a busy
        watcher never lets them lapse)."""
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                with self.db.write() as c:
                    t = time.time()
                    c.execute("UPDATE ft_leases SET expires_at=? WHERE holder=?", (t + self.lease_seconds, self.replica))
                self._renewed_at = t
            except Exception:  # the database is away: retried next time; past expiry the watcher stops the jobs
                import logging

                logging.getLogger("loraplex.jobs").warning("could not renew job leases", exc_info=True)

    def close(self) -> None:
        """Stops the watcher and this replica's job processes; their jobs are queued again at once (another replica,
        or this server restarted, resumes them from their last checkpoint)."""
        self._stop.set()
        self._thread.join(5)
        self._lease_thread.join(5)
        with self._lock:
            mine = list(self._procs)
            for jid in mine:
                self._kill(jid)
            try:
                with self.db.write() as c:
                    for jid in mine:
                        self._pump_events(jid, c)
                        n = c.execute("UPDATE ft_jobs SET status='queued', took_over_from=? WHERE id=? "
                                      "AND status IN ('running', 'validating_files')",
                                      (self.replica, jid)).rowcount
                        if n:
                            self._event(c, jid, "warn", "message",
                                        f"job interrupted: replica {self.replica} shut down; queued to resume from its last "
                                        "checkpoint", {"replica": self.replica})
                    c.execute("DELETE FROM ft_leases WHERE holder=?", (self.replica,))
            except Exception:
                import logging

                logging.getLogger("loraplex.jobs").warning("could not requeue this replica's jobs", exc_info=True)
        if self._shared is None:
            self._store_obj.close()
            self.db.close()

    # --- files --------------------------------------------------------------------
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict:
        """A whole file at once (the streaming `upload` is what the HTTP API uses)."""
        up = self.upload(filename, purpose)
        try:
            up.write(data)
            return up.finish()
        except BaseException:
            up.abort()
            raise

    def upload(self, filename: str, purpose: str | None) -> "Upload":
        """A file being received; `purpose` may come later (at `finish`) when the client sends it after the file."""
        if purpose is not None:
            check_purpose(purpose)
        return Upload(self, clean_filename(filename), purpose)

    def _commit_file(self, part: Path, filename: str, size: int, purpose: str) -> dict:
        fid = "file-" + uuid.uuid4().hex[:24]
        name = fid + (".csv" if filename.lower().endswith(".csv") else ".jsonl")  # never the client's suffix
        os.replace(part, self.files_dir / name)  # in place before its row commits: whoever sees the row reads it
        try:
            with self.db.write() as c:
                c.execute(
                    "INSERT INTO ft_files(id, filename, bytes, created_at, purpose, path) VALUES (?,?,?,?,?,?)",
                    (fid, filename, size, int(time.time()), purpose, name),
                )
        except BaseException:
            (self.files_dir / name).unlink(missing_ok=True)
            raise
        return self.file(fid)

    def _save_file(self, c, filename: str, data: bytes, purpose: str) -> str:
        """A file the server itself makes (a job's results), inside the caller's transaction."""
        fid = "file-" + uuid.uuid4().hex[:24]
        name = fid + (".csv" if filename.lower().endswith(".csv") else ".jsonl")
        (self.files_dir / name).write_bytes(data)
        c.execute(
            "INSERT INTO ft_files(id, filename, bytes, created_at, purpose, path) VALUES (?,?,?,?,?,?)",
            (fid, filename, len(data), int(time.time()), purpose, name),
        )
        return fid

    def _file_row(self, fid: str) -> dict:
        r = self._row("SELECT id, filename, bytes, created_at, purpose, path FROM ft_files WHERE id=?", (fid,))
        if r is None:
            raise JobError(f"no file {fid!r}", 404, "file_id")
        return r

    def file(self, fid: str) -> dict:
        r = self._file_row(fid)
        return {
            "id": r["id"],
            "object": "file",
            "bytes": r["bytes"],
            "created_at": r["created_at"],
            "filename": r["filename"],
            "purpose": r["purpose"],
            "status": "processed",
            "status_details": None,
        }

    def files(self) -> list[dict]:
        return self.list_files(limit=1 << 30)[0]

    def list_files(
        self, *, purpose: str | None = None, after: str | None = None, limit: int = 10000, order: str = "desc"
    ) -> tuple[list[dict], bool]:
        """A page of files, newest first by default; `after` is the id of the last file of the previous page."""
        direction = "ASC" if order == "asc" else "DESC"
        sql, args = "SELECT id FROM ft_files", []
        if purpose:
            sql, args = sql + " WHERE purpose=?", [purpose]
        ids = [r["id"] for r in self._rows(f"{sql} ORDER BY created_at {direction}, seq {direction}", args)]
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        return [self.file(i) for i in ids[:limit]], len(ids) > limit

    def file_path(self, fid: str) -> Path:
        """Where the file's bytes are (a row's path is relative to `files_dir`; absolute in databases of before)."""
        return self.files_dir / self._file_row(fid)["path"]

    def delete_file(self, fid: str) -> dict:
        p = self.file_path(fid)
        with self.db.write() as c:
            c.execute("DELETE FROM ft_files WHERE id=?", (fid,))
        p.unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}

    # --- jobs ---------------------------------------------------------------------
    def create_job(self, body, *, tenant: str = "*") -> dict:
        """A new queued job from a fine-tuning request body (the OpenAI fields and our `loraplex` knobs; a dict, or
        the JobRequest `parse_request` made of one), whose adapter belongs to `tenant` ("*": the operator's).

        Everything is checked before the job exists: the body against the allow-list, the files, the base
        model, the adapter to start from, the queue's length; a refused body creates nothing."""
        from .config import JobConfigError, parse_config
        from .job_request import METHODS, JobRequest

        req = body if isinstance(body, JobRequest) else self.parse_request(body)
        if req.model not in (self.base_model_id, "default"):
            raise JobError(
                f"model {req.model!r} cannot be fine-tuned here: this server's base model is {self.base_model_id!r}",
                404,
                "model",
            )
        train_path = self._training_file(req.training_file, "training_file")
        val_path = self._training_file(req.validation_file, "validation_file") if req.validation_file else None
        overrides = req.overrides()
        adapter = overrides.pop("adapter", {})
        if adapter.get("init_from"):
            self._check_adapter_exists(adapter["init_from"], "loraplex.adapter.init_from")
        mtype = req.method_type()
        # OpenAI's meaning: batch_size examples per optimizer step, n_epochs passes; "auto" resolved from the data
        resolved = resolve_hyperparameters(req.hyperparameter_values(), _count_records(train_path), method=mtype)
        jid, name = self._new_job_name(req.suffix, tenant)
        cfg = {
            **overrides,
            "base_model": self.base_model,
            "adapter": {"r": 16, "alpha": 32, **adapter, "name": name},
            "method": METHODS[mtype],
            "datasets": [{"path": str(train_path)}],
            "validation_datasets": [{"path": str(val_path)}] if val_path else [],
            "epochs": resolved["n_epochs"],
            # `loraplex.learning_rate` replaces the base rate the multiplier scales
            "learning_rate": overrides.get("learning_rate", LORA_BASE_LR) * resolved["learning_rate_multiplier"],
            "seed": req.seed if req.seed is not None else 42,
        }
        if mtype == "reinforcement":  # a step samples batch_size prompts (x num_generations) and grades them
            from .graders import GraderError, check_grader

            if req.method.reinforcement is None:
                raise JobError(
                    "method type 'reinforcement' needs 'method.reinforcement.grader'", param="method.reinforcement"
                )
            if req.validation_file:  # refused rather than ignored: the GRPO loop has no held-out evaluation yet
                raise JobError(
                    "validation_file is not supported with the reinforcement method", param="validation_file"
                )
            grader = req.method.reinforcement.grader
            try:  # a python grader may only name a function the operator registered (--reward-function)
                check_grader(grader, "method.reinforcement.grader", registered=lambda n: n in self.reward_functions)
            except GraderError as e:
                raise JobError(str(e), param="method.reinforcement.grader") from None
            functions = {n: self.reward_functions[n] for n in _python_graders(grader)}  # the registered ones it names
            cfg.update(
                num_rollouts=resolved["batch_size"],
                reward={"grader": grader, **({"functions": functions} if functions else {})},
            )
        else:
            cfg["examples_per_step"] = resolved["batch_size"]
        if mtype == "dpo":
            cfg["beta"] = resolved["beta"]
        try:
            parsed = parse_config(cfg)
        except JobConfigError as e:  # a knob the allow-list accepts but this method does not use (kl_coef on sft)
            msg, key = str(e), re.search(r"'([A-Za-z_.]+)'", str(e))
            if key is not None and (key[1] in overrides or key[1].startswith("adapter.")):  # as the request named it
                raise JobError(
                    self._public_text(msg.replace(key[0], f"'loraplex.{key[1]}'")), param=f"loraplex.{key[1]}"
                ) from None
            raise JobError(self._public_text(msg), param="loraplex") from None
        if parsed.method in (
            "dpo",
            "reward",
        ):  # a malformed preference file is refused now, not minutes later in the job
            self._check_preference_files(
                parsed,
                {
                    str(train_path): ("training_file", req.training_file),
                    **({str(val_path): ("validation_file", req.validation_file)} if val_path else {}),
                },
            )
        shown = {
            k: resolved[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta") if k in resolved
        }
        plan = training_plan(parsed, resolved)
        ran = {v: k for k, v in METHODS.items()}[
            parsed.method
        ]  # the record names the method that runs, whatever was asked
        # the count and the insert under the registry's write lock: two requests (on any replicas) cannot both take
        # the last place
        with self.db.write() as c:
            queued = c.execute(
                "SELECT COUNT(*) FROM ft_jobs WHERE status IN ('queued', 'validating_files')"
            ).fetchone()[0]
            if queued >= self.max_queued:
                raise JobError(
                    f"the fine-tuning queue is full: {queued} jobs are waiting, the server's limit is "
                    f"{self.max_queued} "
                    "(--max-queued-jobs); retry when one has started",
                    429,
                    code="rate_limit_exceeded",
                )
            c.execute(
                "INSERT INTO ft_jobs(id, created_at, status, model, training_file, validation_file, suffix, seed, "
                "method, hyperparameters, config, metadata, plan) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    jid,
                    int(time.time()),
                    "queued",
                    req.model,
                    req.training_file,
                    req.validation_file,
                    req.suffix,
                    parsed.seed,
                    json.dumps({"type": ran, ran: {"hyperparameters": shown}}),
                    json.dumps(shown),
                    json.dumps(parsed.model_dump(mode="json")),
                    json.dumps(req.metadata) if req.metadata else None,
                    json.dumps(plan),
                ),
            )
            self._event(c, jid, "info", "message", f"job created and queued: {plan_text(plan)}", {**shown, **plan})
            warning = few_steps_warning(parsed, plan["optimizer_steps"])
            if warning:
                self._event(c, jid, "warn", "message", warning)
        return self.job(jid)

    @staticmethod
    def parse_request(body: dict):
        """A fine-tuning request body as a JobRequest (trainer/job_request.py), or 400 naming the offending field."""
        from .job_request import RequestRefused, parse_job_request

        try:
            return parse_job_request(body)
        except RequestRefused as e:
            raise JobError(str(e), param=e.param) from None

    def _training_file(self, fid: str, param: str) -> Path:
        """The server path of an uploaded fine-tune file (404 for an unknown id, 400 for another purpose)."""
        try:
            f = self.file(fid)
        except JobError as e:
            raise JobError(f"{param}: {e}", e.status, param) from None
        if f["purpose"] != "fine-tune":
            raise JobError(
                f"{param} {fid} has purpose {f['purpose']!r}; upload training data with purpose 'fine-tune'",
                param=param,
                code=f"invalid_{param}",
            )
        return self.file_path(fid)

    def reward_function(self, name: str, param: str) -> str:
        """The "module:function" the operator registered as `name` (what a job's reward refers to), or 400."""
        if name not in self.reward_functions:
            offered = ", ".join(sorted(self.reward_functions)) or "none"
            raise JobError(
                f"no reward function {name[:64]!r} on this server (registered: {offered}; the operator adds them with "
                "`loraplex serve --reward-function NAME=module:function`)",
                param=param,
            )
        return self.reward_functions[name]

    def _store(self):
        """The adapter store (its view follows changes made by any process), opened with the manager: never inside
        one of its write transactions, where opening it would wait for the registry's write lock."""
        return self._store_obj

    def _check_adapter_exists(self, ref: str, param: str) -> None:
        from loraplex.adapters_store.errors import AdapterNotFound

        name, _, version = ref.partition("@")
        try:
            self._store().get(name, int(version) if version else None)
        except AdapterNotFound as e:
            raise JobError(f"{param}: {e}", 404, param) from None

    def _new_job_name(self, suffix: str | None, tenant: str) -> tuple[str, str]:
        """A job id and the new adapter name it will create, in `tenant`'s namespace: never a name the store holds."""
        taken = set(self._store().names())
        while True:
            jid = "ftjob-" + uuid.uuid4().hex[:24]
            name = qualify(tenant, f"ft-{suffix}-{jid[6:12]}" if suffix else f"ft-{jid[6:18]}")
            if name not in taken:
                return jid, name

    def _check_preference_files(self, cfg, uploaded: dict[str, tuple[str, str]]) -> None:
        from .data import DataError
        from .preference_data import check_records

        for d in [*cfg.datasets, *cfg.validation_datasets]:
            param, fid = uploaded.get(str(d.path), ("loraplex.datasets", None))
            shown = (
                self._file_row(fid)["filename"]
                if fid
                else None
            )
            try:
                check_records(d.path, shown)
            except DataError as e:
                where = f"{param} {fid}" if fid else "dataset"
                raise JobError(
                    self._public_text(f"{where} is not a valid {cfg.method.upper()} file: {e}"),
                    param=param,
                    code="invalid_validation_file" if param == "validation_file" else "invalid_training_file",
                ) from None

    def job(self, jid: str) -> dict:
        r = self._row("SELECT * FROM ft_jobs WHERE id=?", (jid,))
        if r is None:
            raise JobError(f"no fine-tuning job {jid!r}", 404, "fine_tuning_job_id")
        eta = None
        if r["status"] == "running":
            last = self._last_metrics(jid)
            left = json.loads(last["data"]).get("eta_seconds") if last is not None else None
            if left is not None:  # none before the first step (a preference job's initial evaluation)
                eta = int(last["created_at"] + left)
        return {
            "id": r["id"],
            "object": "fine_tuning.job",
            "created_at": r["created_at"],
            "model": r["model"],
            "status": r["status"],
            "fine_tuned_model": r["fine_tuned_model"],
            "finished_at": r["finished_at"],
            "training_file": r["training_file"],
            "validation_file": r["validation_file"],
            "seed": r["seed"],
            "hyperparameters": json.loads(r["hyperparameters"]),
            "method": json.loads(r["method"]),
            "error": json.loads(r["error"]) if r["error"] else None,
            "trained_tokens": r["trained_tokens"],
            "result_files": json.loads(r["result_files"] or "[]"),
            "organization_id": "loraplex",
            "integrations": [],
            "estimated_finish": eta,
            "user_provided_suffix": r["suffix"],
            "metadata": json.loads(r["metadata"]) if r["metadata"] else None,
            "training_plan": json.loads(r["plan"])
            if r["plan"]
            else None,  # ours: resolved learning rate, planned steps
        }

    def jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        rows = [r["id"] for r in self._rows("SELECT id FROM ft_jobs ORDER BY created_at DESC, seq DESC")]
        if after is not None:
            rows = rows[rows.index(after) + 1 :] if after in rows else []
        return [self.job(j) for j in rows[:limit]], len(rows) > limit

    def events(self, jid: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        self.job(jid)
        rows = self._rows("SELECT * FROM ft_events WHERE job_id=? ORDER BY id DESC", (jid,))
        data = [
            {
                "id": f"ftevent-{r['id']}",
                "object": "fine_tuning.job.event",
                "created_at": r["created_at"],
                "level": r["level"],
                "message": r["message"],
                "data": _finite(json.loads(r["data"])) if r["data"] else None,
                "type": r["type"],
            }
            for r in rows
        ]
        if after is not None:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        return data[:limit], len(data) > limit

    def _last_metrics(self, jid: str) -> dict | None:
        return self._row(
            "SELECT created_at, data FROM ft_events WHERE job_id=? AND type='metrics' ORDER BY id DESC LIMIT 1", (jid,)
        )

    def _config(self, jid: str) -> dict:
        return json.loads(self._row("SELECT config FROM ft_jobs WHERE id=?", (jid,))["config"])

    def checkpoints(self, jid: str) -> list[dict]:
        """The job's checkpoints, newest first, as recorded when its process wrote them (whichever replica ran it)."""
        job = self.job(jid)
        name = self._config(jid)["adapter"]["name"]
        rows = self._rows(
            "SELECT step, created_at, train_loss, valid_loss FROM ft_checkpoints WHERE job_id=? ORDER BY step DESC", (jid,)
        )
        # a checkpoint is named, never located: the client sees `<adapter>:ckpt-step-N`, not a server path
        data = [
            {
                "id": f"ftckpt-{jid[6:]}-{r['step']}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": r["created_at"],
                "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{r['step']}",
                "fine_tuning_job_id": jid,
                "step_number": r["step"],
                "metrics": {"step": r["step"], "train_loss": r["train_loss"], "valid_loss": r["valid_loss"]},
            }
            for r in rows
        ]
        if job["status"] == "succeeded" and job["fine_tuned_model"]:
            m = self._last_metrics(jid)
            m = json.loads(m["data"]) if m is not None and m["data"] else {}
            last = m.get("step") or 0
            data.insert(
                0,
                {
                    "id": f"ftckpt-{jid[6:]}-final",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": job["finished_at"],
                    "fine_tuned_model_checkpoint": job["fine_tuned_model"],
                    "fine_tuning_job_id": jid,
                    "step_number": last,
                    "metrics": {"step": last, "train_loss": m.get("loss")},
                },
            )
        return data

    def cancel(self, jid: str) -> dict:
        """Cancels a job wherever it runs: here its process is stopped at once, on another replica by that replica's
        watcher at its next poll (it sees the status)."""
        self.job(jid)
        with self._lock:
            with self.db.write() as c:
                status = c.execute("SELECT status FROM ft_jobs WHERE id=?", (jid,)).fetchone()[0]
                if status in TERMINAL:
                    raise JobError(f"job {jid} is already {status}", 409)
                c.execute("UPDATE ft_jobs SET status='cancelled', finished_at=? WHERE id=?", (int(time.time()), jid))
                self._event(c, jid, "info", "message", "job cancelled")
                c.execute("DELETE FROM ft_leases WHERE job_id=? AND holder=?", (jid, self.replica))
            self._kill(jid)
        return self.job(jid)

    def pause(self, jid: str) -> dict:
        """Pauses a queued or running job: a running one (on any replica) checkpoints at the end of its current step
        and exits."""
        self.job(jid)
        with self._lock:
            with self.db.write() as c:
                status = c.execute("SELECT status FROM ft_jobs WHERE id=?", (jid,)).fetchone()[0]
                if status not in ("queued", "validating_files", "running"):
                    raise JobError(f"job {jid} is {status}; only a queued or running job can be paused", 409)
                if status != "queued":  # the job's folder is shared: its process sees the stop file wherever it runs
                    (self.runs_dir / jid).mkdir(parents=True, exist_ok=True)
                    (self.runs_dir / jid / STOP_FILE).touch()
                c.execute("UPDATE ft_jobs SET status='paused' WHERE id=?", (jid,))
                self._event(
                    c,
                    jid,
                    "info",
                    "message",
                    "job paused" + (": checkpointing at the end of the current step" if status != "queued" else ""),
                )
        return self.job(jid)

    def resume(self, jid: str, wait: float = 60.0) -> dict:
        """Resumes a paused job from its last checkpoint (running once a watcher starts it, queued while no slot is
        free). While its process (here or on another replica) is still writing the pause checkpoint, waits up to
        `wait` seconds."""
        deadline = time.time() + wait
        waited = False
        while True:
            with self._lock:
                job = self.job(jid)
                if job["status"] != "paused":
                    if waited:  # its process finished meanwhile (the pause came after its last step)
                        return job
                    raise JobError(f"job {jid} is {job['status']}; only a paused job can be resumed", 409)
                p = self._procs.get(jid)
                if p is not None and p.poll() is not None:  # the paused process has written its checkpoint and gone
                    self._procs.pop(jid, None)
                    self._finish(jid, p.returncode)  # it may also have finished (the pause came after its last step)
                    p = None
                if p is None:
                    with self.db.write() as c:
                        status = c.execute("SELECT status FROM ft_jobs WHERE id=?", (jid,)).fetchone()[0]
                        lease = c.execute("SELECT expires_at FROM ft_leases WHERE job_id=?", (jid,)).fetchone()
                        free = lease is None or lease[0] < time.time()  # no replica still runs its process
                        if status == "paused" and free:
                            c.execute("DELETE FROM ft_leases WHERE job_id=?", (jid,))
                            c.execute("UPDATE ft_jobs SET status='queued' WHERE id=?", (jid,))
                            self._event(c, jid, "info", "message", "job resumed")
                            break
            waited = True
            if time.time() > deadline:
                raise JobError(f"job {jid} is still writing its pause checkpoint; retry shortly", 409)
            time.sleep(0.2)
        # A watcher starts it (a job process dies with the thread that started it: PR_SET_PDEATHSIG), at once when a
        # slot is free; answer with the status it then has.
        deadline = time.time() + 10 * self.poll + 2
        while time.time() < deadline and (
            (status := self.job(jid)["status"]) == "validating_files"  # claimed: its process is being started
            or (status == "queued" and self.max_concurrent > len(self._procs))
        ):
            time.sleep(min(0.1, self.poll))
        return self.job(jid)

    def _kill(self, jid: str) -> None:
        self._started.pop(jid, None)
        self._offsets.pop(jid, None)
        p = self._procs.pop(jid, None)
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # --- the watcher --------------------------------------------------------------
    def _claim(self, free: int) -> list[str]:
        """Takes up to `free` queued jobs for this replica, oldest first, under the registry's write lock (no two
        replicas take the same job), each with a lease; a job whose tenant already runs its `concurrent_jobs` on any
        replica waits, and the ones behind it of other tenants start meanwhile."""
        if not self._rows("SELECT id FROM ft_jobs WHERE status='queued' LIMIT 1"):
            return []
        claimed: list[str] = []
        now = time.time()
        with self.db.write() as c:
            running = [r[0] for r in c.execute(
                "SELECT id FROM ft_jobs WHERE status IN ('running', 'validating_files')").fetchall()]
            for (jid,) in c.execute("SELECT id FROM ft_jobs WHERE status='queued' ORDER BY seq").fetchall():
                if len(claimed) >= free:
                    break
                if self.may_start is not None and not self.may_start(jid, running):
                    continue
                c.execute("UPDATE ft_jobs SET status='validating_files' WHERE id=?", (jid,))  # 'running' with its pid
                c.execute(
                    "INSERT INTO ft_leases(job_id, holder, expires_at, acquired_at) VALUES (?,?,?,?) ON CONFLICT(job_id) "
                    "DO UPDATE SET holder=excluded.holder, expires_at=excluded.expires_at, acquired_at=excluded.acquired_at",
                    (jid, self.replica, now + self.lease_seconds, now),
                )
                running.append(jid)
                claimed.append(jid)
        return claimed

    def _launch(self, jid: str) -> None:
        """Starts a job this replica has claimed; a job it cannot start fails with the reason."""
        try:
            self._start(jid)
        except Exception as e:
            self._kill(jid)
            with self.db.write() as c:
                self._release(c, jid)
                self._fail(c, jid, "training_failed", f"the job's process could not be started: {e}")

    def _registered(self, jid: str) -> dict | None:
        """The result of a job whose process registered its adapter (a fine-tuning job's versions carry its id as
        their caller) but whose replica stopped before recording it: the job is then done, never trained twice."""
        name = self._config(jid)["adapter"]["name"]
        rows = self._store()._query(
            "SELECT version FROM versions WHERE name=? AND caller=? ORDER BY version", (name, f"fine_tuning:{jid}")
        )
        return {"adapter": name, "version": rows[0][0], "ref": f"{name}@{rows[0][0]}"} if rows else None

    def _start(self, jid: str) -> None:
        from .distributed import child_env, die_with_parent

        job_dir = self.runs_dir / jid
        job_dir.mkdir(parents=True, exist_ok=True)
        row = self._row("SELECT config, took_over_from FROM ft_jobs WHERE id=?", (jid,))
        cfg = json.loads(row["config"])
        self._started[jid] = time.monotonic()
        if (job_dir / "result.json").exists() or self._registered(jid) is not None:
            self._finish(jid, 0)  # trained and registered by a replica that stopped before recording it
            return
        (job_dir / STOP_FILE).unlink(missing_ok=True)
        (job_dir / "paused.json").unlink(missing_ok=True)
        # a job started again (resumed after a pause, a server restart, or on another replica) continues from its
        # last checkpoint
        from .core import latest_checkpoint

        ck = latest_checkpoint(job_dir / "output") if (job_dir / "output").is_dir() else None
        (job_dir / "job.json").write_text(
            json.dumps(
                {
                    "config": cfg,
                    "output_dir": str(job_dir / "output"),
                    "store_dir": str(self.store_dir),
                    "caller": f"fine_tuning:{jid}",
                    "resume": ck is not None,
                    # the adapter's name must still be free when the job registers (none publishes under a taken name)
                    "new_name": True,
                    "public_names": self._public_names(jid),  # how the lineage names the server's paths
                }
            )
        )
        with open(job_dir / "process.log", "ab") as log:
            p = subprocess.Popen(
                [self.python, "-m", "loraplex.trainer.run_job", str(job_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_env(**{STOP_FILE_ENV: str(job_dir / STOP_FILE)}),
                # a job dies with the server, so its record ("interrupted") stays true after a restart
                preexec_fn=die_with_parent,
            )
        self._procs[jid] = p
        prev = row["took_over_from"]
        with self.db.write() as c:
            c.execute("UPDATE ft_jobs SET pid=?, replica=?, took_over_from=NULL WHERE id=?", (p.pid, self.replica, jid))
            c.execute("UPDATE ft_jobs SET status='running' WHERE id=? AND status='validating_files'", (jid,))
            where = f" from its checkpoint at step {ck.name[11:]}" if ck is not None else ""
            if prev and prev != self.replica:
                self._event(c, jid, "info", "message",
                            f"job resumed on replica {self.replica} after replica {prev} stopped{where}",
                            {"replica": self.replica, "previous_replica": prev})
            else:
                self._event(c, jid, "info", "message", f"job started on replica {self.replica}{where}",
                            {"replica": self.replica})

    def _release(self, c, jid: str) -> None:
        c.execute("DELETE FROM ft_leases WHERE job_id=? AND holder=?", (jid, self.replica))

    def _pump_events(self, jid: str, c=None) -> None:
        """Copies the lines the job's process appended to its events.jsonl since the last copy (whichever replica
        made it: the offset is in the job's row) into the job's events, checkpoints into its checkpoints."""
        f = self.runs_dir / jid / "events.jsonl"
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return
        if size <= self._offsets.get(jid, -1):
            return
        if c is None:
            with self.db.write() as c:
                return self._pump_events(jid, c)
        offset = c.execute("SELECT events_offset FROM ft_jobs WHERE id=?", (jid,)).fetchone()[0]
        with open(f, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self._offsets[jid] = offset + end
        if not end:
            return
        c.execute("UPDATE ft_jobs SET events_offset=? WHERE id=?", (offset + end, jid))
        names = self._public_names(jid)
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                e = self._public(json.loads(line), names)
            except ValueError:  # a torn or foreign line: skipped, the rest of the log still counts
                continue
            if not isinstance(e, dict):
                continue
            if e.get("type") == "metrics":
                data = _finite({k: v for k, v in e.items() if k not in ("type", "at")})
                if data.get("loss") is None:  # the evaluation before the first step (DPO / reward) has no loss yet
                    shown = ", ".join(f"{k}={v:.4f}" for k, v in data.items() if isinstance(v, float))
                    msg = f"Step {e['step']}/{e['total_steps']}: initial evaluation" + (f": {shown}" if shown else "")
                else:
                    msg = f"Step {e['step']}/{e['total_steps']}: training loss={data['loss']:.4f}"
                self._event(c, jid, "info", "metrics", msg, data)
            elif e.get("type") in ("message", "checkpoint", "data", "plan", "resumed", "stopped", "finished"):
                if e["type"] == "checkpoint" and isinstance(e.get("step"), int):
                    self._record_checkpoint(c, jid, e["step"], int(e.get("at") or time.time()))
                self._event(
                    c,
                    jid,
                    e.get("level", "info"),
                    "message",
                    e.get("message") or e["type"],
                    _finite({k: v for k, v in e.items() if k not in ("type", "at", "message", "level")}) or None,
                )

    def _record_checkpoint(self, c, jid: str, step: int, at: int) -> None:
        m = {}
        mp = self.runs_dir / jid / "output" / "metrics.jsonl"
        if mp.exists():  # the losses logged at that step (none when the step was not a logging one)
            for line in mp.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and row.get("step") == step:
                    m = row
        losses = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in (m.get("loss"), m.get("eval_loss"))]
        c.execute(
            "INSERT INTO ft_checkpoints(job_id, step, created_at, train_loss, valid_loss) VALUES (?,?,?,?,?) "
            "ON CONFLICT(job_id, step) DO UPDATE SET created_at=excluded.created_at, train_loss=excluded.train_loss, "
            "valid_loss=excluded.valid_loss",
            (jid, step, at, *losses),
        )

    def _finish(self, jid: str, rc: int) -> None:
        job_dir = self.runs_dir / jid
        self._started.pop(jid, None)
        now = int(time.time())
        with self.db.write() as c:
            self._pump_events(jid, c)
            self._offsets.pop(jid, None)
            self._release(c, jid)
            status = c.execute("SELECT status FROM ft_jobs WHERE id=?", (jid,)).fetchone()[0]
            if status in TERMINAL:  # cancelled, or failed by the time limit
                return
            res = job_dir / "result.json"
            if status == "paused" and rc == 0 and (job_dir / "paused.json").exists():
                step = json.loads((job_dir / "paused.json").read_text()).get("step")
                self._event(
                    c, jid, "info", "message", f"job paused at step {step}: resume continues from its checkpoint"
                )
                return
            r = json.loads(res.read_text()) if rc == 0 and res.exists() else (self._registered(jid) if rc == 0 else None)
            if r is not None and not res.exists():  # the record the job's process would have written (the console reads it)
                res.write_text(json.dumps(r))
            if r is not None:
                results = []
                metrics = job_dir / "output" / "metrics.jsonl"
                if metrics.exists():  # the step metrics as a fine-tune-results file, as OpenAI attaches one
                    results.append(self._save_file(c, "step_metrics.csv", _metrics_csv(metrics), "fine-tune-results"))
                c.execute(
                    "UPDATE ft_jobs SET status='succeeded', finished_at=?, fine_tuned_model=?, trained_tokens=?, "
                    "result_files=? WHERE id=?",
                    (now, r["adapter"], r.get("trained_tokens"), json.dumps(results), jid),
                )
                self._event(c, jid, "info", "message", f"The job has successfully completed: {r['ref']}")
                return
            err_f = job_dir / "error.json"
            if rc < 0:  # the process died from a signal: that is the reason, whatever it last logged
                sig = _signal_name(-rc)
                err = {
                    "code": "training_failed",
                    "message": f"the training process was killed by {sig}"
                    + (" (out of memory?)" if sig == "SIGKILL" else ""),
                }
            elif err_f.exists():
                err = json.loads(err_f.read_text())
            else:
                tail = (
                    (job_dir / "process.log").read_bytes()[-2000:].decode(errors="replace")
                    if (job_dir / "process.log").exists()
                    else ""
                )
                err = {
                    "code": "training_failed",
                    "message": f"the training process exited with status {rc}"
                    + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else ""),
                }
            self._fail(c, jid, err["code"], err["message"])

    def _fail(self, c, jid: str, code: str, message: str) -> None:
        message = self._public_text(message, self._public_names(jid))
        c.execute(
            "UPDATE ft_jobs SET status='failed', finished_at=?, error=? WHERE id=?",
            (int(time.time()), json.dumps({"code": code, "message": message, "param": None}), jid),
        )
        self._event(c, jid, "error", "message", f"The job failed: {message}")

    def _time_limit(self) -> None:
        """Fails the running jobs past `max_job_seconds` (one job must not hold a slot for ever)."""
        if self.max_job_seconds is None:
            return
        now = time.monotonic()
        for jid in [j for j, t in self._started.items() if now - t > self.max_job_seconds and j in self._procs]:
            self._kill(jid)
            with self.db.write() as c:
                self._pump_events(jid, c)
                self._release(c, jid)
                self._fail(
                    c,
                    jid,
                    "job_time_limit",
                    f"the job ran longer than this server's limit of {self.max_job_seconds:g} s "
                    "(--max-job-seconds) and was stopped; its checkpoints are kept",
                )

    def _follow_others(self) -> None:
        """What other replicas did to the jobs running here: a cancel stops the process, a pause asks it to
        checkpoint and exit; a lease another replica took (this one was cut off from the database past the lease)
        or could not renew stops it without a word, since the job now runs, or will run, elsewhere."""
        mine = list(self._procs)
        if not mine:
            return
        if time.time() - self._renewed_at > self.lease_seconds:
            for jid in mine:
                self._kill(jid)
            return
        rows = self._rows(
            f"SELECT j.id, j.status, l.holder FROM ft_jobs j LEFT JOIN ft_leases l ON l.job_id = j.id "
            f"WHERE j.id IN ({', '.join('?' * len(mine))})",
            mine,
        )
        for r in rows:
            jid = r["id"]
            if r["holder"] != self.replica:
                import logging

                logging.getLogger("loraplex.jobs").warning("lost the lease of %s to %s: stopping its process", jid,
                                                           r["holder"])
                self._kill(jid)
            elif r["status"] in TERMINAL:  # cancelled on another replica
                self._kill(jid)
                with self.db.write() as c:
                    self._pump_events(jid, c)
                    self._release(c, jid)
                    self._event(c, jid, "info", "message",
                                f"the job's process on replica {self.replica} was stopped: the job is {r['status']}")
            elif r["status"] == "paused" and not (self.runs_dir / jid / STOP_FILE).exists():
                (self.runs_dir / jid / STOP_FILE).touch()

    # --- what clients see of the server's files -----------------------------------
    def _public_names(self, jid: str | None) -> dict[str, str]:
        """Server path -> what a client knows it by: the job's uploads by id and name, the server's folders by role."""
        names = {}
        if jid is not None:
            row = self._row("SELECT training_file, validation_file FROM ft_jobs WHERE id=?", (jid,))
            for fid in (row["training_file"], row["validation_file"]) if row else ():
                f = self._row("SELECT path, filename FROM ft_files WHERE id=?", (fid,)) if fid else None
                if f is not None:
                    names[str(self.files_dir / f["path"])] = f"{fid} ({f['filename']})"
            names[str(self.runs_dir / jid / "output")] = "output"
            names[str(self.runs_dir / jid)] = "job"
        for p, shown in (
            (self.files_dir, "files"),
            (self.runs_dir, "runs"),
            (self.root, "jobs"),
            (self.store_dir, "store"),
            (Path(self.base_model), self.base_model_id),
        ):
            names[str(p)] = shown
            names[str(Path(p).resolve())] = shown
        return names

    def _public_text(self, text: str, names: dict[str, str] | None = None) -> str:
        names = names if names is not None else self._public_names(None)
        for path in sorted(names, key=len, reverse=True):  # the longest first: a job's folder before the runs folder
            text = text.replace(path, names[path])
        return _ANY_PATH.sub(lambda m: "…/" + m.group(1), text)

    def _public(self, obj, names: dict[str, str]):
        """`obj` (decoded JSON) with server paths replaced in every string, keys included."""
        if isinstance(obj, str):
            return self._public_text(obj, names)
        if isinstance(obj, dict):
            return {self._public_text(str(k), names): self._public(v, names) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._public(v, names) for v in obj]
        return obj

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                with self._lock:
                    for jid, p in list(self._procs.items()):
                        self._pump_events(jid)
                        rc = p.poll()
                        if rc is not None:
                            self._procs.pop(jid, None)
                            self._finish(jid, rc)
                    self._follow_others()
                    self._time_limit()
                    self._recover()  # running jobs of replicas that stopped renewing their leases: queued again
                    free = self.max_concurrent - len(self._procs)
                    if free > 0:
                        for jid in self._claim(free):
                            self._launch(jid)
            except Exception:  # the watcher must survive anything a job does
                import logging

                logging.getLogger("loraplex.jobs").exception("job watcher error")


class Upload:
    """One file being received: its bytes go to a hidden temporary file beside the others as they arrive,
    counted against the server's limit (413 the moment it is passed) and, for fine-tune files, checked one
    JSONL line at a time (400 naming `file:line` at the first bad one), so memory holds one chunk and one
    line, never the file. `finish` renames it into place and records it; `abort` leaves nothing behind."""

    def __init__(self, manager: JobManager, filename: str, purpose: str | None):
        self.m, self.filename, self.purpose = manager, filename, purpose
        self.part = manager.files_dir / f".{uuid.uuid4().hex}.part"
        self._fh = open(self.part, "wb")
        self.size = 0
        self._line = 1  # number of the line `_pending` starts
        self._pending = b""  # the current line, not yet ended by a newline
        self._records = 0
        self._bad: str | None = None  # the first bad line, kept while the purpose is not known yet

    @property
    def _checked(self) -> bool:
        return self.purpose in (None, "fine-tune")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.m.max_upload_bytes:
            raise JobError(
                f"{self.filename} is larger than this server's upload limit of {self.m.max_upload_bytes} bytes "
                "(--max-upload-bytes)",
                413,
                "file",
                "file_too_large",
            )
        self._fh.write(data)
        if self._checked and self._bad is None:
            lines = (self._pending + data).split(b"\n")
            self._pending = lines.pop()
            for line in lines:
                self._check_line(line)
            if len(self._pending) > MAX_LINE_BYTES:
                self._refuse(f"{self.filename}:{self._line}: a line longer than {MAX_LINE_BYTES} bytes")

    def _check_line(self, line: bytes) -> None:
        if line.strip():
            from .job_request import lone_surrogate

            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or (b"\\u" in line and lone_surrogate(rec) is not None):
                    raise ValueError("not an object of valid Unicode")
            except (
                ValueError,
                RecursionError,
            ):  # UnicodeDecodeError and JSONDecodeError too; nesting past json's limit
                self._refuse(
                    f"{self.filename}:{self._line}: not a JSON object per line (fine-tune files are JSONL, UTF-8)"
                )
                return
            self._records += 1
        self._line += 1

    def _refuse(self, message: str) -> None:
        self._bad = self._bad or message
        if self.purpose == "fine-tune":
            raise JobError(self._bad, param="file", code="invalid_file")

    def finish(self, purpose: str | None = None) -> dict:
        purpose = self.purpose if purpose is None else purpose
        if purpose is None:
            raise JobError("multipart field 'purpose' is required", param="purpose")
        check_purpose(purpose)
        self.purpose = purpose
        if self._checked:
            if self._bad is None and self._pending:
                self._check_line(self._pending)
            if self._bad is None and not self._records:
                self._refuse(f"{self.filename}: no JSON lines (fine-tune files are JSONL)")
            if self._bad is not None:
                self._refuse(self._bad)
        self._fh.flush()
        os.fsync(self._fh.fileno())  # on disk before its row says it exists (other replicas read it at once)
        self._fh.close()
        return self.m._commit_file(self.part, self.filename, self.size, purpose)

    def abort(self) -> None:
        self._fh.close()
        self.part.unlink(missing_ok=True)


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise JobError(f"unknown purpose {purpose[:64]!r} (one of: {', '.join(PURPOSES)})", param="purpose")


def clean_filename(name: str) -> str:
    """The name a client gave its upload, as shown back: its last path part, without control characters; 400 when
    too long."""
    if len(name) > MAX_FILENAME:
        raise JobError(
            f"the file name is {len(name)} characters long; at most {MAX_FILENAME} are accepted", param="file"
        )
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise JobError("the file name is not valid Unicode", param="file") from None
    return name if name not in ("", ".", "..") else "upload.jsonl"


def check_reward_functions(functions: dict[str, str]) -> dict[str, str]:
    """The operator's reward functions (NAME -> "module:function"), checked when the server starts: names are plain,
    each module exists. Jobs name them by NAME; an import path never comes from a request."""
    import importlib.util

    for name, spec in functions.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
            raise ValueError(f"--reward-function {name}=...: the name may hold letters, digits, '.', '_' and '-' only")
        mod, _, fn = spec.partition(":")
        if not mod or not fn.isidentifier():
            raise ValueError(f"--reward-function {name}={spec}: expected NAME=module:function")
        try:
            found = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ValueError(f"--reward-function {name}={spec}: module {mod!r} cannot be found")
    return dict(functions)


# an absolute path of two or more parts not named by `_public_names` (a library's, a temp dir): only its last part
# is shown
_ANY_PATH = re.compile(r"(?<![\w/.:~-])/(?:[^\s/'\"()\[\],:;]+/)+([^\s/'\"()\[\],:;]*)")


def _dicts(cursor) -> list[dict]:
    """A cursor's rows as dicts by column name (sqlite3 and psycopg cursors alike)."""
    cols = [d[0] for d in cursor.description]
    return [dict(zip(cols, r)) for r in cursor.fetchall()]


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _python_graders(grader: dict) -> set[str]:
    """The registered functions a (checked) grader names, its `multi` graders' included."""
    if grader.get("type") == "python":
        return {grader["function"]}
    return (
        set().union(*(_python_graders(g) for g in grader.get("graders", {}).values()))
        if grader.get("type") == "multi"
        else set()
    )


def _count_records(path: Path) -> int:
    """Training examples in an uploaded JSONL file (one per non-empty line; the upload checked every line)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def training_plan(cfg, resolved: dict) -> dict:
    """What the job will do, as shown on the job object and its first event."""
    return {
        "optimizer_steps": cfg.max_steps or resolved["planned_steps"],
        "examples_per_step": resolved["batch_size"],
        "train_examples": resolved["train_examples"],
        "n_epochs": resolved["n_epochs"],
        "learning_rate": cfg.learning_rate,
    }


def plan_text(plan: dict) -> str:
    return (
        f"{plan['train_examples']} training examples x {plan['n_epochs']} epoch(s), {plan['examples_per_step']} per "
        f"step -> {plan['optimizer_steps']} optimizer steps, learning rate {plan['learning_rate']:g}"
    )


def _finite(obj):
    """`obj` with NaN / infinite floats as None: JSON has no NaN, and the HTTP layer refuses to write one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _metrics_csv(path: Path) -> bytes:
    cols = ("step", "train_loss", "valid_loss", "learning_rate", "tokens_per_second")
    keys = ("step", "loss", "eval_loss", "learning_rate", "tokens_per_second")
    lines = [",".join(cols)]
    for line in path.read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            lines.append(",".join("" if m.get(k) is None else str(m[k]) for k in keys))
    return ("\n".join(lines) + "\n").encode()
