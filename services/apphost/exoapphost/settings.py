"""The app host's limits and tuning, from node.yaml's `apphost:` section.

| node.yaml key (`apphost:`)        | meaning                                                         | default  |
| --------------------------------- | --------------------------------------------------------------- | -------- |
| `fuel_per_call`                   | fuel (~ wasm instructions) of one call: init, a tick, a message | 100 M    |
| `call_timeout_ms`                 | wall-clock limit of one call (epoch interruption)               | 1000     |
| `memory_max_bytes`                | cap of an app's linear memory                                   | 64 MiB   |
| `store_requests_in_flight_max`    | store requests of one app awaiting a reply                      | 64       |
| `store_request_timeout_ms`        | deadline of one store request                                   | 10000    |
| `restart_backoff_initial_ms`      | first restart delay after a failure (then doubled)              | 1000     |
| `restart_backoff_max_ms`          | longest restart delay                                           | 30000    |
| `healthy_after_ms`                | a run this long resets the delay to the initial one             | 60000    |
| `store_address`                   | EntityStore of the apps' requests (default: see __main__)       | ""       |

Not configurable (constants below): the epoch tick, the default tick interval (100 ms, SPEC 5.2),
the message batch size (1000) and the inbox bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from exocommon.config import ConfigError, LocalNodeConfig

# The epoch ticker thread increments the engine's epoch this often; a call's deadline is a whole
# number of ticks, so it fires between `call_timeout_ms` and one tick later.
EPOCH_TICK_MS = 10
# Next tick when the app asks for none (SPEC 5.2), and the shortest wait between two ticks when it
# asks for a time already past (keeps a misbehaving app from spinning the host thread).
DEFAULT_TICK_INTERVAL_MS = 100
MIN_TICK_INTERVAL_MS = 1
# Incoming messages delivered before one tick (SPEC 5.2).
MESSAGE_BATCH_MAX = 1000
# How often the service re-reads cell.yaml for installed / removed apps.
APPS_RELOAD_INTERVAL_MS = 2000


@dataclass(frozen=True)
class AppLimits:
    fuel_per_call: int = 100_000_000
    call_timeout_ms: int = 1000
    memory_max_bytes: int = 64 * 1024 * 1024
    store_requests_in_flight_max: int = 64
    store_request_timeout_ms: int = 10_000

    def epoch_ticks(self) -> int:
        """The epoch deadline of one call, in epoch ticks (at least 1)."""
        return max(1, -(-self.call_timeout_ms // EPOCH_TICK_MS))


@dataclass(frozen=True)
class RestartPolicy:
    """1 s, doubling up to 30 s; back to 1 s after a run of 60 s (a healthy run)."""

    backoff_initial_ms: int = 1000
    backoff_max_ms: int = 30_000
    healthy_after_ms: int = 60_000

    def next_delay_ms(self, previous_ms: int | None, ran_ms: float) -> int:
        """The delay before the next restart, given the previous delay and how long the app ran."""
        if previous_ms is None or ran_ms >= self.healthy_after_ms:
            return self.backoff_initial_ms
        return min(previous_ms * 2, self.backoff_max_ms)


@dataclass(frozen=True)
class AppHostSettings:
    limits: AppLimits = AppLimits()
    restart: RestartPolicy = RestartPolicy()
    # "" = the node's addresses.store
    store_address: str = ""

    @classmethod
    def from_node_config(cls, cfg: LocalNodeConfig, source: str = "node.yaml") -> AppHostSettings:
        """The settings of node config `cfg`; ConfigError names a bad value."""
        section = cfg.apphost if cfg.HasField("apphost") else None

        def value(name: str, default: int) -> int:
            if section is None or not section.HasField(name):
                return default
            v = int(getattr(section, name).value)
            if v < 1:
                raise ConfigError(source, f"apphost.{name}", f"must be at least 1, got {v}")
            return v

        limits = AppLimits(
            fuel_per_call=value("fuel_per_call", AppLimits.fuel_per_call),
            call_timeout_ms=value("call_timeout_ms", AppLimits.call_timeout_ms),
            memory_max_bytes=value("memory_max_bytes", AppLimits.memory_max_bytes),
            store_requests_in_flight_max=value("store_requests_in_flight_max", AppLimits.store_requests_in_flight_max),
            store_request_timeout_ms=value("store_request_timeout_ms", AppLimits.store_request_timeout_ms),
        )
        restart = RestartPolicy(
            backoff_initial_ms=value("restart_backoff_initial_ms", RestartPolicy.backoff_initial_ms),
            backoff_max_ms=value("restart_backoff_max_ms", RestartPolicy.backoff_max_ms),
            healthy_after_ms=value("healthy_after_ms", RestartPolicy.healthy_after_ms),
        )
        if restart.backoff_max_ms < restart.backoff_initial_ms:
            raise ConfigError(source, "apphost.restart_backoff_max_ms", "must be at least restart_backoff_initial_ms")
        store_address = section.store_address if section is not None else ""
        return cls(limits=limits, restart=restart, store_address=store_address)
