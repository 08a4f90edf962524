"""Which adapter versions are resident where: GPU slots, a CPU tier, or only on disk.

- *Slots* (`--max-loras`) are the rows of the stacked LoRA tensors inside the
  model; a batch can only mix adapters that sit in slots. Idle slots are
  reused least-recently-used first.
- The *CPU tier* keeps loaded weights of recently used versions in host
  memory so that moving a version back into a slot costs a copy, not a disk
  read. Entries of versions pinned by requests are never dropped: this is
  what lets a version be deleted from the store (files gone) while requests
  routed to it still finish on it.
- A request *pins* its version from routing until it finishes; a slot whose
  version is pinned by a running request is never evicted.

All methods run on the engine thread except `prefetch`/`pin`/`unpin`, which
the front ends call; those touch only the CPU tier, under a lock.

Filling a slot is all or nothing: every module's weights are converted to
the slot dtype and checked (finite values, finite scale, fitting shapes)
before the first one is written, so a refused adapter (`SlotFillFailed`)
leaves the slot serving what it served before. The same check runs when a
version enters the CPU tier, so a bad adapter fails the request that pins it
(422), on the request's own thread, before it ever reaches the engine.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from loraplex.adapters_store import InvalidAdapter

from .lora_layer import LoraLinear


class NoFreeSlot(Exception):
    """Every slot holds an adapter used by a running request."""


class SlotFillFailed(InvalidAdapter):
    """An adapter's weights cannot be put in a slot (not finite in the serving dtype, shapes that do not fit);
    the slot is unchanged. 422 for the request that asked for the adapter."""


@dataclass
class LoadedAdapter:
    ref: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r,in], B [out,r])
    scales: dict[str, float]
    load_seconds: float


@dataclass
class Slot:
    ref: str | None = None
    running: int = 0  # running requests using this slot
    last_used: float = 0.0


class AdapterPool:
    def __init__(self, modules: dict[str, LoraLinear], num_slots: int, *, cpu_capacity: int = 64, on_event=None):
        self.modules = modules
        self.slots = [Slot() for _ in range(num_slots)]
        self.cpu_capacity = cpu_capacity
        self._cpu: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._deleted: set[str] = set()
        self._lock = threading.Lock()
        self.on_event = on_event or (lambda kind, ref, **kw: None)
        self.loads = 0
        self.evictions = 0

    # --- CPU tier (any thread) -------------------------------------------------
    def _load(self, version) -> LoadedAdapter:
        from loraplex.adapters_store import load_adapter_weights

        t0 = time.perf_counter()
        w = load_adapter_weights(version.path, version.manifest, dtype=torch.float32, device="cpu")
        unknown = [m for m in w if m not in self.modules]
        if unknown:
            raise SlotFillFailed(f"adapter {version.ref} targets modules the engine did not wrap: {unknown[:3]}")
        la = LoadedAdapter(version.ref, w, dict(version.manifest.module_scales), time.perf_counter() - t0)
        self._prepare(la)  # refuse it here, on the caller's thread, rather than when a slot is filled
        self.loads += 1
        self.on_event("load", version.ref, seconds=la.load_seconds)
        return la

    def prefetch(self, version) -> LoadedAdapter:
        """Makes sure `version` is in the CPU tier (loads it from disk if needed)."""
        with self._lock:
            la = self._cpu.get(version.ref)
            if la is not None:
                self._cpu.move_to_end(version.ref)
                return la
        la = self._load(version)
        with self._lock:
            self._cpu.setdefault(version.ref, la)
            self._cpu.move_to_end(version.ref)
            self._trim_cpu()
            return self._cpu[version.ref]

    def pin(self, version) -> None:
        self.prefetch(version)
        with self._lock:
            self._pins[version.ref] = self._pins.get(version.ref, 0) + 1

    def unpin(self, ref: str) -> None:
        """Engine thread: a request on `ref` finished; a deleted version goes once its last request does."""
        with self._lock:
            n = self._pins.get(ref, 0) - 1
            if n <= 0:
                self._pins.pop(ref, None)
            else:
                self._pins[ref] = n
            drained = n <= 0 and ref in self._deleted
        if drained:
            self.forget(ref)

    def mark_deleted(self, ref: str) -> None:
        """Engine thread: `ref` left the store; free it now if idle, else after its last request."""
        with self._lock:
            self._deleted.add(ref)
        self.forget(ref)

    def pinned(self, ref: str) -> int:
        with self._lock:
            return self._pins.get(ref, 0)

    def residency(self, ref: str) -> tuple[str, int | None]:
        """Where `ref`'s weights are now (any thread): ("slot", i) in the batch's stacked tensors, ("cpu", None)
        loaded in memory, or ("disk", None) only in the store. A glance, not a lock on the slots: the engine thread
        may move it the next moment."""
        i = self.slot_of(ref)
        if i is not None:
            return "slot", i
        with self._lock:
            return ("cpu", None) if ref in self._cpu else ("disk", None)

    def _trim_cpu(self) -> None:
        resident = {s.ref for s in self.slots}
        for ref in list(self._cpu):
            if len(self._cpu) <= self.cpu_capacity:
                break
            if self._pins.get(ref) or ref in resident:
                continue
            del self._cpu[ref]
            self.on_event("drop_cpu", ref)

    def put(self, ref: str, weights: dict, scales: dict) -> None:
        """Engine thread: installs (or replaces) weights for `ref` that come from memory, not the store
        (a trainer pushing its in-training adapter); a slot already holding `ref` is refreshed in place.
        SlotFillFailed (nothing changed) when they cannot be served."""
        la = LoadedAdapter(ref, weights, scales, 0.0)
        self._prepare(la)
        with self._lock:
            self._cpu[ref] = la
            self._cpu.move_to_end(ref)
        i = self.slot_of(ref)
        if i is not None:
            self._fill_slot(i, la)

    def forget(self, ref: str) -> None:
        """Drops an unpinned version from every tier (after it was deleted from the store)."""
        with self._lock:
            if self._pins.get(ref):
                return
            self._cpu.pop(ref, None)
            self._deleted.discard(ref)
        for i, s in enumerate(self.slots):
            if s.ref == ref and s.running == 0:
                self._clear_slot(i)

    # --- slots (engine thread) -------------------------------------------------
    def slot_of(self, ref: str) -> int | None:
        for i, s in enumerate(self.slots):
            if s.ref == ref:
                return i
        return None

    def acquire(self, ref: str) -> int:
        """A slot holding `ref` with one more running user; loads it (evicting LRU) if needed."""
        i = self.slot_of(ref)
        if i is None:
            with self._lock:
                la = self._cpu.get(ref)
            if la is None:
                raise KeyError(f"adapter {ref} is not in the CPU tier (was it pinned?)")
            free = [j for j, s in enumerate(self.slots) if s.running == 0]
            if not free:
                raise NoFreeSlot(ref)
            empty = [j for j in free if self.slots[j].ref is None]
            i = empty[0] if empty else min(free, key=lambda j: self.slots[j].last_used)
            evicted = self.slots[i].ref
            self._fill_slot(i, la)  # SlotFillFailed: the slot still holds `evicted`, untouched
            if evicted is not None:
                self.evictions += 1
                self.on_event("evict", evicted)
        s = self.slots[i]
        s.running += 1
        s.last_used = time.monotonic()
        return i

    def can_acquire(self, ref: str) -> bool:
        return self.slot_of(ref) is not None or any(s.running == 0 for s in self.slots)

    def release(self, slot: int) -> None:
        s = self.slots[slot]
        s.running = max(0, s.running - 1)
        s.last_used = time.monotonic()

    def _prepare(self, la: LoadedAdapter) -> dict:
        """module -> LoraLinear.prepare_slot(...) of every module, or SlotFillFailed naming the first that fails."""
        out = {}
        for name, mod in self.modules.items():
            ab = la.weights.get(name)
            try:
                out[name] = None if ab is None else mod.prepare_slot(ab[0], ab[1], la.scales[name])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise SlotFillFailed(f"adapter {la.ref} cannot be served: module {name}: {e}") from None
        return out

    def _fill_slot(self, i: int, la: LoadedAdapter) -> None:
        """All or nothing: everything is converted and checked before slot `i` is written."""
        prepared = self._prepare(la)  # SlotFillFailed here: nothing written
        for name, p in prepared.items():
            self.modules[name].reserve(p)  # may allocate (and fail); slot contents unchanged
        try:
            for name, p in prepared.items():
                self.modules[name].commit_slot(i, p)
        except BaseException:
            self._clear_slot(i)  # never serve a half-written slot under any name
            raise
        self.slots[i].ref = la.ref

    def _clear_slot(self, i: int) -> None:
        for mod in self.modules.values():
            mod.set_slot(i, None, None, 0.0)
        self.slots[i] = Slot()

    def stats(self) -> dict:
        with self._lock:
            cpu = len(self._cpu)
        return {
            "slots_total": len(self.slots),
            "slots_used": sum(1 for s in self.slots if s.ref is not None),
            "cpu_resident": cpu,
            "loads": self.loads,
            "evictions": self.evictions,
        }
