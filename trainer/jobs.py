"""The server's fine-tuning job queue: uploaded files, persistent jobs, one subprocess per running job.

State lives in `jobs.sqlite3` under the jobs directory, so a restarted
server lists past jobs; jobs that were running when the server stopped are
queued again and resume from their last checkpoint. Pause asks the job's
process to checkpoint at the end of its current step and exit (a stop file,
core.STOP_FILE_ENV); resume starts it again from that checkpoint, so the loss
curve is that of an uninterrupted run. By default one job runs at a time
(`max_concurrent`). A job's process writes events to its directory; a
watcher thread copies them into the database, and when the process exits
records success (the registered adapter becomes `fine_tuned_model`) or the
reason it failed. Cancel terminates the job's process group.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from loraplex.adapters_store.errors import LoraplexError, kind_for_status
from loraplex.adapters_store.tenancy import qualify

from .core import STOP_FILE_ENV, few_steps_warning
from .hyperparams import resolve as resolve_hyperparameters

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, filename TEXT, bytes INTEGER, created_at INTEGER, purpose TEXT, path TEXT);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, created_at INTEGER, status TEXT, model TEXT, training_file TEXT, validation_file TEXT,
  suffix TEXT, seed INTEGER, method TEXT, hyperparameters TEXT, config TEXT, fine_tuned_model TEXT, error TEXT,
  finished_at INTEGER, trained_tokens INTEGER, pid INTEGER, metadata TEXT);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT, created_at INTEGER, level TEXT, type TEXT, message TEXT, data TEXT);
"""

TERMINAL = ("succeeded", "failed", "cancelled")
STOP_FILE = "stop"  # in a job's directory: present = checkpoint at the end of this step and exit (a pause)


