"""open_store: the TokenStore for a StoreSpec."""

from __future__ import annotations

from broker.clock import Clock
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.model import StoreSpec
from broker.store import TokenStore
from broker.store.memory import MemoryStore

# How much longer than a WAIT for a replica the client's socket waits for WAIT's answer.
REPLICA_ACK_SLACK = 0.5


def open_store(spec: StoreSpec, metrics: Metrics, clock: Clock) -> TokenStore:
    """memory:// → MemoryStore; any Redis URL → RedisStore with the keyring from the key file."""
    if spec.url.startswith("memory://"):
        metrics.store_up.set(1)
        return MemoryStore(clock)
    # Imported here: redis-py and AES cost about 14 MiB that a memory:// broker never uses.
    from broker.store.crypto import Keyring
    from broker.store.redis_store import RedisStore, redis_client

    if spec.encryption_key_file is None:
        raise ConfigError("store.encryption_key_file", "required for a shared store")
    keyring = Keyring.from_file(spec.encryption_key_file)
    password = None
    if spec.password_file is not None:
        try:
            password = spec.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError("store.password_file", f"cannot read: {exc.strerror}") from None
    # A WAIT for a replica blocks its connection up to its timeout: the socket outlasts it.
    socket_timeout = max(1.0, spec.replica_ack_timeout + REPLICA_ACK_SLACK)
    try:
        client = redis_client(spec.url, password=password, socket_timeout=socket_timeout)
    except ValueError as exc:
        raise ConfigError("store.url", str(exc)) from None
    return RedisStore(
        client,
        key_prefix=spec.key_prefix,
        keyring=keyring,
        metrics=metrics,
        clock=clock,
        require_replica_ack=spec.require_replica_ack,
        replica_ack_timeout=spec.replica_ack_timeout,
    )
