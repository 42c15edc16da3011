"""Train block b of a DiffusionBlocks run as its own DeepSpeed job.

deepspeed --num_gpus 8 launchers/train_block.py --run runs/X --block 0
python launchers/train_block.py --run runs/X --block 0          # one process
"""

import sys

from dbscale.train.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], kind="block"))
