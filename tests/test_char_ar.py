"""An autoregressive run on the character tokenizer, which has no EOS (its document separator is the space),
trains, merges and generates from both the chain and the baseline; and both AR block layouts go the whole way
through the trainer, merge and generation."""

import numpy as np
import pytest

from dbscale.create_run import prepare_run
from dbscale.generate import generate_texts, heldout_metrics, prompt_ids
from dbscale.merge import load_merged, merge_run

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
CHAR = {"tokenizer_type": "char", "alphabet": ALPHABET, "vocab_size": len(ALPHABET), "normalize": "text8"}
LAYOUTS = {
    "two_stream": {},
    "stream_sigma_free": {"block": "stream", "time_conditioning": False},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_char_level_ar_run_generates_from_chain_and_baseline(process_group, tiny_cfg, tmp_path, layout):
    from dbscale.train.trainer import Trainer

    cfg = tiny_cfg(
        model=LAYOUTS[layout],
        data=CHAR,
        train={"steps": 3, "save_every": 100, "val_every": 0, "log_every": 1},
    )
    run = prepare_run(cfg, tmp_path / "run", log=lambda *a: None)
    for job in [*range(run.num_blocks), None]:
        trainer = Trainer(run, job, 0, 1)
        trainer.train()
        trainer.close()
    prompt = "the union"
    for merged in (merge_run(run.root, log=lambda *a: None), merge_run(run.root, e2e=True, log=lambda *a: None)):
        model, tokenizer, manifest = load_merged(merged)
        assert tokenizer.eos_id is None
        assert prompt_ids(tokenizer, prompt) == [ALPHABET.index(" "), *(ALPHABET.index(c) for c in prompt)]
        out = generate_texts(model, tokenizer, [prompt, "we"], max_new_tokens=12, temperature=1.0, top_p=0.9)
        assert [r["new_tokens"] for r in out] == [12, 12]  # nothing stops a char model early: it has no EOS
        assert all(len(r["completion"]) == 12 and set(r["completion"]) <= set(ALPHABET) for r in out)
        windows = np.stack([np.asarray(tokenizer.encode("the people of the united states " * 2)[:17])] * 2)
        figures = heldout_metrics(model, windows, batch_size=2)
        assert 0.0 <= figures["accuracy"] <= 1.0
        if manifest["kind"] == "e2e":
            assert figures["ce"] > 0


def test_prompts_are_written_as_the_run_wrote_its_training_text():
    from dbscale.config import DataConfig
    from dbscale.data.sources import as_run_text
    from dbscale.data.tokenizer import CharTokenizer

    tok = CharTokenizer(ALPHABET)
    text8 = DataConfig(tokenizer_type="char", vocab_size=27, normalize="text8")
    assert as_run_text("The Congress, 2 times!", text8, tok) == "the congress two times"
    mapped = DataConfig(tokenizer_type="char", vocab_size=27, out_of_vocab="map")
    assert as_run_text("The end.", mapped, tok) == " he end "
    assert as_run_text("The end.", DataConfig(), tok) == "The end."  # sentencepiece runs take the text as it is
