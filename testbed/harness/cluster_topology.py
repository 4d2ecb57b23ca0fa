"""The ``cluster`` topology: real machines, driven from this process (the *coordinator*).

The storage server runs on the storage node (``python -m testbed.objectstore --host <addr> --port 9000
--credentials F --allow-pacer-control ...``: beyond loopback it needs credentials of its own), one agent per GPU node (``python -m testbed.harness.agent``); the harness sets
the server's pacer through its admin operation instead of restarting it, measures every agent's clock offset
before each run and releases all hosts at one common start (``testbed.harness.coordinator``).
"""

from __future__ import annotations

from collections.abc import Callable

from testbed.harness.agent_auth import DEFAULT_AGENT_TOKEN, load_token
from testbed.harness.coordinator import (
    AgentClient,
    AgentJob,
    ClockSample,
    StorageControlError,
    set_pacer,
    storage_health,
)
from testbed.harness.jobs import WorkerJob
from testbed.harness.topology_base import StorageHandle, Topology, TopologyConfig, TopologyError


class ClusterTopology(Topology):
    """Real machines: the server runs at ``storage_url``, one agent per GPU node at ``workers[i]``.

    Building it checks that the server answers and that every agent answers, accepts the token and keeps a
    clock within ``max_clock_offset_s`` of this machine's, so a misconfiguration fails before the first run.
    ``start_storage`` sets the pacer through the server's admin operation (objects stay: the server is not
    restarted); ``sync_clocks`` re-measures the offsets before every run; ``describe`` records each
    measurement and the pacer settings (they end up in the run's ``run.json``).  ``clock`` is injectable.
    """

    name = "cluster"

    def __init__(self, cfg: TopologyConfig, clock: Callable[[], float] | None = None) -> None:
        if not cfg.storage_url:
            raise TopologyError(
                "topology=cluster needs topology.storage_url=http://<storage node>:<port> (start the server "
                "there: python -m testbed.objectstore --host <addr> --port 9000 --credentials F "
                "--allow-pacer-control ...)"
            )
        if not cfg.workers:
            raise TopologyError(
                "topology=cluster needs topology.workers=[http://<gpu node>:9200,...] (start an agent on each "
                "GPU node: python -m testbed.harness.agent --host <addr> --port 9200 --token-file F)"
            )
        super().__init__(cfg)
        if clock is not None:
            self.clock = clock  # type: ignore[method-assign]
        self.storage = StorageHandle(cfg.storage_url.rstrip("/"), None, None, None)
        token = _agent_token(cfg)
        self.agents = [
            AgentClient(u, token, cfg.agent_timeout_s, clock=lambda: self.clock()) for u in cfg.workers
        ]
        self.samples: list[ClockSample] = []
        self.clock_log: list[dict] = []
        self.pacer_log: list[dict] = []
        try:
            self.pacer = _settings(storage_health(self.storage.url, cfg.agent_timeout_s))
        except StorageControlError as e:
            raise TopologyError(
                f"{e}; start it on the storage node: python -m testbed.objectstore --host <addr> --port 9000 "
                "--allow-pacer-control ..."
            ) from None
        self.sync_clocks()

    @property
    def hosts(self) -> int:
        return len(self.cfg.workers)

    @property
    def start_lead_s(self) -> float:  # type: ignore[override]
        return float(self.cfg.start_lead_s)

    def start_storage(
        self,
        policy: str = "equal",
        egress_Gbps: float = 0.0,
        extra: list[str] | None = None,
        policy_kwargs: dict | None = None,
    ) -> str:
        """Set the running server's pacer (``egress_Gbps`` 0: unpaced; ``policy_kwargs`` the policy's keyword
        arguments) and return its URL."""
        from testbed.objectstore.auth import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

        if extra:
            raise TopologyError("topology=cluster cannot pass flags to a server it did not start")
        url, timeout_s = self.storage.url, self.cfg.agent_timeout_s
        try:
            if self.cfg.pacer_control:
                ak, sk = self.cfg.access_key or DEFAULT_ACCESS_KEY, self.cfg.secret_key or DEFAULT_SECRET_KEY
                settings = set_pacer(
                    url, policy, egress_Gbps, ak, sk, policy_kwargs=policy_kwargs, timeout_s=timeout_s
                )
                self.pacer = _settings(settings)
            else:  # the operator's settings stay; record what they are
                self.pacer = _settings(storage_health(url, timeout_s))
        except StorageControlError as e:
            raise TopologyError(str(e)) from None
        self.pacer_log.append(
            {
                "requested": _settings(
                    {"policy": policy, "egress_gbps": egress_Gbps, "policy_kwargs": policy_kwargs}
                ),
                "server": self.pacer,
            }
        )
        return url

    def start_worker(self, host: int, action: str, plan: dict, timeout_s: float) -> WorkerJob:
        return AgentJob(self.agents[host], host, action, plan, timeout_s, lambda: self.clock_offset_s(host))

    def sync_clocks(self) -> None:
        """Every agent's clock offset (Cristian's algorithm); ``TopologyError`` if one exceeds the bound."""
        self.samples = [a.clock_sample(self.cfg.clock_samples) for a in self.agents]
        self.clock_log.append(
            {
                "t_s": self.clock(),
                "offsets_s": [s.offset_s for s in self.samples],
                "rtt_s": [s.rtt_s for s in self.samples],
            }
        )
        bound = float(self.cfg.max_clock_offset_s)
        for i, s in enumerate(self.samples):
            if abs(s.offset_s) > bound:
                raise TopologyError(
                    f"clock offset of agent {s.url} (host {i}) is {s.offset_s * 1e3:+.1f} ms "
                    f"(round trip {s.rtt_s * 1e3:.1f} ms), above topology.max_clock_offset_s = {bound:g} s: "
                    "synchronise the clocks (NTP/PTP, e.g. `chronyc tracking`) or raise the bound"
                )

    def clock_offset_s(self, host: int) -> float:
        return self.samples[host].offset_s if self.samples else 0.0

    def close(self) -> None:
        self._tmp.cleanup()  # the server and the agents belong to the operator: they keep running

    def describe(self) -> dict:
        return {
            "topology": self.name,
            "hosts": self.hosts,
            "storage_url": self.storage.url,
            "workers": list(self.cfg.workers),
            "pacer": self.pacer,
            "pacer_changes": self.pacer_log,
            "clock": {
                "max_clock_offset_s": self.cfg.max_clock_offset_s,
                "agents": [
                    {"url": s.url, "host": s.host, "offset_s": s.offset_s, "rtt_s": s.rtt_s}
                    for s in self.samples
                ],
                "measurements": self.clock_log,
            },
        }


def _agent_token(cfg: TopologyConfig) -> str:
    if cfg.agent_token_file:
        try:
            return load_token(cfg.agent_token_file) or ""
        except (OSError, ValueError) as e:
            raise TopologyError(f"cannot read topology.agent_token_file: {e}") from None
    return cfg.agent_token or load_token() or DEFAULT_AGENT_TOKEN


def _settings(doc: dict) -> dict:
    """The pacer settings of a health or pacer-control document (``policy_kwargs`` only when there are any)."""
    out = {k: doc.get(k) for k in ("policy", "egress_gbps")}
    if doc.get("policy_kwargs"):
        out["policy_kwargs"] = dict(doc["policy_kwargs"])
    return out
