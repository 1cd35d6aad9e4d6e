"""The embedded experiment (the README's main job); see eaft_pl/experiments/toyworld/driver.py for what it does.

    python scripts/embedded_experiment.py                      # base + SFT and EAFT, seed 0
    python scripts/embedded_experiment.py --seeds 0 1 2 --methods all --lrs 1e-4 3e-4 1e-3
"""

from eaft_pl.experiments.toyworld.driver import main

if __name__ == "__main__":
    main()
