"""Write a merged end-to-end baseline as a Hugging Face Llama folder.

dbscale export --model runs/tiny/e2e/merged --out hf/tiny
# then: AutoModelForCausalLM.from_pretrained("hf/tiny"), AutoTokenizer.from_pretrained("hf/tiny")
"""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="merged end-to-end model (R/e2e/merged)")
    p.add_argument("--out", required=True, help="output folder")


def execute(args, p) -> int:
    from dbscale.hf import export_hf

    print(f"[export] wrote {export_hf(args.model, args.out)}")
    return 0