class JobError(LoraplexError, ValueError):
    """A request the job manager refuses (bad file, unknown job...); `status` picks its kind (404, 409...)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        kind = kind_for_status(status)
        self.http_status, self.grpc_code, self.error_type = kind.http_status, kind.grpc_code, kind.error_type


class JobManager:
    def __init__(self, root: Path, store_dir: Path, base_model: str, base_model_id: str, *, max_concurrent: int = 1,
                 python: str = sys.executable, poll: float = 0.5):
        self.root = Path(root)
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir = Path(store_dir)
        self.base_model = base_model
        self.base_model_id = base_model_id
        self.max_concurrent = max_concurrent
        self.python = python
        self.poll = poll
        self.may_start = None  # callable(job id, running job ids) -> bool: a tenant's concurrent-jobs quota (server)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._offsets: dict[str, int] = {}
        self._db().executescript(_SCHEMA)
        if "result_files" not in {r["name"] for r in self._db().execute("PRAGMA table_info(jobs)")}:
            with self._db() as c:  # databases from before result files existed
                c.execute("ALTER TABLE jobs ADD COLUMN result_files TEXT")
        if "plan" not in {r["name"] for r in self._db().execute("PRAGMA table_info(jobs)")}:
            with self._db() as c:  # databases from before training plans were recorded
                c.execute("ALTER TABLE jobs ADD COLUMN plan TEXT")
        with self._db() as c:  # a restart interrupted whatever was running: queue it again, to resume from its checkpoint
            for (jid,) in c.execute("SELECT id FROM jobs WHERE status IN ('running', 'validating_files')").fetchall():
                c.execute("UPDATE jobs SET status='queued' WHERE id=?", (jid,))
                self._event(c, jid, "warn", "message", "job interrupted by a server restart: queued to resume from its last checkpoint")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraplex-jobs", daemon=True)
        self._thread.start()

    def _db(self) -> sqlite3.Connection:
        c = getattr(self._local, "c", None)
        if c is None:
            c = sqlite3.connect(self.root / "jobs.sqlite3", timeout=30)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            self._local.c = c
        return c

    def _event(self, c, job_id, level, typ, message, data=None) -> None:
        c.execute("INSERT INTO events(job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?)",
                  (job_id, int(time.time()), level, typ, message, json.dumps(data) if data is not None else None))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for jid in list(self._procs):
            self._kill(jid)

    # --- files --------------------------------------------------------------------
    def add_file(self, filename: str, data: bytes, purpose: str) -> dict:
        if purpose not in ("fine-tune", "fine-tune-results", "batch", "assistants", "user_data", "evals"):
            raise JobError(f"unknown purpose {purpose!r}", param="purpose")
        if purpose == "fine-tune":
            for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    try:
                        if not isinstance(json.loads(line), dict):
                            raise ValueError
                    except ValueError:
                        raise JobError(f"{filename}:{i}: not a JSON object per line (fine-tune files are JSONL)", param="file") from None
        with self._db() as c:
            fid = self._save_file(c, filename, data, purpose)
        return self.file(fid)

    def _save_file(self, c, filename: str, data: bytes, purpose: str) -> str:
        fid = "file-" + uuid.uuid4().hex[:24]
        path = self.files_dir / (fid + (Path(filename).suffix or ".jsonl"))
        path.write_bytes(data)
        c.execute("INSERT INTO files VALUES (?,?,?,?,?,?)", (fid, filename, len(data), int(time.time()), purpose, str(path)))
        return fid

    def file(self, fid: str) -> dict:
        r = self._db().execute("SELECT * FROM files WHERE id=?", (fid,)).fetchone()
        if r is None:
            raise JobError(f"no file {fid!r}", 404, "file_id")
        return {"id": r["id"], "object": "file", "bytes": r["bytes"], "created_at": r["created_at"], "filename": r["filename"],
                "purpose": r["purpose"], "status": "processed", "status_details": None}

    def files(self) -> list[dict]:
        return self.list_files(limit=1 << 30)[0]

    def list_files(self, *, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   order: str = "desc") -> tuple[list[dict], bool]:
        """A page of files, newest first by default; `after` is the id of the last file of the previous page."""
        direction = "ASC" if order == "asc" else "DESC"
        sql, args = "SELECT id FROM files", []
        if purpose:
            sql, args = sql + " WHERE purpose=?", [purpose]
        ids = [r["id"] for r in self._db().execute(f"{sql} ORDER BY created_at {direction}, rowid {direction}", args).fetchall()]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        return [self.file(i) for i in ids[:limit]], len(ids) > limit

    def file_path(self, fid: str) -> Path:
        self.file(fid)
        return Path(self._db().execute("SELECT path FROM files WHERE id=?", (fid,)).fetchone()["path"])

    def delete_file(self, fid: str) -> dict:
        p = self.file_path(fid)
        with self._db() as c:
            c.execute("DELETE FROM files WHERE id=?", (fid,))
        p.unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}

    # --- jobs ---------------------------------------------------------------------
    def create_job(self, *, model: str, training_file: str, validation_file: str | None, suffix: str | None, seed: int | None,
                   method: dict, hyperparameters: dict, overrides: dict, metadata: dict | None,
                   tenant: str = "*") -> dict:
        from .config import JobConfigError, parse_config

        if model not in (self.base_model_id, "default", self.base_model):
            raise JobError(f"model {model!r} cannot be fine-tuned here: this server's base model is {self.base_model_id!r}", 404, "model")
        train_path = self.file_path(training_file)
        val_path = self.file_path(validation_file) if validation_file else None
        if suffix is not None and not suffix.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise JobError("suffix may hold letters, digits, '-', '_' and '.' only", param="suffix")
        jid = "ftjob-" + uuid.uuid4().hex[:24]
        name = qualify(tenant, f"ft-{suffix}-{jid[6:12]}" if suffix else f"ft-{jid[6:18]}")  # the job's tenant owns it
        mtype = method.get("type", "supervised")
        hp = {**hyperparameters, **(method.get(mtype) or {}).get("hyperparameters", {})}
        # OpenAI's meaning: batch_size examples per optimizer step, n_epochs passes; "auto" resolved from the data
        resolved = resolve_hyperparameters(hp, _count_records(train_path), method=mtype)
        cfg = {
            "base_model": self.base_model,
            "adapter": {"name": name, "r": 16, "alpha": 32},
            "method": {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}.get(mtype, mtype),
            "datasets": [{"path": str(train_path)}],
            "validation_datasets": [{"path": str(val_path)}] if val_path else [],
            "epochs": resolved["n_epochs"],
            "learning_rate": resolved["learning_rate"],
            "seed": seed if seed is not None else 42,
        }
        if mtype == "reinforcement":  # a step samples batch_size prompts (x num_generations) and grades them
            from .graders import GraderError, check_grader

            if validation_file:  # refused rather than ignored: the GRPO loop has no held-out evaluation yet
                raise JobError("validation_file is not supported with the reinforcement method", param="validation_file")
            grader = (method.get(mtype) or {}).get("grader")
            try:
                check_grader(grader, "method.reinforcement.grader")
            except GraderError as e:
                raise JobError(str(e), param="method.reinforcement.grader") from None
            cfg.update(num_rollouts=resolved["batch_size"], reward={"grader": grader})
        else:
            cfg["examples_per_step"] = resolved["batch_size"]
        if mtype == "dpo":
            cfg["beta"] = resolved["beta"]
        for k, v in overrides.items():  # loraplex extensions (canary, sequence_len, adapter.r, ...)
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        try:
            parsed = parse_config(cfg)
        except JobConfigError as e:
            raise JobError(str(e), param="hyperparameters") from None
        if parsed.method in ("dpo", "reward"):  # a malformed preference file is refused now, not minutes later in the job
            self._check_preference_files(parsed, {str(train_path): ("training_file", training_file),
                                                  **({str(val_path): ("validation_file", validation_file)} if val_path else {})})
        shown = {k: resolved[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta") if k in resolved}
        plan = training_plan(parsed, resolved)
        with self._db() as c:
            c.execute("INSERT INTO jobs(id, created_at, status, model, training_file, validation_file, suffix, seed, method, hyperparameters, config, metadata, plan) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (jid, int(time.time()), "queued", model, training_file, validation_file, suffix, parsed.seed,
                       json.dumps({"type": mtype, mtype: {"hyperparameters": shown}}), json.dumps(shown),
                       json.dumps(parsed.model_dump(mode="json")), json.dumps(metadata) if metadata else None, json.dumps(plan)))
            self._event(c, jid, "info", "message", f"job created and queued: {plan_text(plan)}", {**shown, **plan})
            warning = few_steps_warning(parsed, plan["optimizer_steps"])
            if warning:
                self._event(c, jid, "warn", "message", warning)
        return self.job(jid)

    def _check_preference_files(self, cfg, uploaded: dict[str, tuple[str, str]]) -> None:
        from .data import DataError
        from .preference_data import check_records

        for d in [*cfg.datasets, *cfg.validation_datasets]:
            param, fid = uploaded.get(str(d.path), ("loraplex.datasets", None))
            shown = self._db().execute("SELECT filename FROM files WHERE id=?", (fid,)).fetchone()["filename"] if fid else None
            try:
                check_records(d.path, shown)
            except DataError as e:
                where = f"{param} {fid}" if fid else "dataset"
                raise JobError(f"{where} is not a valid {cfg.method.upper()} file: {e}", param=param,
                               code="invalid_validation_file" if param == "validation_file" else "invalid_training_file") from None

    def job(self, jid: str) -> dict:
        r = self._db().execute("SELECT * FROM jobs WHERE id=?", (jid,)).fetchone()
        if r is None:
            raise JobError(f"no fine-tuning job {jid!r}", 404, "fine_tuning_job_id")
        eta = None
        if r["status"] == "running":
            last = self._db().execute("SELECT created_at, data FROM events WHERE job_id=? AND type='metrics' ORDER BY id DESC LIMIT 1",
                                      (jid,)).fetchone()
            left = json.loads(last["data"]).get("eta_seconds") if last is not None else None
            if left is not None:  # none before the first step (a preference job's initial evaluation)
                eta = int(last["created_at"] + left)
        return {
            "id": r["id"], "object": "fine_tuning.job", "created_at": r["created_at"], "model": r["model"],
            "status": r["status"], "fine_tuned_model": r["fine_tuned_model"], "finished_at": r["finished_at"],
            "training_file": r["training_file"], "validation_file": r["validation_file"], "seed": r["seed"],
            "hyperparameters": json.loads(r["hyperparameters"]), "method": json.loads(r["method"]),
            "error": json.loads(r["error"]) if r["error"] else None, "trained_tokens": r["trained_tokens"],
            "result_files": json.loads(r["result_files"] or "[]"), "organization_id": "loraplex", "integrations": [],
            "estimated_finish": eta,
            "user_provided_suffix": r["suffix"], "metadata": json.loads(r["metadata"]) if r["metadata"] else None,
            "training_plan": json.loads(r["plan"]) if r["plan"] else None,  # ours: resolved learning rate, planned steps
        }

    def jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        rows = [r["id"] for r in self._db().execute("SELECT id FROM jobs ORDER BY created_at DESC, rowid DESC").fetchall()]
        if after is not None:
            rows = rows[rows.index(after) + 1:] if after in rows else []
        return [self.job(j) for j in rows[:limit]], len(rows) > limit

    def events(self, jid: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        self.job(jid)
        rows = self._db().execute("SELECT * FROM events WHERE job_id=? ORDER BY id DESC", (jid,)).fetchall()
        data = [{"id": f"ftevent-{r['id']}", "object": "fine_tuning.job.event", "created_at": r["created_at"], "level": r["level"],
                 "message": r["message"], "data": _finite(json.loads(r["data"])) if r["data"] else None, "type": r["type"]} for r in rows]
        if after is not None:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        return data[:limit], len(data) > limit

    def checkpoints(self, jid: str) -> list[dict]:
        job = self.job(jid)
        out_dir = self.runs_dir / jid / "output"
        metrics = {}
        mp = out_dir / "metrics.jsonl"
        if mp.exists():
            for line in mp.read_text().splitlines():
                m = json.loads(line)
                metrics[m["step"]] = m
        data = []
        for ck in sorted(out_dir.glob("checkpoint-*"), key=lambda p: -int(p.name.split("-")[1])):
            step = int(ck.name.split("-")[1])
            m = metrics.get(step, {})
            data.append({"id": f"ftckpt-{jid[6:]}-{step}", "object": "fine_tuning.job.checkpoint", "created_at": int(ck.stat().st_mtime),
                         "fine_tuned_model_checkpoint": str(ck), "fine_tuning_job_id": jid, "step_number": step,
                         "metrics": {"step": step, "train_loss": m.get("loss"), "valid_loss": m.get("eval_loss")}})
        if job["status"] == "succeeded" and job["fine_tuned_model"]:
            last = max(metrics) if metrics else 0
            data.insert(0, {"id": f"ftckpt-{jid[6:]}-final", "object": "fine_tuning.job.checkpoint", "created_at": job["finished_at"],
                            "fine_tuned_model_checkpoint": job["fine_tuned_model"], "fine_tuning_job_id": jid, "step_number": last,
                            "metrics": {"step": last, "train_loss": metrics.get(last, {}).get("loss")}})
        return data

    def cancel(self, jid: str) -> dict:
        job = self.job(jid)
        if job["status"] in TERMINAL:
            raise JobError(f"job {jid} is already {job['status']}", 409)
        with self._lock:
            self._kill(jid)
            with self._db() as c:
                c.execute("UPDATE jobs SET status='cancelled', finished_at=? WHERE id=?", (int(time.time()), jid))
                self._event(c, jid, "info", "message", "job cancelled")
        return self.job(jid)

    def pause(self, jid: str) -> dict:
        """Pauses a queued or running job: a running one checkpoints at the end of its current step and exits."""
        with self._lock:
            job = self.job(jid)
            if job["status"] not in ("queued", "running"):
                raise JobError(f"job {jid} is {job['status']}; only a queued or running job can be paused", 409)
            if jid in self._procs:
                (self.runs_dir / jid / STOP_FILE).touch()
            with self._db() as c:
                c.execute("UPDATE jobs SET status='paused' WHERE id=?", (jid,))
                self._event(c, jid, "info", "message", "job paused" + (": checkpointing at the end of the current step"
                                                                       if jid in self._procs else ""))
        return self.job(jid)

    def resume(self, jid: str, wait: float = 60.0) -> dict:
        """Resumes a paused job from its last checkpoint (running once the watcher starts it, queued while no slot is
        free)."""
        deadline = time.time() + wait
        while True:
            with self._lock:
                job = self.job(jid)
                if job["status"] != "paused":
                    raise JobError(f"job {jid} is {job['status']}; only a paused job can be resumed", 409)
                p = self._procs.get(jid)
                if p is None or p.poll() is not None:  # the paused process has written its checkpoint and gone
                    if p is not None:
                        self._procs.pop(jid, None)
                        self._finish(jid, p.returncode)  # it may also have finished (the pause came after its last step)
                        if self.job(jid)["status"] != "paused":
                            return self.job(jid)
                    with self._db() as c:
                        c.execute("UPDATE jobs SET status='queued' WHERE id=?", (jid,))
                        self._event(c, jid, "info", "message", "job resumed")
                    break
            if time.time() > deadline:
                raise JobError(f"job {jid} is still writing its pause checkpoint; retry shortly", 409)
            time.sleep(0.2)
        # The watcher thread starts it (a job process dies with the thread that started it: PR_SET_PDEATHSIG), at once
        # when a slot is free; answer with the status it then has.
        deadline = time.time() + 10 * self.poll + 2
        while self.job(jid)["status"] == "queued" and self.max_concurrent > len(self._procs) and time.time() < deadline:
            time.sleep(min(0.1, self.poll))
        return self.job(jid)

    def _kill(self, jid: str) -> None:
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
    def _start(self, jid: str) -> None:
        from .distributed import die_with_parent

        job_dir = self.runs_dir / jid
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = json.loads(self._db().execute("SELECT config FROM jobs WHERE id=?", (jid,)).fetchone()["config"])
        (job_dir / STOP_FILE).unlink(missing_ok=True)
        (job_dir / "paused.json").unlink(missing_ok=True)
        # a job started again (resumed after a pause, or after a server restart) continues from its last checkpoint
        resume = any((job_dir / "output").glob("checkpoint-*/trainer_state.pt"))
        (job_dir / "job.json").write_text(json.dumps({"config": cfg, "output_dir": str(job_dir / "output"), "store_dir": str(self.store_dir),
                                                      "caller": f"fine_tuning:{jid}", "resume": resume}))
        with open(job_dir / "process.log", "ab") as log:
            p = subprocess.Popen([self.python, "-m", "loraplex.trainer.run_job", str(job_dir)], stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                             STOP_FILE_ENV: str(job_dir / STOP_FILE)},
                                 # a job dies with the server, so its record ("interrupted") stays true after a restart
                                 preexec_fn=die_with_parent)
        self._procs[jid] = p
        self._offsets[jid] = 0
        with self._db() as c:
            c.execute("UPDATE jobs SET status='running', pid=? WHERE id=?", (p.pid, jid))
            self._event(c, jid, "info", "message", "job started")

    def _pump_events(self, jid: str) -> None:
        f = self.runs_dir / jid / "events.jsonl"
        if not f.exists():
            return
        with open(f, "rb") as fh:
            fh.seek(self._offsets.get(jid, 0))
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        if not end:
            return
        self._offsets[jid] = self._offsets.get(jid, 0) + end
        with self._db() as c:
            for line in chunk[:end].decode().splitlines():
                e = json.loads(line)
                if e.get("type") == "metrics":
                    data = _finite({k: v for k, v in e.items() if k not in ("type", "at")})
                    if data.get("loss") is None:  # the evaluation before the first step (DPO / reward) has no loss yet
                        shown = ", ".join(f"{k}={v:.4f}" for k, v in data.items() if isinstance(v, float))
                        msg = f"Step {e['step']}/{e['total_steps']}: initial evaluation" + (f": {shown}" if shown else "")
                    else:
                        msg = f"Step {e['step']}/{e['total_steps']}: training loss={data['loss']:.4f}"
                    self._event(c, jid, "info", "metrics", msg, data)
                elif e.get("type") in ("message", "checkpoint", "data", "plan", "resumed", "stopped", "finished"):
                    self._event(c, jid, e.get("level", "info"), "message", e.get("message") or e["type"],
                                _finite({k: v for k, v in e.items() if k not in ("type", "at", "message", "level")}) or None)

    def _finish(self, jid: str, rc: int) -> None:
        job_dir = self.runs_dir / jid
        self._pump_events(jid)
        now = int(time.time())
        with self._db() as c:
            status = c.execute("SELECT status FROM jobs WHERE id=?", (jid,)).fetchone()["status"]
            if status == "cancelled":
                return
            res = job_dir / "result.json"
            if status == "paused" and rc == 0 and (job_dir / "paused.json").exists():
                step = json.loads((job_dir / "paused.json").read_text()).get("step")
                self._event(c, jid, "info", "message", f"job paused at step {step}: resume continues from its checkpoint")
                return
            if rc == 0 and res.exists():
                r = json.loads(res.read_text())
                results = []
                metrics = job_dir / "output" / "metrics.jsonl"
                if metrics.exists():  # the step metrics as a fine-tune-results file, as OpenAI attaches one
                    results.append(self._save_file(c, "step_metrics.csv", _metrics_csv(metrics), "fine-tune-results"))
                c.execute("UPDATE jobs SET status='succeeded', finished_at=?, fine_tuned_model=?, trained_tokens=?, result_files=? WHERE id=?",
                          (now, r["adapter"], r.get("trained_tokens"), json.dumps(results), jid))
                self._event(c, jid, "info", "message", f"The job has successfully completed: {r['ref']}")
            else:
                err_f = job_dir / "error.json"
                if err_f.exists():
                    err = json.loads(err_f.read_text())
                else:
                    tail = (job_dir / "process.log").read_bytes()[-2000:].decode(errors="replace") if (job_dir / "process.log").exists() else ""
                    err = {"code": "training_failed", "message": f"the training process exited with status {rc}" + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else "")}
                err["message"] = self._uploaded_names(c, jid, err["message"])
                c.execute("UPDATE jobs SET status='failed', finished_at=?, error=? WHERE id=?",
                          (now, json.dumps({"code": err["code"], "message": err["message"], "param": None}), jid))
                self._event(c, jid, "error", "message", f"The job failed: {err['message']}")

    @staticmethod
    def _uploaded_names(c, jid: str, message: str) -> str:
        """`message` with the server-side paths of the job's uploaded files replaced by `file-id (filename)`."""
        row = c.execute("SELECT training_file, validation_file FROM jobs WHERE id=?", (jid,)).fetchone()
        for fid in (row["training_file"], row["validation_file"]):
            f = c.execute("SELECT path, filename FROM files WHERE id=?", (fid,)).fetchone() if fid else None
            if f is not None:
                message = message.replace(f["path"], f"{fid} ({f['filename']})")
        return message

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
                    free = self.max_concurrent - len(self._procs)
                    if free > 0:
                        for r in self._db().execute("SELECT id FROM jobs WHERE status='queued' ORDER BY created_at, rowid").fetchall():
                            if free <= 0:
                                break
                            if self.may_start is None or self.may_start(r["id"], list(self._procs)):
                                self._start(r["id"])
                                free -= 1
            except Exception:  # the watcher must survive anything a job does
                import logging

                logging.getLogger("loraplex.jobs").exception("job watcher error")


def _count_records(path: Path) -> int:
    """Training examples in an uploaded JSONL file (one per non-empty line; the upload checked every line)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def training_plan(cfg, resolved: dict) -> dict:
    """What the job will do, as shown on the job object and its first event."""
    return {"optimizer_steps": cfg.max_steps or resolved["planned_steps"], "examples_per_step": resolved["batch_size"],
            "train_examples": resolved["train_examples"], "n_epochs": resolved["n_epochs"],
            "learning_rate": cfg.learning_rate}


def plan_text(plan: dict) -> str:
    return (f"{plan['train_examples']} training examples x {plan['n_epochs']} epoch(s), {plan['examples_per_step']} per "
            f"step -> {plan['optimizer_steps']} optimizer steps, learning rate {plan['learning_rate']:g}")


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
