"""``python -m sim``: the simulator's Hydra entry point (configs under ``configs/``)."""

from __future__ import annotations

import hydra

from sim.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg) -> None:
    from sim.app import run, testbed_only

    why = testbed_only(cfg)
    if why:
        raise SystemExit(why)
    run(cfg)


if __name__ == "__main__":
    main()
