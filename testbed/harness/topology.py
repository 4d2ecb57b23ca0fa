"""Where the testbed's roles run: one storage host (the ObjectCache S3 server) and N GPU-client hosts.

Three topologies, one interface (``Topology``): ``start_storage`` starts (or re-paces) the server on the
storage host, ``start_worker(i, action, plan, timeout_s)`` runs a ``python -m testbed.harness.worker`` action on GPU
host ``i`` (a ``testbed.harness.jobs.WorkerJob``), ``clock``/``sync_clocks``/``clock_offset_s`` give the common
start a meaning across hosts, and ``close`` tears everything down.

* ``local``: everything on loopback (127.0.0.1) of this machine; no shaping.
* ``netns``: a storage host and N client hosts as Linux network namespaces, joined through a bridge in a
  "switch" namespace by veth pairs.  HTB caps: the storage host's uplink (``storage_Gbps``, shared by every
  client: the shared storage egress) and each switch port towards a client host (``host_Gbps``, the per-host
  link).  Root is required (a clear error otherwise).  Namespaces are named ``ocnet<pid>-<role>``; ``close``
  kills the processes inside and deletes them, ``atexit`` and SIGINT/SIGTERM handlers call ``close``, and
  ``cleanup_stale`` removes namespaces left by a process that no longer exists (after a SIGKILL), so nothing
  is left behind.
* ``cluster``: real machines, driven from this process (the *coordinator*).  The storage server runs on the
  storage node (``python -m testbed.objectstore --host <addr> --port 9000 --credentials F --allow-pacer-control ...``), one agent
  per GPU node (``python -m testbed.harness.agent``, ``testbed/harness/agent.py``); the harness sets the server's pacer
  through its admin operation instead of restarting it, measures every agent's clock offset before each
  run and releases all hosts at one common start (``testbed.harness.coordinator``).

Addresses: the namespaces use 10.213.<k>.0/24 (storage .1, client host i .(10+i)), ``k`` derived from the pid
so two concurrent harnesses do not collide.
"""

from __future__ import annotations

from testbed.harness.cluster_topology import ClusterTopology
from testbed.harness.netns_topology import NetnsTopology, cleanup_stale, list_namespaces, netns_available
from testbed.harness.topology_base import (
    LocalTopology,
    StorageHandle,
    Topology,
    TopologyConfig,
    TopologyError,
)

__all__ = [
    "ClusterTopology",
    "LocalTopology",
    "NetnsTopology",
    "StorageHandle",
    "Topology",
    "TopologyConfig",
    "TopologyError",
    "cleanup_stale",
    "list_namespaces",
    "make_topology",
    "netns_available",
]


def make_topology(cfg: TopologyConfig) -> Topology:
    kinds = {"local": LocalTopology, "netns": NetnsTopology, "cluster": ClusterTopology}
    if cfg.name not in kinds:
        raise TopologyError(f"unknown topology {cfg.name!r}: local, netns or cluster")
    return kinds[cfg.name](cfg)
