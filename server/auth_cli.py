"""`loraplex keys ...` and `loraplex tenants ...`: API keys and quotas, in the store's registry.

They write the registry directly (like `loraplex routes` without `--server`), so they work before a
server has ever run and on the machine that holds the store; a running server sees the change within
a second. The new key's secret is printed once, on stdout alone, so `KEY=$(loraplex keys create ...)`
captures it; everything else goes to stderr.
"""

from __future__ import annotations

import getpass
import json
import sys

from .cli import STORE_HELP, store_arg


def keys_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed in the registry)")
    p.add_argument("--store", type=store_arg, help=STORE_HELP)
    ks = p.add_subparsers(dest="action", required=True)
    c = ks.add_parser("create", help="create a key; prints it once")
    c.add_argument("--tenant", required=True, help="the tenant the key acts for ('*': every tenant, for operators)")
    c.add_argument("--scope", required=True, help="comma-separated: inference, train, admin")
    c.add_argument("--name", help="a label shown in `keys list` and the audit log")
    ls = ks.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    r = ks.add_parser("revoke", help="revoke a key by id (a running server refuses it within a second)")
    r.add_argument("key_id")


def tenants_parser(sub) -> None:
    from loraplex.adapters_store.tenancy import Quota

    p = sub.add_parser("tenants", help="per-tenant quotas")
    p.add_argument("--store", type=store_arg, help=STORE_HELP)
    ts = p.add_subparsers(dest="action", required=True)
    q = ts.add_parser(
        "quota", help="set limits of TENANT ('*': the default of tenants without their own); no flags: show"
    )
    q.add_argument("tenant")
    for f in Quota.model_fields:
        q.add_argument("--" + f.replace("_", "-"), type=int, dest=f, metavar="N")
    ts.add_parser("list", help="every tenant with keys or quotas, and its limits")


def _registry(args):
    from loraplex.adapters_store import AdapterStore
    from loraplex.adapters_store.tenancy import AccessRegistry

    from .runtime import default_home

    from loraplex.adapters_store import StoreError

    try:
        return AccessRegistry(AdapterStore(args.store or default_home() / "store"))
    except StoreError as e:  # an s3:// store that cannot be reached, a registry it needs
        print(f"loraplex {args.cmd}: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _who() -> str:
    return f"cli:{getpass.getuser()}"


def cmd_keys(args) -> int:
    from loraplex.adapters_store import StoreError

    reg = _registry(args)
    try:
        if args.action == "create":
            key, secret = reg.create_key(args.tenant, args.scope, name=args.name, created_by=_who())
            reg.record(
                tenant=key.tenant,
                key_id=None,
                caller=_who(),
                action="keys create",
                resource=key.id,
                status="OK",
                detail={"scopes": list(key.scopes), "name": key.name},
            )
            print(
                f"created {key.id} (tenant {key.tenant!r}, scopes {','.join(key.scopes)}); the key is shown once:",
                file=sys.stderr,
            )
            print(secret)
        elif args.action == "list":
            from .api.auth import ALL

            for k in reg.keys(args.tenant or ALL, include_revoked=args.all):
                print(json.dumps(k.to_json()))
        else:
            key = reg.revoke_key(args.key_id, revoked_by=_who())
            reg.record(
                tenant=key.tenant, key_id=None, caller=_who(), action="keys revoke", resource=key.id, status="OK"
            )
            print(f"revoked {key.id} (tenant {key.tenant!r})", file=sys.stderr)
    except StoreError as e:
        print(f"loraplex keys: {e}", file=sys.stderr)
        return 1
    finally:
        reg.store.close()
    return 0


def cmd_tenants(args) -> int:
    from loraplex.adapters_store import StoreError
    from loraplex.adapters_store.tenancy import Quota

    reg = _registry(args)
    try:
        if args.action == "quota":
            limits = {f: getattr(args, f) for f in Quota.model_fields if getattr(args, f) is not None}
            if limits:
                current = reg.quotas().get(args.tenant, Quota()).model_dump(exclude_none=True)
                q = reg.set_quota(args.tenant, {**current, **limits}, by=_who())
                reg.record(
                    tenant=args.tenant,
                    key_id=None,
                    caller=_who(),
                    action="tenants quota",
                    resource=args.tenant,
                    status="OK",
                    detail=limits,
                )
            else:
                q = reg.quota(args.tenant) if args.tenant != "*" else reg.quotas().get("*", Quota())
            print(json.dumps({"tenant": args.tenant, "quota": q.model_dump()}))
        else:
            keys = reg.keys()
            for t in sorted({k.tenant for k in keys} | set(reg.quotas())):
                print(
                    json.dumps(
                        {
                            "tenant": t,
                            "keys": sum(1 for k in keys if k.tenant == t),
                            "quota": reg.quota(t).model_dump(exclude_none=True),
                        }
                    )
                )
    except StoreError as e:
        print(f"loraplex tenants: {e}", file=sys.stderr)
        return 1
    finally:
        reg.store.close()
    return 0
