"""``python -m testbed``: the testbed harness's Hydra entry point (``configs/testbed.yaml``)."""

from __future__ import annotations

import hydra

from testbed.harness.experiments import register_testbed_configs, run_from_cfg

register_testbed_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="testbed")
def main(cfg) -> None:
    run_from_cfg(cfg)


if __name__ == "__main__":
    main()
