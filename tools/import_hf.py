"""Import a Hugging Face Llama folder into a prepared run as initial weights.

    python tools/prepare.py --config C --run runs/ft --set data.tokenizer_model=hf/llama/tokenizer.model
    python tools/import_hf.py --hf hf/llama --run runs/ft            # the baseline starts from it
    python tools/import_hf.py --hf hf/llama --run runs/ft --blocks   # and every block from its own layers

Block b is initialised from the pretrained layers it owns, the pretrained embedding, final norm and head,
with AdaLN and readout at zero: block-wise continued training of an existing model. Jobs use these
weights when they start without a checkpoint.
"""

import argparse

from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="local HF folder with config.json and model.safetensors")
    p.add_argument("--run", required=True, help="prepared run directory with the same model shape and tokenizer")
    p.add_argument("--blocks", action="store_true", help="also initialise every DiffusionBlocks block")
    args = p.parse_args()
    from dbscale.hf import import_hf

    import_hf(args.hf, args.run, blocks=args.blocks)
    return 0


if __name__ == "__main__":
    cli_main(main)
