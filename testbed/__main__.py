"""``python -m testbed``: the testbed harness's Hydra entry point (``configs/testbed.yaml``)."""

from __future__ import annotations

import hydra

from sim.config import register_configs
from testbed.topology import TopologyConfig


def register_testbed_configs() -> None:
    """The simulator's group schemas plus ``base_topology`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    ConfigStore.instance().store(group="topology", name="base_topology", node=TopologyConfig)


register_testbed_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="testbed")
def main(cfg) -> None:
    from testbed.harness import run_from_cfg

    run_from_cfg(cfg)


if __name__ == "__main__":
    main()
