"""Write a merged end-to-end baseline as a Hugging Face Llama folder.

python tools/export_hf.py --model runs/tiny/e2e/merged --out hf/tiny
# then: AutoModelForCausalLM.from_pretrained("hf/tiny"), AutoTokenizer.from_pretrained("hf/tiny")
"""

import argparse

from dbscale.errors import cli_main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="merged end-to-end model (R/e2e/merged)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args()
    from dbscale.hf import export_hf

    print(f"[export] wrote {export_hf(args.model, args.out)}")
    return 0


if __name__ == "__main__":
    cli_main(main)
