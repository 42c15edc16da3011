"""Train the end-to-end baseline of a run (same data, same layers) as a DeepSpeed job.

deepspeed --num_gpus 8 launchers/train_e2e.py --run runs/X
python launchers/train_e2e.py --run runs/X
"""

import sys

from dbscale.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], kind="e2e"))
