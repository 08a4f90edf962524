"""`kill -9` of a process in the middle of registrations into a PostgreSQL registry: every version the registry
shows is complete (its files hash to its recorded sha256), none is half there, and the store keeps working."""
from __future__ import annotations

import random
import subprocess
import sys
import time

from loraplex.adapters_store import AdapterStore
from loraplex.adapters_store.versions import _dir_sha256

REGISTER_FOREVER = """
import sys
from loraplex.adapters_store import AdapterStore
st = AdapterStore(sys.argv[1], registry=sys.argv[2])
print("open", flush=True)
while True:
    st.register("bot", sys.argv[3])
"""


def test_kill_9_mid_registration_leaves_whole_versions_or_none(tmp_path, adapter_dirs, postgres_url):
    root = tmp_path / "store"
    rng = random.Random(0)
    for _ in range(6):
        p = subprocess.Popen(
            [sys.executable, "-c", REGISTER_FOREVER, str(root), postgres_url, str(adapter_dirs["beta"])],
            stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "open"
        time.sleep(rng.uniform(0.3, 1.5))  # registrations take a fraction of that: kills land mid-way
        p.kill()
        p.wait()
        st = AdapterStore(root, registry=postgres_url)  # what a replica opening now sees
        try:
            for v in st.list():
                assert v.path.is_dir() and _dir_sha256(v.path) == v.sha256, v.ref
            assert list((root / "tmp").iterdir()) == []  # the dead registration's copy was swept
        finally:
            st.close()
    st = AdapterStore(root, registry=postgres_url)
    try:
        before = [v.version for v in st.list()]
        assert before, "no registration completed before the kills: the test exercised nothing"
        v = st.register("bot", adapter_dirs["alpha"])
        assert v.version > max(before, default=0) and st.resolve("bot").ref == v.ref
        on_disk = {int(d.name) for d in (root / "adapters" / "bot").iterdir()}
        assert set(before) | {v.version} <= on_disk  # a directory left by a kill between rename and commit is
        # never a version: its number is skipped, and no row points at it
    finally:
        st.close()
