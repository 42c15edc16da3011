"""Import a Hugging Face Llama folder into a prepared run as initial weights.

    dbscale prepare --config C --run runs/ft --set data.tokenizer_model=hf/llama/tokenizer.model
    dbscale import --hf hf/llama --run runs/ft            # the baseline starts from it
    dbscale import --hf hf/llama --run runs/ft --blocks   # and every block from its own layers

Block b is initialised from the pretrained layers it owns, the pretrained embedding, final norm and head,
with AdaLN and readout at zero: block-wise continued training of an existing model. Jobs use these
weights when they start without a checkpoint.
"""


def add_arguments(p) -> None:
    p.add_argument("--hf", required=True, help="local HF folder with config.json and model.safetensors")
    p.add_argument("--run", required=True, help="prepared run directory with the same model shape and tokenizer")
    p.add_argument("--blocks", action="store_true", help="also initialise every DiffusionBlocks block")


def execute(args, p) -> int:
    from dbscale.hf import import_hf

    import_hf(args.hf, args.run, blocks=args.blocks)
    return 0
