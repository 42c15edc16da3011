"""Property-based: random and mutated configs and overrides either load or fail with ConfigError naming
the file and a field; never a raw exception from deep inside, never a silent default for a misspelled key."""

import random
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbscale.config import _SECTIONS, Config, apply_overrides, field_names
from dbscale.errors import ConfigError
from dbscale.families import config_from_dict, load_config, sections
from dbscale.inspect import dry_run_report

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "configs").glob("*.yaml"))]
FIELDS = {s: field_names(cls) for s, cls in _SECTIONS.items()}
KEYS = [f"{s}.{k}" for s, names in FIELDS.items() for k in names]
FIELDS["model"] += list(sections())  # a family's own sub-section (model.huginn) is a key of the model section

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["bpe", "uniform", "edm", "cosine", "sotu", "3e-4", "1e999", "-0"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def misspell(key: str, rnd: random.Random) -> str:
    i = rnd.randrange(len(key))
    return key[:i] + key[i + 1 :] if rnd.random() < 0.5 else key[:i] + "x" + key[i:]


def check(fn, where="fuzz.yaml"):
    """Either a Config, or a ConfigError that names the file and something the user wrote."""
    try:
        cfg = fn()
    except ConfigError as e:
        msg = str(e)
        assert msg.startswith(where) or msg.startswith("--set"), msg
        assert ":" in msg and len(msg) < 2000, msg
        return None
    assert isinstance(cfg, Config)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*FIELDS, "name", "trian", 7]), values, max_size=5))
def test_random_top_level(data):
    check(lambda: config_from_dict(data, where="fuzz.yaml"))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(SHIPPED))), st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4), st.randoms()
)
def test_mutated_shipped_configs(which, changes, rnd):
    data = yaml.safe_load(yaml.safe_dump(SHIPPED[which]))
    for dotted, value in changes:
        section, key = dotted.split(".")
        if not isinstance(data.get(section), dict):
            data[section] = {}
        data[section][misspell(key, rnd) if rnd.random() < 0.2 else key] = value
    cfg = check(lambda: config_from_dict(data, where="fuzz.yaml"))
    if cfg is not None:
        misspelled = [k for s, sec in data.items() if isinstance(sec, dict) for k in sec if k not in FIELDS.get(s, [k])]
        assert not misspelled  # a misspelled key never loads silently
        if cfg.model.n_layers <= 64 and cfg.model.d_model <= 4096 and cfg.data.vocab_size <= 10**6:
            report = dry_run_report(cfg)  # the dry run works on every config that loads
            assert sum(report["layers_per_block"]) == cfg.model.n_layers


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz._=[]{}:,0123456789- ", max_size=30), max_size=4))
def test_random_overrides(overrides):
    def load():
        data = yaml.safe_load(yaml.safe_dump(SHIPPED[0]))
        return config_from_dict(apply_overrides(data, overrides), where="fuzz.yaml")

    check(load)


@settings(max_examples=150, deadline=None)
@given(st.randoms(), st.integers(1, 6))
def test_byte_mutated_yaml_files(tmp_path_factory, rnd, n_edits):
    text = (ROOT / "configs/llama_tiny.yaml").read_text()
    for _ in range(n_edits):
        i = rnd.randrange(len(text))
        op = rnd.choice(["delete", "insert", "replace"])
        ch = rnd.choice(":{}[]-#'\"\n\t 0a.%&*!|>")
        text = text[:i] + (ch if op != "delete" else "") + text[i + (op != "insert") :]
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.yaml"
    path.write_text(text)
    check(lambda: load_config(path), where=str(path))
