"""The real-model experiment (``make real-demo``); see eaft_pl/experiments/realmodel/driver.py for what it does.

    python scripts/real_experiment.py                                   # SFT and EAFT on SmolLM2, one seed
    python scripts/real_experiment.py --methods sft eaft dft --lrs 2e-5 5e-5 --seeds 0 1 2
"""

from eaft_pl.experiments.realmodel.driver import main

if __name__ == "__main__":
    main()
