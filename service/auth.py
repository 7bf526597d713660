"""API keys: ``sk-alignd-<id>-<secret>``, stored as a SHA-256 digest and scoped to one organization.

SHA-256 rather than a slow KDF: keys are 192-bit random secrets, so brute force is not the threat a
password hash guards against, and every request must verify fast. Lookup is by digest; the final
comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Organization, new_id, now

KEY_PREFIX = "sk-alignd-"


@dataclass(frozen=True)
class Principal:
    organization_id: str
    organization_name: str
    key_id: str


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_key(session: Session, org_name: str) -> tuple[str, str]:
    """Create (or reuse) the organization and a new key for it; returns (key id, full secret)."""
    org = session.scalar(select(Organization).where(Organization.name == org_name))
    if org is None:
        org = Organization(id=new_id("org"), name=org_name)
        session.add(org)
        session.flush()
    key_id = "key-" + secrets.token_hex(6)
    secret = f"{KEY_PREFIX}{secrets.token_urlsafe(24)}"
    session.add(ApiKey(id=key_id, organization_id=org.id, key_hash=hash_key(secret)))
    session.flush()
    return key_id, secret


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now()
    return True


def authenticate(session: Session, authorization: str | None) -> Principal | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hash_key(token.strip())
    row = session.execute(
        select(ApiKey, Organization).join(Organization).where(ApiKey.key_hash == digest)
    ).first()
    if row is None:
        return None
    key, org = row
    if key.revoked_at is not None or not hmac.compare_digest(key.key_hash, digest):
        return None
    return Principal(organization_id=org.id, organization_name=org.name, key_id=key.id)
