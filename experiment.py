"""Train, validate and test capsule models: the reference's `python experiment.py` command.

The driver is `capsules.experiment` (installed, also the `capsules-experiment` command and
`python -m capsules.experiment`); this file runs it from a clone, with the same flags.
"""

from capsules.experiment import console_main

if __name__ == "__main__":
    console_main()
