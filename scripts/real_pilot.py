"""The pilot of the study on a real model; see eaft_pl/experiments/realmodel/pilot.py for its rule.

    python scripts/real_pilot.py --lrs 3e-5 1e-4 3e-4 --seeds 0 1 --steps 120 --eval_every 20
"""

from eaft_pl.experiments.realmodel.pilot import main

if __name__ == "__main__":
    main()
